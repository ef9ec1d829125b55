"""Aggregation of client states into a new global state: pure numpy, no I/O.

``aggregate(global_state, updates, spec)`` averages every entry over the clients
that hold it (HeteroFL), uniformly (as in the HeteroFL authors' code) or weighted
by sample count. Entries nobody holds keep their value. Plain FedAvg is the case
where every client is at width 1.

Memory stays bounded: one running weighted sum per entry (plus a per-element
weight array only for entries that some client held partially), never a stack
of K client copies. :class:`Aggregator` takes clients one at a time, so a server
can fold updates in as they arrive.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fmtl_lightning.errors import StateValidationError
from fmtl_lightning.roles import ModelSpec, WidthSpec
from fmtl_lightning.slicing import covers_all, regions
from fmtl_lightning.validation import validate_state

Weighting = Literal["uniform", "examples"]


@dataclass(frozen=True)
class ClientUpdate:
    """What one client returns: its shared arrays at its width, and its sample count."""

    client_id: str
    state: Mapping[str, np.ndarray]
    num_examples: int
    width: WidthSpec = field(default_factory=WidthSpec)


@dataclass
class _Acc:
    total: np.ndarray | None = None  # running sum of w * x, global shape
    full_weight: float = 0.0  # weight of clients that held the whole entry
    part_weight: np.ndarray | None = None  # per-element weight of partial holders
    int_value: np.ndarray | None = None  # for integer entries


class Aggregator:
    """Running aggregation over clients added one at a time.

    Every update is validated completely before any of it is added, so a bad
    update raises :class:`StateValidationError` and leaves the aggregator as it
    was; ``global_state`` itself is never modified.
    """

    def __init__(
        self,
        global_state: Mapping[str, np.ndarray],
        spec: ModelSpec,
        *,
        weighting: Weighting = "uniform",
        keys: Iterable[str] | None = None,
    ) -> None:
        if weighting not in ("uniform", "examples"):
            raise ValueError(f"weighting must be 'uniform' or 'examples', got {weighting!r}")
        self.spec = spec
        self.weighting = weighting
        self.keys = tuple(spec.shared_keys() if keys is None else keys)
        validate_state(
            {k: global_state[k] for k in self.keys if k in global_state},
            spec,
            1.0,
            self.keys,
            client="<global>",
        )
        self._global = global_state
        self._acc: dict[str, _Acc] = {k: _Acc() for k in self.keys}
        self.num_clients = 0

    def add(self, update: ClientUpdate) -> None:
        """Validate ``update`` and fold it into the running sums."""
        validate_state(update.state, self.spec, update.width, self.keys, client=update.client_id)
        self._add_validated(update)

    def _add_validated(self, update: ClientUpdate) -> None:
        w = self._weight(update)
        for k in self.keys:
            self._add_entry(k, np.asarray(update.state[k]), w, update.width)
        self.num_clients += 1

    def _weight(self, update: ClientUpdate) -> float:
        if self.weighting == "uniform":
            return 1.0
        n = update.num_examples
        if not isinstance(n, int | np.integer) or n <= 0:
            raise StateValidationError(
                f"num_examples must be a positive integer for example weighting, got {n!r}",
                client=update.client_id,
            )
        return float(n)

    def _add_entry(self, key: str, x: np.ndarray, w: float, width: WidthSpec) -> None:
        p = self.spec[key]
        acc = self._acc[key]
        if not p.is_float:
            acc.int_value = _fold_int(acc.int_value, x, p.int_rule)
            return
        g = self._global[key]
        if covers_all(self.spec, key, width):
            if acc.total is None:  # first full holder: one allocation, no zero-fill
                acc.total = x.copy() if w == 1.0 else x * np.asarray(w, dtype=x.dtype)
            elif w == 1.0:
                acc.total += x
            else:
                acc.total += x * np.asarray(w, dtype=x.dtype)
            acc.full_weight += w
            return
        if acc.total is None:
            acc.total = np.zeros_like(g)
        if acc.part_weight is None:
            acc.part_weight = np.zeros(g.shape, dtype=g.dtype)
        for g_idx, l_idx in regions(self.spec, key, width):
            if w == 1.0:
                acc.total[g_idx] += x[l_idx]
            else:
                acc.total[g_idx] += x[l_idx] * np.asarray(w, dtype=x.dtype)
            acc.part_weight[g_idx] += w

    def result(self) -> dict[str, np.ndarray]:
        """The new global state: every aggregated key, averaged where held, else unchanged."""
        out: dict[str, np.ndarray] = {}
        for k in self.keys:
            out[k] = self._finish(k)
        return out

    def _finish(self, key: str) -> np.ndarray:
        acc = self._acc[key]
        g = np.asarray(self._global[key])
        if not self.spec[key].is_float:
            return g.copy() if acc.int_value is None else acc.int_value.astype(g.dtype)
        if acc.total is None:
            return g.copy()
        if acc.part_weight is None:
            return acc.total / np.asarray(acc.full_weight, dtype=g.dtype)
        weight = acc.part_weight
        weight += acc.full_weight
        held = weight > 0
        out = g.copy()
        np.divide(acc.total, weight, out=out, where=held)
        return out


def _fold_int(current: np.ndarray | None, x: np.ndarray, rule: str) -> np.ndarray | None:
    """Integer buffers (e.g. BatchNorm's num_batches_tracked) are never averaged."""
    if rule == "keep":
        return current
    if current is None:
        return x.copy()
    if rule == "max":
        return np.maximum(current, x)
    if rule == "sum":
        return current + x
    raise ValueError(f"unknown int_rule {rule!r}")


def aggregate(
    global_state: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    spec: ModelSpec,
    *,
    weighting: Weighting = "uniform",
    keys: Iterable[str] | None = None,
) -> dict[str, np.ndarray]:
    """New global state from ``updates``; pure, ``global_state`` is left untouched.

    Every update is validated before any is folded in: one bad update raises
    :class:`StateValidationError` naming the client and key, and nothing changes.
    Keys outside the aggregated set (``keys``, default the spec's shared keys)
    are carried over from ``global_state`` unchanged.
    """
    agg = Aggregator(global_state, spec, weighting=weighting, keys=keys)
    for u in updates:  # validate all first: all-or-nothing
        validate_state(u.state, spec, u.width, agg.keys, client=u.client_id)
        agg._weight(u)
    for u in updates:
        agg._add_validated(u)
    new = {k: np.array(v, copy=True) for k, v in global_state.items() if k not in agg.keys}
    new.update(agg.result())
    return new
