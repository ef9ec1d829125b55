"""Norm-bounded mean: clip each client's delta from the global state, then the mean.

Client ``i`` sent ``x_i`` for the slice ``S_i`` it was given (its width). Its delta is
``d_i = x_i - g[S_i]`` over all its shared float entries together (one L2 norm per
client, as in Sun et al., 2019, "Can you really backdoor federated learning?"), and it
is clipped to the client's bound ``b_i``::

    d_i <- d_i * min(1, b_i / ||d_i||)

The new global state is the mean over holders (:func:`~fmtl_lightning.aggregation.aggregate`,
uniform or example-weighted) of the clipped states ``g[S_i] + d_i``, i.e. ``g`` plus the
mean of the clipped deltas of the clients that hold each element. Integer entries are
not clipped (they follow their ``int_rule``).

The rule for a width-r slice: ``b_i = clip_norm * sqrt(n_i / N)``, where ``n_i`` is the
number of float elements the client holds and ``N`` the number in the full shared state
(so a full-width client's bound is ``clip_norm``). ``clip_norm / sqrt(N)`` is then a bound
on the root-mean-square change per element that is the same for every width. Why not
``clip_norm`` for every slice as is: a width-1/4 client holds about 1/16 of the elements,
so the same total norm on 1/16 of the elements would let it move each element it holds
about 4x as far as a full-width client may, and those are exactly the prefix (or window)
elements that every client shares. With the scaled bound, a narrow client has no more
leverage per element than a wide one; with equal per-element updates, clients of every
width are clipped alike.

Memory: clipping works one entry at a time, holding at most one clipped copy of that
entry per clipped client (clients within their bound are used as they are).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fmtl_lightning.aggregation import ClientUpdate, Weighting, aggregate
from fmtl_lightning.aggregators.base import (
    AggregatorParamError,
    RowMasks,
    carried,
    check_call,
    number_param,
    validate_all,
)
from fmtl_lightning.roles import ModelSpec
from fmtl_lightning.slicing import slice_array
from fmtl_lightning.validation import max_abs


def client_bound(
    spec: ModelSpec, update: ClientUpdate, clip_norm: float, keys: Sequence[str]
) -> float:
    """``clip_norm * sqrt(n_i / N)``: the bound on the delta norm of a client's slice."""
    full = sum(math.prod(spec[k].shape) for k in keys)
    held = sum(math.prod(spec.shape_at(k, update.width)) for k in keys)
    return clip_norm * math.sqrt(held / full) if full else clip_norm


def delta_norm(
    global_state: Mapping[str, np.ndarray],
    update: ClientUpdate,
    spec: ModelSpec,
    keys: Sequence[str],
) -> float:
    """L2 norm of ``x - g[S]`` over ``keys``; never overflows.

    The difference is taken in the entry's dtype (both sides are within
    :func:`~fmtl_lightning.validation.max_abs`, so it is at most twice that, far from
    overflow); each entry's differences are scaled by their largest magnitude before
    squaring, and the squares summed in float64.
    """
    norms = []
    for k in keys:
        d = slice_array(spec, k, global_state[k], update.width)  # a new array: reused
        np.subtract(update.state[k], d, out=d)
        m = float(max(d.max(initial=0.0), -d.min(initial=0.0)))
        if m > 0:
            np.divide(d, m, out=d)  # in [-1, 1]
            np.multiply(d, d, out=d)
            norms.append(m * math.sqrt(float(d.sum(dtype=np.float64))))
    return math.hypot(*norms)


def aggregate_norm_bounded(
    global_state: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    spec: ModelSpec,
    clip_norm: float,
    *,
    weighting: Weighting = "uniform",
    keys: Iterable[str] | None = None,
) -> dict[str, np.ndarray]:
    """New global state: the mean over holders of the clients' clipped states (see the
    module docstring for the rule). Validates every update before any arithmetic."""
    NormBounded(clip_norm)  # the parameter check
    keys = tuple(spec.shared_keys() if keys is None else keys)
    validate_all(global_state, updates, spec, keys, weighting)
    fkeys = [k for k in keys if spec[k].is_float]
    scales = []
    for u in updates:
        norm = delta_norm(global_state, u, spec, fkeys)
        bound = client_bound(spec, u, clip_norm, fkeys)
        scales.append(1.0 if norm <= bound else bound / norm)
    new = carried(global_state, keys)
    for k in keys:  # one entry at a time: at most one clipped copy of it per client
        sub = [
            ClientUpdate(u.client_id, {k: _clipped(spec, k, global_state[k], u, s)},
                         u.num_examples, u.width)
            for u, s in zip(updates, scales, strict=True)
        ]  # fmt: skip
        new.update(aggregate({k: global_state[k]}, sub, spec, weighting=weighting, keys=[k]))
    return new


def _clipped(spec: ModelSpec, key: str, g: np.ndarray, u: ClientUpdate, s: float) -> np.ndarray:
    """``g[S] + s * (x - g[S])``, in the entry's dtype (no overflow, as in :func:`delta_norm`)."""
    x = u.state[key]
    if s >= 1.0 or not spec[key].is_float:
        return x
    gs = slice_array(spec, key, g, u.width)
    y = np.empty_like(gs)  # an array even when 0-d (ufuncs return scalars for those)
    np.subtract(x, gs, out=y)
    np.multiply(y, s, out=y)
    np.add(y, gs, out=y)  # between g and x: within the bound up to rounding...
    bound = max_abs(y.dtype)
    return np.clip(y, -bound, bound, out=y)  # ...which the clip undoes


@dataclass(frozen=True)
class NormBounded:
    """Mean of client deltas clipped to ``clip_norm`` (scaled by width, see the module)."""

    clip_norm: float  # bound on a full-width client's delta norm; > 0, finite

    name: ClassVar[str] = "norm_bounded"
    weighted: ClassVar[bool] = True
    needs_label_masks: ClassVar[bool] = False

    def __post_init__(self) -> None:
        c = number_param(self, "clip_norm")
        if not 0.0 < c < math.inf:
            raise AggregatorParamError("clip_norm", f"must be a finite number > 0, got {c}")

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
        return aggregate_norm_bounded(
            global_state, updates, spec, self.clip_norm, weighting=weighting
        )
