"""The aggregator protocol: what every server-side aggregation rule looks like.

An aggregator is a frozen dataclass whose fields are its parameters (what the config
sets under ``algorithm.aggregator``) and whose call is a pure function over numpy::

    rule(global_state, updates, spec, *, weighting, row_masks) -> new_global_state

Every rule is width-aware: each entry is aggregated over the clients that hold it
(HeteroFL prefix slices, FedRolex windows), an entry no client holds keeps its global
value, integer entries (e.g. BatchNorm's ``num_batches_tracked``) follow their
``int_rule`` and are never averaged, keys outside the spec's shared keys are carried
over unchanged, and the inputs are never modified. Inputs are validated before any
arithmetic: a bad update raises :class:`~fmtl_lightning.errors.StateValidationError`
naming the client and the key, and nothing is returned. The result is always finite
and within :func:`~fmtl_lightning.validation.max_abs`.

Three class attributes tell callers what a rule needs, so that refusals are derived
from the rule, never from its name:

* ``weighted``: the rule honours ``algorithm.weighting`` (example-weighted or uniform);
  an unweighted rule counts each holder once and accepts only ``weighting="uniform"``;
* ``needs_label_masks``: the rule needs each client's label set (``row_masks``), which
  only a server that sees the clients' labels (the in-process simulation) can give.

Pure numpy: importing this package never imports torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar, Protocol

import numpy as np

from fmtl_lightning.aggregation import ClientUpdate, Weighting, client_weight
from fmtl_lightning.errors import FMTLError
from fmtl_lightning.roles import ModelSpec
from fmtl_lightning.validation import validate_state

# client id -> state-dict key -> bool vector over the key's rows (the labels it holds)
RowMasks = Mapping[str, Mapping[str, np.ndarray]]


class AggregatorParamError(FMTLError, ValueError):
    """A bad aggregator choice or parameter; ``field`` names the parameter (or ``name``;
    empty when the whole value is wrong)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class AggregationRule(Protocol):
    """A registered aggregator: a frozen dataclass of parameters with a pure ``__call__``."""

    name: ClassVar[str]  # the registry key, what ``algorithm.aggregator`` names
    weighted: ClassVar[bool]  # honours algorithm.weighting (else counts each holder once)
    needs_label_masks: ClassVar[bool]  # needs each client's label set (row_masks)

    def __call__(
        self,
        global_state: Mapping[str, np.ndarray],
        updates: Sequence[ClientUpdate],
        spec: ModelSpec,
        *,
        weighting: Weighting = "uniform",
        row_masks: RowMasks | None = None,
    ) -> dict[str, np.ndarray]: ...


def number_param(obj: object, field: str) -> float:
    """A float parameter of a frozen dataclass, converted from an int if given one
    (YAML ``beta: 0``); anything else (bools, strings) raises naming ``field``."""
    v = getattr(obj, field)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise AggregatorParamError(field, f"expected a number, got {v!r}")
    object.__setattr__(obj, field, float(v))
    return float(v)


def check_call(rule: AggregationRule, weighting: str, row_masks: RowMasks | None) -> None:
    """Refuse a call that asks a rule for something it does not do (a ``ValueError``:
    a programming error of the caller, not bad client input)."""
    if weighting not in ("uniform", "examples"):
        raise ValueError(f"weighting must be 'uniform' or 'examples', got {weighting!r}")
    if not rule.weighted and weighting != "uniform":
        raise ValueError(
            f"the {rule.name} aggregator counts each holder once; weighting must be 'uniform'"
        )
    if rule.needs_label_masks and row_masks is None:
        raise ValueError(f"the {rule.name} aggregator needs row_masks (each client's labels)")
    if not rule.needs_label_masks and row_masks is not None:
        raise ValueError(f"the {rule.name} aggregator takes no row_masks")


def validate_all(
    global_state: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    spec: ModelSpec,
    keys: Iterable[str],
    weighting: Weighting,
) -> list[float]:
    """Validate the global state, then every update completely (key set, shapes at its
    width, dtypes, finite values within the bound, its weight) in client order, so the
    error raised names the first bad client and key. Returns the weights."""
    keys = tuple(keys)
    validate_state(
        {k: global_state[k] for k in keys if k in global_state}, spec, 1.0, keys, client="<global>"
    )
    weights = []
    for u in updates:
        validate_state(u.state, spec, u.width, keys, client=u.client_id)
        weights.append(client_weight(u, weighting))
    return weights


def carried(global_state: Mapping[str, np.ndarray], keys: Iterable[str]) -> dict[str, np.ndarray]:
    """Copies of the entries that are not aggregated (they stay as they were)."""
    skip = set(keys)
    return {k: np.array(v, copy=True) for k, v in global_state.items() if k not in skip}
