"""The streaming mean over holders: :class:`Aggregator` (clients added one at a time)
and :func:`aggregate` (all updates at once, validated first). Pure numpy, no I/O.

Memory stays bounded: one running weighted sum per entry (plus a per-element
weight array only for entries that some client held partially), never a stack
of K client copies. Sums are folded in blocks of rows (:data:`BLOCK` elements) so
that a block of the running sum, and the scratch buffer for ``weight * x``, stay in
cache while the clients' arrays stream through once; no temporary arrays.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fmtl_lightning.aggregation.update import ClientUpdate, Weighting, client_weight, fold_int
from fmtl_lightning.errors import StateValidationError
from fmtl_lightning.roles import ModelSpec, WidthSpec
from fmtl_lightning.slicing import covers_all, regions
from fmtl_lightning.validation import (
    check_structure,
    expected_layout,
    max_abs,
    validate_state,
    within_bound,
)

BLOCK = 1 << 17  # elements per block of rows: 512 KiB of float32, in L2 with its scratch


@dataclass
class _Acc:
    total: np.ndarray | None = None  # running sum of w * x, global shape
    full_weight: float = 0.0  # weight of clients that held the whole entry
    part_weight: np.ndarray | None = None  # per-element weight of partial holders
    int_value: np.ndarray | None = None  # for integer entries


# a run of a client's sub-array along axis 0: global rows g0:g1 hold local rows l0:...,
# the other axes indexed by (global, local) slices
_Run = tuple[int, int, int, tuple[slice, ...], tuple[slice, ...]]


@dataclass(frozen=True)
class _Piece:
    """One client's sub-array, or one run of it along axis 0, in global coordinates.

    Rows ``g0:g1`` of the global array hold rows ``l0:l0 + g1 - g0`` of ``x``;
    ``g_rest``/``l_rest`` index the other axes (empty when the piece is whole).
    """

    x: np.ndarray  # at least 1-d
    w: float
    whole: bool  # the client holds the entire entry
    g0: int
    g1: int
    l0: int
    g_rest: tuple[slice, ...] = ()
    l_rest: tuple[slice, ...] = ()


class Aggregator:
    """Running aggregation over clients added one at a time.

    Every update is validated completely before any of it is added, so a bad
    update raises :class:`StateValidationError` and leaves the aggregator as it
    was; ``global_state`` itself is never modified. So is an update whose weight
    would take the total past :attr:`weight_limit` (the running sums are not
    rescaled; :func:`aggregate`, which sees every weight first, has no such limit).
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
        self._layouts: dict[tuple[str, WidthSpec], tuple[_Run, ...] | None] = {}
        self.num_clients = 0
        self.total_weight = 0.0

    @functools.cached_property
    def weight_limit(self) -> float:
        """Total weight up to which a weighted sum of bounded values cannot overflow:
        ``max_abs(dtype) / 2`` for the narrowest float dtype aggregated (sums then stay
        within half the dtype's range, leaving room for rounding)."""
        bounds = [max_abs(self.spec[k].dtype) for k in self.keys if self.spec[k].is_float]
        return min(bounds, default=math.inf) / 2

    def add(self, update: ClientUpdate) -> None:
        """Validate ``update`` and fold it into the running sums."""
        validate_state(update.state, self.spec, update.width, self.keys, client=update.client_id)
        w = self._weight(update)
        if self.total_weight + w > self.weight_limit:
            raise StateValidationError(
                f"weight {w:g} takes the total weight past {self.weight_limit:.3g}, where a "
                "running sum could overflow; aggregate() rescales such weights",
                client=update.client_id,
            )
        self._fold([update], [w])
        self.total_weight += w

    def _fold(self, updates: Sequence[ClientUpdate], weights: Sequence[float]) -> None:
        """Add already-validated updates, entry by entry, in the given client order."""
        for k in self.keys:
            self._fold_entry(k, updates, weights)
        self.num_clients += len(updates)

    def _weight(self, update: ClientUpdate) -> float:
        return client_weight(update, self.weighting)

    def _fold_entry(
        self, key: str, updates: Sequence[ClientUpdate], weights: Sequence[float]
    ) -> None:
        p = self.spec[key]
        acc = self._acc[key]
        if not p.is_float:
            for u in updates:
                acc.int_value = fold_int(acc.int_value, np.asarray(u.state[key]), p.int_rule)
            return
        if not updates:
            return
        g = self._global[key]
        pieces: list[_Piece] = []
        part_weights: dict[WidthSpec, float] = {}  # total weight of partial holders per width
        for u, w in zip(updates, weights, strict=True):
            runs = self._runs(key, u.width)
            x = np.asarray(u.state[key])
            x = x.reshape(1) if x.ndim == 0 else x
            if runs is None:
                pieces.append(_Piece(x, w, True, 0, x.shape[0], 0))
                acc.full_weight += w
                continue
            pieces += [_Piece(x, w, False, *run) for run in runs]
            part_weights[u.width] = part_weights.get(u.width, 0.0) + w
        fresh = acc.total is None
        if acc.total is None:  # a first client holding all of it writes, not adds: no zero-fill
            acc.total = (np.empty if pieces[0].whole else np.zeros)(g.shape, dtype=g.dtype)
        total = acc.total
        if part_weights:
            if acc.part_weight is None:
                acc.part_weight = np.zeros(g.shape, dtype=g.dtype)
            pw = acc.part_weight.reshape(1) if g.ndim == 0 else acc.part_weight
            for width, w in part_weights.items():
                for g0, g1, _, g_rest, _ in self._runs(key, width) or ():
                    pw[(slice(g0, g1), *g_rest)] += w
        _fold_blocks(total, pieces, first_writes=fresh and pieces[0].whole)

    def _runs(self, key: str, width: WidthSpec) -> tuple[_Run, ...] | None:
        """Where a client at ``width`` lands in ``key``: ``None`` if it holds all of it."""
        runs = self._layouts.get((key, width), ())
        if runs == ():
            if covers_all(self.spec, key, width):
                runs = None
            elif not self.spec[key].shape:
                runs = ((0, 1, 0, (), ()),)
            else:
                runs = tuple(
                    (g_idx[0].start, g_idx[0].stop, l_idx[0].start, g_idx[1:], l_idx[1:])
                    for g_idx, l_idx in regions(self.spec, key, width)
                )
            self._layouts[(key, width)] = runs
        return runs

    def result(self) -> dict[str, np.ndarray]:
        """The new global state: every aggregated key, averaged where held, else unchanged."""
        return {k: self._finish(k) for k in self.keys}

    def _finish(self, key: str, *, consume: bool = False) -> np.ndarray:
        """Average of ``key``; ``consume`` lets the result reuse the running sum's memory."""
        acc = self._acc[key]
        g = np.asarray(self._global[key])
        if not self.spec[key].is_float:
            if acc.int_value is None:
                return g.copy()
            # an ndarray of the entry's own shape and dtype, 0-d included (never a numpy scalar)
            return np.array(acc.int_value, dtype=g.dtype, copy=True).reshape(g.shape)
        if acc.total is None:
            return g.copy()
        out = acc.total if consume else np.empty_like(acc.total)
        if acc.part_weight is None:
            np.divide(acc.total, np.asarray(acc.full_weight, dtype=g.dtype), out=out)
        else:
            weight = acc.part_weight if consume else acc.part_weight.copy()
            weight += acc.full_weight
            if acc.full_weight > 0:  # someone held all of it: every element is held
                np.divide(acc.total, weight, out=out)
            else:
                held = weight > 0
                np.divide(acc.total, weight, out=out, where=held)
                np.copyto(out, g, where=~held)
        if consume:
            acc.total = acc.part_weight = None
        return out


