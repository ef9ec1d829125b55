"""User tasks for a run config: ``tasks: [{factory: "examples.user_tasks:digit_value_tasks"}]``.

A task factory is any importable callable that returns a
:class:`fmtl_lightning.tasks.Task` (or a list of them). Here: a regression task per
digit dataset, predicting the digit's value scaled to [0, 1] (one output, float32
targets ``(N, 1)``; MSE loss, R^2 as ``acc``). Run with ``PYTHONPATH`` containing the checkout (``examples`` is then a
namespace package), e.g. ``clients: [{tasks: [digits/value, digits/parity]}]``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fmtl_lightning.tasks import Task, check_labels


def _value_target(name: str) -> Callable[[np.ndarray], np.ndarray]:
    def target(labels: np.ndarray) -> np.ndarray:
        digits = check_labels(labels, 10, name)
        return (digits.astype(np.float32) / 9.0)[:, None]  # (N, 1) in [0, 1]

    return target


def digit_value_tasks() -> list[Task]:
    """``mnist/value`` and ``digits/value``: regress the digit / 9."""
    return [
        Task(f"{d}/value", 1, "regression", domain=d, target=_value_target(f"{d}/value"),
             output_names=("value",))
        for d in ("mnist", "digits")
    ]  # fmt: skip
