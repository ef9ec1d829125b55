"""Cut a client's sub-state out of the global state (HeteroFL prefix / FedRolex window).

Pure numpy. ``slice_state(global, spec, WidthSpec(0.25))`` returns arrays with
exactly the shapes a backbone built directly at width 0.25 has.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from fmtl_lightning.roles import ModelSpec, WidthSpec

Region = tuple[tuple[slice, ...], tuple[slice, ...]]


def regions(spec: ModelSpec, key: str, width: WidthSpec) -> Iterator[Region]:
    """Yield ``(global_index, local_index)`` pairs of basic slices covering a key's sub-array.

    A HeteroFL slice is one region; a wrapped FedRolex window splits each scaled
    axis into two runs, so up to ``2**n_scaled_axes`` regions (views, no copies).
    """
    p = spec[key]
    per_axis: list[list[tuple[slice, slice]]] = []
    for dim, (n, axis) in enumerate(zip(p.shape, p.axes, strict=True)):
        if axis is None:
            per_axis.append([(slice(0, n), slice(0, n))])
        else:
            b = p.block(dim)  # a channel is a run of b entries (flattened maps)
            per_axis.append(
                [
                    (slice(g0 * b, g1 * b), slice(l0 * b, (l0 + g1 - g0) * b))
                    for g0, g1, l0 in spec.runs(axis, width)
                ]
            )
    for combo in itertools.product(*per_axis):
        yield tuple(c[0] for c in combo), tuple(c[1] for c in combo)


def covers_all(spec: ModelSpec, key: str, width: WidthSpec) -> bool:
    """True when the client's slice of ``key`` is the whole global array."""
    return spec.shape_at(key, width) == spec[key].shape


def slice_array(spec: ModelSpec, key: str, full: np.ndarray, width: WidthSpec) -> np.ndarray:
    """The sub-array of one entry at ``width`` (a new contiguous array)."""
    if covers_all(spec, key, width):
        return np.array(full, copy=True)
    out = np.empty(spec.shape_at(key, width), dtype=full.dtype)
    for g_idx, l_idx in regions(spec, key, width):
        out[l_idx] = full[g_idx]
    return out


def slice_state(
    global_state: Mapping[str, np.ndarray],
    spec: ModelSpec,
    width: WidthSpec | float,
    keys: Iterable[str] | None = None,
) -> dict[str, np.ndarray]:
    """Extract the sub-state at ``width`` for ``keys`` (default: every key in ``global_state``)."""
    ws = width if isinstance(width, WidthSpec) else WidthSpec(float(width))
    wanted = list(global_state) if keys is None else list(keys)
    return {k: slice_array(spec, k, np.asarray(global_state[k]), ws) for k in wanted}


def embed_array(
    spec: ModelSpec, key: str, full: np.ndarray, sub: np.ndarray, width: WidthSpec
) -> np.ndarray:
    """Write ``sub`` back into a copy of ``full`` at the positions ``width`` selects."""
    out = np.array(full, copy=True)
    for g_idx, l_idx in regions(spec, key, width):
        out[g_idx] = sub[l_idx]
    return out
