"""The mean over holders (FedAvg / HeteroFL) and HeteroFL's label split, as aggregators.

Both are thin bindings of the streaming functions in :mod:`fmtl_lightning.aggregation`
(:func:`~fmtl_lightning.aggregation.aggregate`,
:func:`~fmtl_lightning.aggregation.aggregate_label_split`): same validation, same
bounds, bit-identical results.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fmtl_lightning.aggregation import (
    ClientUpdate,
    Weighting,
    aggregate,
    aggregate_label_split,
)
from fmtl_lightning.aggregators.base import RowMasks, check_call
from fmtl_lightning.roles import ModelSpec


@dataclass(frozen=True)
class Mean:
    """Each entry's mean over the clients that hold it, uniform or example-weighted
    (``algorithm.weighting``). No parameters."""

    name: ClassVar[str] = "mean"
    weighted: ClassVar[bool] = True
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
        return aggregate(global_state, updates, spec, weighting=weighting)


@dataclass(frozen=True)
class LabelSplit:
    """:class:`Mean`, with each output row of a shared head averaged only over the
    clients whose labels include that row's class (HeteroFL's server, for clients
    trained with masked cross-entropy). Needs every client's label set, so it runs
    only where the server sees them (the in-process simulation). No parameters."""

    name: ClassVar[str] = "label_split"
    weighted: ClassVar[bool] = True
    needs_label_masks: ClassVar[bool] = True

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
        assert row_masks is not None  # check_call refuses None
        return aggregate_label_split(global_state, updates, spec, row_masks, weighting=weighting)
