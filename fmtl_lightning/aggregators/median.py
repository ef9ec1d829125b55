"""Coordinate-wise median over holders (Yin et al., 2018; Flower's FedMedian).

Each element of each entry becomes the median of the values of the clients that hold
it; with an even number of holders, the mean of the two middle values (as
``np.median``). One client, however far off, moves no element past the values of the
others when holders are at least three. Unweighted: each holder counts once, whatever
sample count it claims.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fmtl_lightning.aggregation import ClientUpdate, Weighting
from fmtl_lightning.aggregators.base import RowMasks, check_call
from fmtl_lightning.aggregators.order import aggregate_order_statistic
from fmtl_lightning.roles import ModelSpec


def median_of_sorted(s: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Median of each row of ``s`` (ascending, its ``n`` holders first), in float64."""
    lo = np.take_along_axis(s, ((n - 1) // 2)[:, None], axis=-1)[:, 0].astype(np.float64)
    hi = np.take_along_axis(s, (n // 2)[:, None], axis=-1)[:, 0]
    return (lo + hi) / 2  # exact when n is odd (lo == hi); both within the bound


def aggregate_median(
    global_state: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], spec: ModelSpec
) -> dict[str, np.ndarray]:
    """New global state: every shared float element the median over its holders."""
    return aggregate_order_statistic(global_state, updates, spec, median_of_sorted)


@dataclass(frozen=True)
class Median:
    """Coordinate-wise median over holders. No parameters; unweighted."""

    name: ClassVar[str] = "median"
    weighted: ClassVar[bool] = False
    needs_label_masks: ClassVar[bool] = False

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
        return aggregate_median(global_state, updates, spec)
