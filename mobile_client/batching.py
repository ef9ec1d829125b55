"""The order in which a client visits its examples (shared by edge and Lightning clients).

One pass = ``np.random.default_rng(seed).permutation(n)`` (one generator, drawn anew
per pass), cut into slices of ``batch_size`` (the last one may be shorter). Stop after
``epochs`` passes, or after exactly ``steps`` batches when ``steps`` is given
(reshuffling at each new pass). Same arguments -> same batches, on any device.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def batch_order(
    n: int, batch_size: int, epochs: int = 1, steps: int | None = None, seed: int = 0
) -> Iterator[np.ndarray]:
    """Yield int64 index arrays into ``n`` examples (see the module docstring)."""
    if n <= 0:
        raise ValueError(f"batch_order: n must be > 0, got {n}")
    if batch_size <= 0:
        raise ValueError(f"batch_order: batch_size must be > 0, got {batch_size}")
    if steps is None and epochs < 0:
        raise ValueError(f"batch_order: epochs must be >= 0, got {epochs}")
    if steps is not None and steps < 0:
        raise ValueError(f"batch_order: steps must be >= 0, got {steps}")
    rng = np.random.default_rng(seed)
    done, passes = 0, 0
    while (steps is not None and done < steps) or (steps is None and passes < epochs):
        perm = rng.permutation(n)
        passes += 1
        for start in range(0, n, batch_size):
            if steps is not None and done >= steps:
                return
            yield perm[start : start + batch_size].astype(np.int64)
            done += 1


def num_batches(n: int, batch_size: int, epochs: int = 1, steps: int | None = None) -> int:
    """How many batches :func:`batch_order` yields for these arguments."""
    return steps if steps is not None else epochs * -(-n // batch_size)


def head_name(task: str) -> str:
    """Key-safe name of a task ("mnist/digit" -> "mnist__digit"): the task's head module
    (``heads.<name>.*`` state keys), its metric, and its labels' key in a data file."""
    return task.replace("/", "__").replace(".", "_")


def label_key(task: str, *, test: bool = False) -> str:
    """Key of ``task``'s labels in a client's ``.npz`` data file, next to ``x`` (train)
    and ``x_test``: ``y__mnist__digit`` (train) or ``y_test__mnist__digit`` (test)."""
    return ("y_test__" if test else "y__") + head_name(task)
