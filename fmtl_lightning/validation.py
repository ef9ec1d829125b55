"""Validation of named array states against the declared parameter roles.

Every boundary where arrays arrive (a client update, a checkpoint, a file) calls
:func:`validate_state` before the arrays touch anything. It is two checks that
can also be run apart: :func:`check_structure` (key set, types, shapes, dtypes:
metadata only, no pass over the data) and :func:`check_finite` (finite values
within :func:`max_abs`; a pass over the data). Pure numpy.

The magnitude bound: a float value must satisfy ``|x| <= sqrt(finfo(dtype).max)``
(about 1.8e19 for float32). A larger value is finite but cannot be trained on (its
square overflows: variances, norms, the Ditto term), and the bound leaves
aggregation a headroom of ``sqrt(finfo(dtype).max)`` in total weight before a
weighted sum of bounded values could overflow.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fmtl_lightning.errors import StateValidationError
from fmtl_lightning.roles import ModelSpec, WidthSpec


def validate_state(
    state: Mapping[str, object],
    spec: ModelSpec,
    width: WidthSpec | float,
    keys: Iterable[str],
    *,
    client: str | None = None,
) -> None:
    """Check key set, per-key shape at ``width``, dtype, finiteness and magnitude.

    Raises :class:`StateValidationError` naming the client and the first bad key.
    """
    expected = list(keys)
    check_structure(state, spec, width, expected, client=client)
    check_finite(state, spec, expected, client=client)  # type: ignore[arg-type]


def check_structure(
    state: Mapping[str, object],
    spec: ModelSpec,
    width: WidthSpec | float,
    keys: Iterable[str],
    *,
    client: str | None = None,
    layout: Mapping[str, tuple[tuple[int, ...], np.dtype]] | None = None,
) -> None:
    """Check key set, array type, per-key shape at ``width`` and dtype (not the values).

    ``layout`` (from :func:`expected_layout`) saves recomputing shapes when many
    states at the same width are checked.
    """
    ws = width if isinstance(width, WidthSpec) else WidthSpec(float(width))
    expected = list(keys)
    want = expected_layout(spec, ws, expected) if layout is None else layout
    got = set(state)
    missing = [k for k in expected if k not in got]
    if missing:
        raise StateValidationError(
            f"missing {len(missing)} key(s): {missing[:5]}", client=client, key=missing[0]
        )
    extra = sorted(got - set(expected))
    if extra:
        raise StateValidationError(
            f"unexpected {len(extra)} key(s): {extra[:5]}", client=client, key=extra[0]
        )
    for k in expected:
        arr = state[k]
        if not isinstance(arr, np.ndarray):
            raise StateValidationError(
                f"expected a numpy array, got {type(arr).__name__}", client=client, key=k
            )
        want_shape, want_dtype = want[k]
        if arr.shape != want_shape:
            raise StateValidationError(
                f"shape {arr.shape} does not match {want_shape} expected at width {ws.width:g}",
                client=client,
                key=k,
            )
        if arr.dtype != want_dtype:
            raise StateValidationError(
                f"dtype {arr.dtype} does not match declared {want_dtype}", client=client, key=k
            )


def expected_layout(
    spec: ModelSpec, width: WidthSpec | float, keys: Iterable[str]
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Expected ``(shape, dtype)`` of every key in a state at ``width``."""
    return {k: (spec.shape_at(k, width), np.dtype(spec[k].dtype)) for k in keys}


def check_finite(
    state: Mapping[str, np.ndarray],
    spec: ModelSpec,
    keys: Iterable[str],
    *,
    client: str | None = None,
) -> None:
    """Check that every float entry among ``keys`` is finite and within :func:`max_abs`."""
    for k in keys:
        arr = state[k]
        if not spec[k].is_float or within_bound(arr):
            continue
        if not all_finite(arr):
            n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise StateValidationError(
                f"{n_bad} non-finite value(s) (NaN/Inf)", client=client, key=k
            )
        bound = max_abs(arr.dtype)
        n_big = int(np.count_nonzero(np.abs(arr) > bound))
        raise StateValidationError(
            f"{n_big} value(s) with |x| > {bound:.3g}, the bound for {arr.dtype} "
            f"(largest |x| {float(np.abs(arr).max()):.3g})",
            client=client,
            key=k,
        )


def max_abs(dtype: np.dtype | type | str) -> float:
    """The largest magnitude a float value may have: ``sqrt(finfo(dtype).max)``."""
    return float(np.sqrt(np.finfo(dtype).max, dtype=np.float64))


def within_bound(arr: np.ndarray) -> bool:
    """True when every element of a float array is finite with ``|x| <= max_abs(dtype)``.

    Two passes (min and max; NaN propagates through both), no temporaries.
    """
    if arr.size == 0:
        return True
    bound = max_abs(arr.dtype)
    return bool(-bound <= arr.min() and arr.max() <= bound)


def all_finite(arr: np.ndarray) -> bool:
    """True when no element of a float array is NaN/Inf.

    A finite sum proves every element finite (NaN/Inf propagate); only when the
    sum overflows do we pay for the element-wise check.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowing sum is handled
        return bool(np.isfinite(arr.sum()) or np.isfinite(arr).all())