def _fold_blocks(total: np.ndarray, pieces: list[_Piece], *, first_writes: bool) -> None:
    """``total += w * x`` for every piece, one block of rows at a time.

    Looping blocks outside and clients inside keeps a block of the sum in cache
    while each client's rows are read once. Pieces are added in client order,
    so results do not depend on the block size.
    """
    total = total.reshape(1) if total.ndim == 0 else total  # a view: 0-d as 1-d
    rows = total.shape[0]
    row_size = max(1, total.size // max(rows, 1))
    step = max(1, BLOCK // row_size)
    scratch = np.empty(min(total.size, step * row_size), dtype=total.dtype)
    dtype = total.dtype.type
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        t = total[r0:r1]
        for i, pc in enumerate(pieces):
            a, b = max(pc.g0, r0), min(pc.g1, r1)
            if a >= b:
                continue
            if pc.whole:
                tv, xv = t, pc.x[r0:r1]
            else:
                tv = t[(slice(a - r0, b - r0), *pc.g_rest)]
                xv = pc.x[(slice(pc.l0 + a - pc.g0, pc.l0 + b - pc.g0), *pc.l_rest)]
            if i == 0 and first_writes:
                if pc.w == 1.0:
                    np.copyto(tv, xv)
                else:
                    np.multiply(xv, dtype(pc.w), out=tv)
            elif pc.w == 1.0:
                np.add(tv, xv, out=tv)
            else:
                s = scratch[: xv.size].reshape(xv.shape)
                np.multiply(xv, dtype(pc.w), out=s)
                np.add(tv, s, out=tv)


def aggregate(
    global_state: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    spec: ModelSpec,
    *,
    weighting: Weighting = "uniform",
    keys: Iterable[str] | None = None,
) -> dict[str, np.ndarray]:
    """New global state from ``updates``; pure, ``global_state`` is left untouched.

    One bad update raises :class:`StateValidationError` naming the client and key,
    and nothing is returned or changed. Keys outside the aggregated set (``keys``,
    default the spec's shared keys) are carried over from ``global_state`` unchanged.

    Key sets, shapes, dtypes and counts of all updates are checked before any
    arithmetic. Values are checked on the averages instead of on every input (a
    NaN/Inf in any input reaches the average), which saves a full pass over the
    client data; if an average is not finite or beyond the bound
    (:func:`~fmtl_lightning.validation.max_abs`), every update is validated in
    order, so the error raised is the one update-by-update validation would raise.
    An input past the bound is therefore refused when it takes an average past the
    bound or makes a sum overflow; one diluted below it is averaged like any other
    value (the result is still the weighted mean). Where inputs are untrusted, validate
    each with :func:`~fmtl_lightning.validation.validate_state` first, as the Flower
    strategy does.

    The weights are used as given unless their total exceeds
    :attr:`Aggregator.weight_limit`; then they are scaled to sum to 1, so that no
    sum of values within the bound can overflow. The result is always finite.
    """
    agg = Aggregator(global_state, spec, weighting=weighting, keys=keys)
    layouts: dict[float, dict[str, tuple[tuple[int, ...], np.dtype]]] = {}
    try:
        for u in updates:
            if u.width.width not in layouts:
                layouts[u.width.width] = expected_layout(spec, u.width, agg.keys)
            lay = layouts[u.width.width]
            check_structure(u.state, spec, u.width, agg.keys, client=u.client_id, layout=lay)
        weights = [agg._weight(u) for u in updates]
    except StateValidationError:
        _validate_in_order(agg, updates)  # raises the first error in client order
        raise
    total = math.fsum(weights)
    if total > agg.weight_limit:  # a sum of bounded values could overflow: make it convex
        weights = [w / total for w in weights]
    new = {k: np.array(v, copy=True) for k, v in global_state.items() if k not in agg.keys}
    for k in agg.keys:
        with np.errstate(over="ignore", invalid="ignore"):  # bad inputs are reported below
            agg._fold_entry(k, updates, weights)
            new[k] = agg._finish(k, consume=True)
        if spec[k].is_float and not within_bound(new[k]):
            _validate_in_order(agg, updates)  # an input that is non-finite or too large raises
            # every input is finite and within the bound, and so is their exact mean:
            # only rounding can have put the computed mean past the bound
            bound = max_abs(new[k].dtype)
            np.clip(new[k], -bound, bound, out=new[k])
    return new


def _validate_in_order(agg: Aggregator, updates: Sequence[ClientUpdate]) -> None:
    for u in updates:
        validate_state(u.state, agg.spec, u.width, agg.keys, client=u.client_id)
        agg._weight(u)
