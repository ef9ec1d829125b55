"""Validation of named array states against the declared parameter roles.

Every boundary where arrays arrive (a client update, a checkpoint, a file) calls
:func:`validate_state` before the arrays touch anything. Pure numpy.
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
    """Check key set, per-key shape at ``width``, dtype and finiteness.

    Raises :class:`StateValidationError` naming the client and the first bad key.
    """
    ws = width if isinstance(width, WidthSpec) else WidthSpec(float(width))
    expected = list(keys)
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
        p = spec[k]
        want_shape = spec.shape_at(k, ws)
        if arr.shape != want_shape:
            raise StateValidationError(
                f"shape {arr.shape} does not match {want_shape} expected at width {ws.width:g}",
                client=client,
                key=k,
            )
        if arr.dtype != np.dtype(p.dtype):
            raise StateValidationError(
                f"dtype {arr.dtype} does not match declared {p.dtype}", client=client, key=k
            )
        # a finite sum proves every element finite (NaN/Inf propagate); only when
        # the sum overflows do we pay for the element-wise check
        if p.is_float and not np.isfinite(arr.sum()) and not np.isfinite(arr).all():
            n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            raise StateValidationError(
                f"{n_bad} non-finite value(s) (NaN/Inf)", client=client, key=k
            )
