"""Order statistics over holders, per entry: the machinery under median and trimmed mean.

A running sum cannot give an order statistic: every holder's value of an element must
be seen at once. :func:`aggregate_order_statistic` therefore stacks, one block of rows
at a time (:data:`STACK` elements, never whole models), the values of every client
into a ``(elements, clients)`` array with NaN where a client does not hold the element
(a HeteroFL prefix, a FedRolex window wrapping around), sorts each element's values
(NaN last), and hands the sorted block and the holder counts to a ``reduce`` function.
Inputs are validated first (finite, within the bound), so NaN only ever marks a
missing holder, and any order statistic of bounded values is bounded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from fmtl_lightning.aggregation import ClientUpdate, fold_ints
from fmtl_lightning.aggregators.base import carried, validate_all
from fmtl_lightning.roles import ModelSpec, WidthSpec
from fmtl_lightning.slicing import covers_all, regions

STACK = 1 << 20  # elements of one block of the holders stack: 4 MiB of float32

# sorted (M, K) block (each row ascending, NaN after its n holders), n (M,) -> (M,) float64;
# rows with n == 0 may give anything (they keep the global value)
Reduce = Callable[[np.ndarray, np.ndarray], np.ndarray]

# where a client's sub-array lands: None when it holds the whole entry, else runs along
# axis 0 (global rows g0:g1 <- local rows l0:..., other axes by (global, local) slices)
_Places = tuple[tuple[int, int, int, tuple[slice, ...], tuple[slice, ...]], ...] | None


def aggregate_order_statistic(
    global_state: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    spec: ModelSpec,
    reduce: Reduce,
    *,
    keys: Iterable[str] | None = None,
) -> dict[str, np.ndarray]:
    """New global state: every float entry ``reduce``-d over its holders' sorted values.

    Unweighted (each holder counts once). Keys outside ``keys`` (default: the spec's
    shared keys) are carried over; integer entries follow their ``int_rule``.
    """
    keys = tuple(spec.shared_keys() if keys is None else keys)
    validate_all(global_state, updates, spec, keys, "uniform")
    new = carried(global_state, keys)
    for k in keys:
        g = np.asarray(global_state[k])
        if spec[k].is_float:
            new[k] = _entry(spec, k, g, updates, reduce)
        else:
            new[k] = fold_ints(g, (u.state[k] for u in updates), spec[k].int_rule)
    return new


def _places(spec: ModelSpec, key: str, width: WidthSpec) -> _Places:
    if covers_all(spec, key, width):
        return None
    return tuple(
        (gi[0].start, gi[0].stop, li[0].start, gi[1:], li[1:])
        for gi, li in regions(spec, key, width)
    )


def _entry(
    spec: ModelSpec, key: str, g: np.ndarray, updates: Sequence[ClientUpdate], reduce: Reduce
) -> np.ndarray:
    out = np.array(g, copy=True, order="C")  # a block of rows is then a flat view
    if not updates:
        return out
    o = out.reshape(1) if out.ndim == 0 else out
    layouts: dict[WidthSpec, _Places] = {}
    places = [layouts.setdefault(u.width, _places(spec, key, u.width)) for u in updates]
    xs = [np.asarray(u.state[key]) for u in updates]
    xs = [x.reshape(1) if x.ndim == 0 else x for x in xs]  # 0-d entries as 1-d views
    n_cl = len(updates)
    rows = o.shape[0]
    row_size = o.size // rows if rows else 1
    step = max(1, STACK // max(1, row_size * n_cl))
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        blk = (r1 - r0, *o.shape[1:])
        # clients first, so that each client's rows are written contiguously
        by_client = np.full((n_cl, *blk), np.nan, dtype=o.dtype)
        held = np.zeros(blk, dtype=np.int32)
        whole = 0
        for i, (x, pl) in enumerate(zip(xs, places, strict=True)):
            if pl is None:
                by_client[i] = x[r0:r1]
                whole += 1
                continue
            for g0, g1, l0, g_rest, l_rest in pl:
                a, b = max(g0, r0), min(g1, r1)
                if a < b:
                    at: tuple[slice, ...] = (slice(a - r0, b - r0), *g_rest)
                    dst: tuple[int | slice, ...] = (i, *at)
                    by_client[dst] = x[(slice(l0 + a - g0, l0 + b - g0), *l_rest)]
                    held[at] += 1
        held += whole
        # (elements, clients), C-contiguous: each element's values side by side
        flat, n = np.ascontiguousarray(by_client.reshape(n_cl, -1).T), held.reshape(-1)
        flat.sort(axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):  # elements nobody holds
            val = reduce(flat, n)
        np.copyto(o[r0:r1].reshape(-1), val, where=n > 0, casting="unsafe")
    return out
