"""Coordinate-wise trimmed mean over holders (Yin et al., 2018; Flower's FedTrimmedAvg).

For each element held by ``n`` clients, the ``k = floor(beta * n)`` smallest and the
``k`` largest values are dropped and the remaining ``n - 2k`` averaged (uniformly).
``beta`` is in ``[0, 0.5)``, so at least one value always remains.

Few holders: an element held by fewer than ``1 / beta`` clients has ``k = 0`` and is
the plain mean of its holders, untrimmed. Under HeteroFL the elements outside the
narrowest width are held only by the wider clients, so they are trimmed less (or not
at all): choose ``beta`` with the holder count of those elements in mind (e.g.
``beta = 0.2`` trims one value from each end once five clients hold an element).
Unweighted: each holder counts once, whatever sample count it claims.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fmtl_lightning.aggregation import ClientUpdate, Weighting
from fmtl_lightning.aggregators.base import (
    AggregatorParamError,
    RowMasks,
    check_call,
    number_param,
)
from fmtl_lightning.aggregators.order import aggregate_order_statistic
from fmtl_lightning.roles import ModelSpec

# floor(beta * n) up to rounding: 0.29 * 100 is 28.999999999999996 in floats, and means 29
_EPS = 1e-9


def trimmed_count(beta: float, n: np.ndarray) -> np.ndarray:
    """``k = floor(beta * n)``: how many values are dropped from each end."""
    return np.floor(beta * n + _EPS).astype(n.dtype)


def aggregate_trimmed_mean(
    global_state: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    spec: ModelSpec,
    beta: float,
) -> dict[str, np.ndarray]:
    """New global state: every shared float element the ``beta``-trimmed mean over its
    holders (see the module docstring for the rule)."""
    TrimmedMean(beta)  # the parameter check

    def reduce(s: np.ndarray, n: np.ndarray) -> np.ndarray:
        k = trimmed_count(beta, n)
        j = np.arange(s.shape[-1], dtype=k.dtype)
        keep = (j >= k[:, None]) & (j < (n - k)[:, None])  # (M, K): the middle n - 2k
        total = np.add.reduce(s, axis=-1, dtype=np.float64, where=keep, initial=0.0)
        return total / (n - 2 * k)

    return aggregate_order_statistic(global_state, updates, spec, reduce)


@dataclass(frozen=True)
class TrimmedMean:
    """Coordinate-wise ``beta``-trimmed mean over holders; unweighted."""

    beta: float = 0.2  # fraction dropped from each end, in [0, 0.5)

    name: ClassVar[str] = "trimmed_mean"
    weighted: ClassVar[bool] = False
    needs_label_masks: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not 0.0 <= number_param(self, "beta") < 0.5:
            raise AggregatorParamError("beta", f"must be in [0, 0.5), got {self.beta}")

    def __call__(
        self,
        global_state: Mapping[str, np.ndarray],
        updates: Sequence[ClientUpdate],
        spec: ModelSpec,
        *,
        weighting: Weighting = "uniform",
        row_masks: RowMasks | None = None,
    ) -> dict[str, np.ndarray]:
        check_call(self, weighting, row_masks)
        return aggregate_trimmed_mean(global_state, updates, spec, self.beta)
