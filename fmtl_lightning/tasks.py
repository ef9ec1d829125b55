"""Tasks: what a client learns from one input domain, as a function of the dataset's labels.

Owns the :class:`Task` record and the built-in registry :data:`TASKS`. A task maps the
dataset labels (int64, shape (N,)) to training targets: int64 (N,) class ids for a
"multiclass" task, float32 (N, num_outputs) of 0/1 for a "multilabel" task. Several
tasks share one domain (= dataset name), which is what makes a shared backbone useful.

Built-ins (``mnist/*`` and ``digits/*`` share the digit definitions):

- ``<d>/digit``  10 classes, the digit itself;
- ``<d>/parity`` 2 classes, 0 = even, 1 = odd;
- ``<d>/ge5``    2 classes, 1 when digit >= 5;
- ``<d>/attrs``  multilabel (ge5, odd, has_closed_loop); closed-loop digits are
  {0, 4, 6, 8, 9} (the printed shapes of 0, 6, 8, 9 enclose a region, and 4 in its
  closed form; 2 and 7 are counted open);
- ``fashion/item``  10 classes, the Fashion-MNIST item;
- ``fashion/group`` 4 classes: tops (T-shirt/top 0, Pullover 2, Dress 3, Coat 4,
  Shirt 6), bottoms (Trouser 1), footwear (Sandal 5, Sneaker 7, Ankle boot 9), bags (Bag 8).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import numpy as np

from fmtl_lightning.data.datasets import DIGIT_CLASS_NAMES, FASHION_CLASS_NAMES
from fmtl_lightning.errors import TaskLabelError, UnknownTaskError

TaskKind = Literal["multiclass", "multilabel"]

CLOSED_LOOP_DIGITS = (0, 4, 6, 8, 9)
FASHION_GROUP_NAMES = ("tops", "bottoms", "footwear", "bags")
# Fashion-MNIST item id -> group id (index into FASHION_GROUP_NAMES).
FASHION_ITEM_TO_GROUP = np.array([0, 1, 0, 0, 0, 2, 0, 2, 3, 2], dtype=np.int64)
_FASHION_ITEMS = FASHION_CLASS_NAMES
_DIGITS = DIGIT_CLASS_NAMES
_NUM_DOMAIN_CLASSES = {"mnist": 10, "fashion_mnist": 10, "digits": 10}


@dataclass(frozen=True)
class Task:
    """One learning task on a domain. ``target(labels)`` gives the training targets."""

    name: str
    domain: str  # dataset name: "mnist" | "fashion_mnist" | "digits"
    num_outputs: int
    kind: TaskKind
    target: Callable[[np.ndarray], np.ndarray]
    output_names: tuple[str, ...]


def check_labels(labels: np.ndarray, num_classes: int, task: str) -> np.ndarray:
    """``labels`` as int64 (N,), or :class:`TaskLabelError` if not integer / out of range."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise TaskLabelError(
            f"task {task!r}: labels must be a 1-D integer array, got {labels.dtype} "
            f"with shape {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise TaskLabelError(
            f"task {task!r}: labels must lie in [0, {num_classes}), "
            f"found min {labels.min()} max {labels.max()}"
        )
    return labels.astype(np.int64, copy=False)


def _multiclass(name: str, domain: str, mapping: np.ndarray, output_names: tuple[str, ...]) -> Task:
    """A task whose target is ``mapping[label]`` (one class id per sample)."""
    num_in = _NUM_DOMAIN_CLASSES[domain]

    def target(labels: np.ndarray) -> np.ndarray:
        return mapping[check_labels(labels, num_in, name)]  # (N,) int64

    return Task(name, domain, len(output_names), "multiclass", target, output_names)


def _multilabel(name: str, domain: str, table: np.ndarray, output_names: tuple[str, ...]) -> Task:
    """A task whose target row is ``table[label]`` (0/1 per output)."""
    num_in = _NUM_DOMAIN_CLASSES[domain]

    def target(labels: np.ndarray) -> np.ndarray:
        return table[check_labels(labels, num_in, name)]  # (N, num_outputs) float32

    return Task(name, domain, len(output_names), "multilabel", target, output_names)


def _digit_tasks(prefix: str, domain: str) -> list[Task]:
    digits = np.arange(10, dtype=np.int64)
    ge5 = (digits >= 5).astype(np.int64)
    odd = digits % 2
    closed = np.isin(digits, CLOSED_LOOP_DIGITS).astype(np.int64)
    attrs = np.stack([ge5, odd, closed], axis=1).astype(np.float32)  # (10, 3)
    return [
        _multiclass(f"{prefix}/digit", domain, digits, _DIGITS),
        _multiclass(f"{prefix}/parity", domain, odd, ("even", "odd")),
        _multiclass(f"{prefix}/ge5", domain, ge5, ("lt5", "ge5")),
        _multilabel(f"{prefix}/attrs", domain, attrs, ("ge5", "odd", "has_closed_loop")),
    ]


def _fashion_tasks() -> list[Task]:
    items = np.arange(10, dtype=np.int64)
    return [
        _multiclass("fashion/item", "fashion_mnist", items, _FASHION_ITEMS),
        _multiclass("fashion/group", "fashion_mnist", FASHION_ITEM_TO_GROUP, FASHION_GROUP_NAMES),
    ]


TASKS: Mapping[str, Task] = MappingProxyType(
    {
        task.name: task
        for task in _digit_tasks("mnist", "mnist")
        + _fashion_tasks()
        + _digit_tasks("digits", "digits")
    }
)


def get_task(name: str) -> Task:
    """The built-in task ``name``, or :class:`UnknownTaskError` listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        known = ", ".join(sorted(TASKS))
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {known}") from None
