"""Checks on the arrays that enter an edge client (numpy only).

Each function takes arrays from outside the client (the bundle's weights file, the
server's shared arrays, a local heads file, an input batch and its targets, the
outputs of a step graph) and either returns them ready to use or raises one typed
error (:class:`~mobile_client.errors.InputError` for the caller's data,
:class:`~mobile_client.errors.ManifestError` for the bundle's) naming the key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mobile_client.errors import InputError, ManifestError
from mobile_client.inputs import read_npz
from mobile_client.manifest_entries import FileEntry, HeadEntry, Normalisation


def max_abs(dtype: np.dtype) -> float:
    """The magnitude bound of a float value, as the server checks it: sqrt(finfo.max)."""
    return float(np.sqrt(np.finfo(dtype).max, dtype=np.float64))


def check_finite(name: str, a: np.ndarray) -> np.ndarray:
    """``a`` itself, or an :class:`InputError` when a graph output has NaN/Inf."""
    bad = ~np.isfinite(a)
    if bad.any():
        raise InputError(
            f"{name} has {int(bad.sum())} NaN/Inf values (first at {np.argwhere(bad)[0].tolist()}): "
            "the input is outside the range the model can compute on"
        )
    return a


def read_weights(root: Path, f: FileEntry) -> dict[str, np.ndarray]:
    """The client's weights file ``f`` under ``root``: every key the entry maps, each
    with the dtype and shape the manifest declares and finite."""
    p = root / f.path
    if not p.is_file():
        raise ManifestError(f"file {f.path!r} is missing ({p})")
    keys = list(dict.fromkeys(f.weights.values()))
    arrays = read_npz(p, keys, error=ManifestError)
    specs = {t.name: t for t in f.outputs}
    for k, a in arrays.items():
        t = specs.get(k)
        if t is not None and (list(a.shape) != list(t.shape) or str(a.dtype) != t.dtype):
            raise ManifestError(f"file {f.path!r}: key {k!r} is {a.dtype}{list(a.shape)}, "
                                f"the manifest says {t.dtype}{list(t.shape)}")  # fmt: skip
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ManifestError(f"file {f.path!r}: key {k!r} has NaN/Inf")
    return arrays


def overlay(
    state: dict[str, np.ndarray], arrays: Mapping[str, np.ndarray], what: str
) -> dict[str, np.ndarray]:
    """A copy of ``state`` with ``arrays`` written over it; each must be a key of the
    state with its shape and dtype, finite and within :func:`max_abs`."""
    out = dict(state)
    for k, v in arrays.items():
        v = np.asarray(v)
        if k not in state:
            raise InputError(f"{what}: key {k!r} is not in the client's state")
        if v.shape != state[k].shape or v.dtype != state[k].dtype:
            raise InputError(
                f"{what}: key {k!r} expected {state[k].dtype}{list(state[k].shape)}, "
                f"got {v.dtype}{list(v.shape)}"
            )
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            raise InputError(f"{what}: key {k!r} has NaN/Inf")
        if v.dtype.kind == "f" and v.size and np.abs(v).max() > max_abs(v.dtype):
            raise InputError(
                f"{what}: key {k!r} has |x| {float(np.abs(v).max()):.3g}, past the bound "
                f"sqrt(finfo.max) = {max_abs(v.dtype):.3g} an update must keep"
            )
        out[k] = v
    return out


def store_outputs(
    state: dict[str, np.ndarray], f: FileEntry, res: Mapping[str, np.ndarray]
) -> None:
    """Write a step graph's new weights into ``state``; each keeps its shape and dtype
    (a 0-d buffer such as ``num_batches_tracked`` stays 0-d, as the manifest declares)."""
    for name, key in f.weight_outputs.items():
        v, old = res[name], state[key]
        if v.shape != old.shape or v.dtype != old.dtype:
            raise ManifestError(
                f"{f.path}: output {name!r} for key {key!r} is {v.dtype}{list(v.shape)}, "
                f"the state holds {old.dtype}{list(old.shape)}"
            )
        state[key] = v


def prepare_x(x: Any, norm: Normalisation) -> np.ndarray:
    """Validate and normalise an input batch to float32 ``(B, *input_shape)``; a
    grayscale image input ``[1, H, W]`` also takes ``(B, H, W)``."""
    shape = tuple(norm.input_shape)
    if not isinstance(x, np.ndarray):
        raise InputError(f"x must be a numpy array, got {type(x).__name__}")
    if x.dtype == np.uint8:
        x = ((x.astype(np.float32) * np.float32(norm.scale) - np.float32(norm.mean))
             / np.float32(norm.std)).astype(np.float32)  # fmt: skip
    elif x.dtype != np.float32:
        raise InputError(f"x has dtype {x.dtype}; expected float32 (normalised) or uint8 (pixels)")
    gray = len(shape) == 3 and shape[0] == 1
    if gray and x.ndim == 3:
        x = x[:, None]  # (B, H, W) -> (B, 1, H, W)
    if x.ndim != 1 + len(shape) or x.shape[1:] != shape or x.shape[0] == 0:
        want = "(B, " + ", ".join(map(str, shape)) + ")"
        if gray:
            want += f" or (B, {shape[1]}, {shape[2]})"
        raise InputError(f"x has shape {tuple(x.shape)}; expected {want} with B >= 1")
    bad = ~np.isfinite(x)
    if bad.any():
        raise InputError(f"x has {int(bad.sum())} NaN/Inf values (first at {np.argwhere(bad)[0].tolist()})")  # fmt: skip
    return np.ascontiguousarray(x)


def prepare_targets(
    targets: Mapping[str, Any],
    tasks: tuple[str, ...],
    n: int,
    head: Callable[[str], HeadEntry],
) -> dict[str, np.ndarray]:
    """The targets of ``tasks`` for ``n`` examples, checked against each task's head
    (``head(task)``): int64 class ids ``(n,)`` (multi-class), float32 0/1 ``(n, labels)``
    (multi-label) or finite float32 values ``(n, outputs)`` (regression)."""
    out: dict[str, np.ndarray] = {}
    missing = [t for t in tasks if t not in targets]
    if missing:
        raise InputError(f"targets missing for tasks {missing}; given {list(targets)}")
    extra = [t for t in targets if t not in tasks]
    if extra:
        raise InputError(f"targets for unknown tasks {extra}; tasks: {list(tasks)}")
    for t in tasks:
        h = head(t)
        k = len(h.labels)
        y = np.asarray(targets[t])
        if h.kind == "multiclass":
            if y.dtype.kind not in "iu":
                raise InputError(f"targets[{t!r}] has dtype {y.dtype}; expected int64 class ids")
            if y.shape != (n,):
                raise InputError(f"targets[{t!r}] has shape {y.shape}; expected ({n},)")
            if y.size and (y.min() < 0 or y.max() >= k):
                raise InputError(f"targets[{t!r}] has class ids in [{y.min()}, {y.max()}]; "
                                 f"expected [0, {k - 1}]")  # fmt: skip
            out[t] = y.astype(np.int64)
        elif h.kind == "regression":
            if y.dtype != np.float32:
                raise InputError(f"targets[{t!r}] has dtype {y.dtype}; expected float32 values")
            if y.shape != (n, k):
                raise InputError(f"targets[{t!r}] has shape {y.shape}; expected ({n}, {k})")
            if not np.isfinite(y).all() or (y.size and np.abs(y).max() > max_abs(y.dtype)):
                raise InputError(f"targets[{t!r}] has NaN/Inf or values beyond the bound")
            out[t] = y
        else:
            if y.dtype != np.float32:
                raise InputError(f"targets[{t!r}] has dtype {y.dtype}; expected float32 0/1")
            if y.shape != (n, k):
                raise InputError(f"targets[{t!r}] has shape {y.shape}; expected ({n}, {k})")
            if not np.isin(y, (0.0, 1.0)).all():
                raise InputError(f"targets[{t!r}] has values other than 0/1 (or NaN)")
            out[t] = y
    return out
