"""What a client sends the server, and its weight: :class:`ClientUpdate`,
:func:`client_weight` (uniform or by sample count, at most :data:`MAX_EXAMPLES`) and
the rules for integer entries, which are never averaged (:func:`fold_ints`). Pure numpy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fmtl_lightning.errors import StateValidationError
from fmtl_lightning.roles import WidthSpec

Weighting = Literal["uniform", "examples"]

# The largest sample count a client may claim under example weighting: 2**53 is the
# largest integer a float64 weight holds exactly (any real dataset is far smaller).
MAX_EXAMPLES = 2**53


@dataclass(frozen=True)
class ClientUpdate:
    """What one client returns: its shared arrays at its width, and its sample count."""

    client_id: str
    state: Mapping[str, np.ndarray]
    num_examples: int
    width: WidthSpec = field(default_factory=WidthSpec)


def client_weight(update: ClientUpdate, weighting: Weighting) -> float:
    """An update's aggregation weight: 1, or its sample count under example weighting
    (an integer in ``[1, MAX_EXAMPLES]``, else :class:`StateValidationError`)."""
    if weighting == "uniform":
        return 1.0
    n = update.num_examples
    if not isinstance(n, int | np.integer) or isinstance(n, bool) or not 0 < n <= MAX_EXAMPLES:
        raise StateValidationError(
            f"num_examples must be an integer in [1, 2**53] for example weighting, got {n!r}",
            client=update.client_id,
        )
    return float(n)


def fold_ints(global_value: np.ndarray, values: Iterable[np.ndarray], rule: str) -> np.ndarray:
    """An integer entry over its clients' values by its ``int_rule`` (never averaged); the
    global value when no client sent one. An ndarray of the entry's shape and dtype."""
    g = np.asarray(global_value)
    acc = None
    for x in values:
        acc = fold_int(acc, np.asarray(x), rule)
    if acc is None:
        return g.copy()
    return np.array(acc, dtype=g.dtype, copy=True).reshape(g.shape)


def fold_int(current: np.ndarray | None, x: np.ndarray, rule: str) -> np.ndarray | None:
    """Integer buffers (e.g. BatchNorm's num_batches_tracked) are never averaged.

    Always an ndarray of ``x``'s shape: numpy ufuncs turn 0-d inputs into scalars.
    """
    if rule == "keep":
        return current
    if current is None:
        return np.array(x, copy=True)
    if rule == "max":
        return np.asarray(np.maximum(current, x))
    if rule == "sum":
        return np.asarray(current + x)
    raise ValueError(f"unknown int_rule {rule!r}")
