"""Tasks: what a model learns, as one object that every part of the library reads.

A :class:`Task` is a name, an output size, a kind (``"multiclass"``, ``"multilabel"``
or ``"regression"``), its loss and its metrics (defaults by kind), and, to be used in
a federation over a built-in dataset, the ``domain`` (dataset name) and a ``target``
function from the dataset's labels to training targets. Training and evaluation
(:class:`~fmtl_lightning.module.MultiTaskModule`), label masking, the data layer,
export and the edge manifest all read the same object from the registry.

Targets and outputs by kind (``n = num_outputs``):

- ``multiclass``: int64 ``(N,)`` class ids; logits ``(B, n)``; loss cross-entropy
  (restricted to a client's classes when label masks are given: the only kind that
  takes masks); metrics ``acc`` = top-1 accuracy;
- ``multilabel``: float32 ``(N, n)`` of 0/1; logits ``(B, n)``; loss BCE with logits;
  metrics ``acc`` = element-wise accuracy of ``logit > 0``, ``f1`` = macro F1 (a label
  with no positive and no predicted positive scores 0, as torchmetrics does);
- ``regression``: float32 ``(N, n)``; outputs ``(B, n)``; loss mean squared error;
  metrics ``acc`` = the coefficient of determination R^2 (mean over outputs; 1 is a
  perfect fit, 0 predicting the mean, negative worse than that; a constant target
  scores 1 if predicted exactly, else 0, as scikit-learn's ``r2_score``), ``mse``, ``mae``.
  ``acc`` is the column the run summaries average, so every kind fills it with a
  "higher is better, 1 is perfect" score.

A custom ``loss(outputs, targets) -> scalar tensor`` and ``metrics(outputs, targets) ->
{name: float}`` may replace the defaults; ``metrics`` must return ``"acc"``.

Users add tasks with :func:`register_task` (duplicates and bad fields raise
:class:`~fmtl_lightning.errors.TaskDefinitionError` naming the field), or from a run
config's ``tasks: [{factory: "pkg.module:make_task"}]`` (:func:`load_task_factory`).

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

This module imports no torch at import time (the config validator reads it); the
default losses and metrics import torch when they run.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from fmtl_lightning.data.datasets import DIGIT_CLASS_NAMES, FASHION_CLASS_NAMES
from fmtl_lightning.errors import TaskDefinitionError, TaskLabelError, UnknownTaskError

if TYPE_CHECKING:
    import torch

TaskKind = Literal["multiclass", "multilabel", "regression"]
TASK_KINDS: tuple[str, ...] = ("multiclass", "multilabel", "regression")
LossFn = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
MetricsFn = Callable[["torch.Tensor", "torch.Tensor"], dict[str, float]]

CLOSED_LOOP_DIGITS = (0, 4, 6, 8, 9)
FASHION_GROUP_NAMES = ("tops", "bottoms", "footwear", "bags")
# Fashion-MNIST item id -> group id (index into FASHION_GROUP_NAMES).
FASHION_ITEM_TO_GROUP = np.array([0, 1, 0, 0, 0, 2, 0, 2, 3, 2], dtype=np.int64)
_FASHION_ITEMS = FASHION_CLASS_NAMES
_DIGITS = DIGIT_CLASS_NAMES
_NUM_DOMAIN_CLASSES = {"mnist": 10, "fashion_mnist": 10, "digits": 10}
NAME_RE = re.compile(r"[A-Za-z0-9_][\w./+-]{0,99}")
MASK_FILL = -1e9  # logit of a class a client does not hold, under label masks


# ----------------------------------------------------------------------------- defaults by kind
def multiclass_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Batch-mean cross-entropy; ``y``: (B,) int64 class ids."""
    import torch.nn.functional as F

    return F.cross_entropy(z, y)


def multilabel_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Batch-mean BCE with logits; ``y``: (B, n) float32 of 0/1."""
    import torch.nn.functional as F

    return F.binary_cross_entropy_with_logits(z, y)


def regression_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every output; ``y``: (B, n) float32."""
    import torch.nn.functional as F

    return F.mse_loss(z, y)


def multiclass_metrics(z: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """``acc``: top-1 accuracy (0 on an empty batch)."""
    if y.numel() == 0:
        return {"acc": 0.0}
    return {"acc": float((z.argmax(dim=1) == y).float().mean())}


def multilabel_metrics(z: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """``acc``: element-wise accuracy of ``z > 0``; ``f1``: macro F1 over the labels."""
    if y.numel() == 0:
        return {"acc": 0.0, "f1": 0.0}
    pred, true = z > 0, y > 0.5
    tp = (pred & true).sum(0).double()
    fp = (pred & ~true).sum(0).double()
    fn = (~pred & true).sum(0).double()
    den = 2 * tp + fp + fn
    f1 = (2 * tp / den.clamp(min=1)).where(den > 0, 0.0)
    return {"acc": float((pred == true).float().mean()), "f1": float(f1.mean())}


def regression_metrics(z: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """``acc``: R^2 (mean over outputs), ``mse``, ``mae`` (0s on an empty batch)."""
    if y.numel() == 0:
        return {"acc": 0.0, "mse": 0.0, "mae": 0.0}
    z2, y2 = z.reshape(y.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
    err = z2 - y2
    sse = err.pow(2).sum(0)
    sst = (y2 - y2.mean(0)).pow(2).sum(0)
    r2 = (1 - sse / sst.where(sst > 0, 1.0)).where(sst > 0, (sse == 0).double())
    return {
        "acc": float(r2.mean()),
        "mse": float(err.pow(2).mean()),
        "mae": float(err.abs().mean()),
    }


DEFAULT_LOSSES: Mapping[str, LossFn] = MappingProxyType(
    {"multiclass": multiclass_loss, "multilabel": multilabel_loss, "regression": regression_loss}
)
DEFAULT_METRICS: Mapping[str, MetricsFn] = MappingProxyType(
    {
        "multiclass": multiclass_metrics,
        "multilabel": multilabel_metrics,
        "regression": regression_metrics,
    }
)


# ----------------------------------------------------------------------------- the record
def _bad(task: Any, field_name: str, message: str) -> TaskDefinitionError:
    name = task if isinstance(task, str) else getattr(task, "name", "?")
    return TaskDefinitionError(f"task {name!r}: field {field_name!r} {message}", field=field_name)


@dataclass(frozen=True)
class Task:
    """One learning task. ``loss``/``metrics`` ``None`` take the defaults of ``kind``;
    ``output_names`` ``()`` numbers the outputs ``"0".."n-1"``. ``domain`` and ``target``
    are what a federation over a built-in dataset needs (``target(labels)`` gives the
    training targets from the dataset's int64 labels); a model trained on the user's own
    data needs neither."""

    name: str
    num_outputs: int
    kind: TaskKind
    domain: str | None = None
    target: Callable[[np.ndarray], np.ndarray] | None = None
    output_names: tuple[str, ...] = ()
    loss: LossFn | None = field(default=None, compare=False)
    metrics: MetricsFn | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_RE.fullmatch(self.name):
            raise _bad(self.name, "name", "must be 1-100 letters, digits or _ . / + - "
                       f"(not starting with . / + -), got {self.name!r}")  # fmt: skip
        n = self.num_outputs
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1_000_000:
            raise _bad(self, "num_outputs", f"must be an integer in [1, 1000000], got {n!r}")
        if self.kind not in TASK_KINDS:
            raise _bad(self, "kind", f"must be one of {list(TASK_KINDS)}, got {self.kind!r}")
        if self.kind == "multiclass" and n < 2:
            raise _bad(self, "num_outputs", f"a multiclass task needs >= 2 classes, got {n}")
        if self.domain is not None and not isinstance(self.domain, str):
            raise _bad(self, "domain", f"must be a dataset name or None, got {self.domain!r}")
        for f in ("target", "loss", "metrics"):
            v = getattr(self, f)
            if v is not None and not callable(v):
                raise _bad(self, f, f"must be callable or None, got {type(v).__name__}")
        names = self.output_names
        if not isinstance(names, tuple | list) or not all(isinstance(s, str) for s in names):
            raise _bad(self, "output_names", f"must be a tuple of strings, got {names!r}")
        if names and len(names) != n:
            raise _bad(self, "output_names", f"has {len(names)} names for {n} outputs")
        object.__setattr__(self, "output_names", tuple(names) or tuple(map(str, range(n))))

    @property
    def loss_fn(self) -> LossFn:
        """The loss: the task's own, else the default of its kind."""
        return self.loss or DEFAULT_LOSSES[self.kind]

    @property
    def metrics_fn(self) -> MetricsFn:
        """The metrics: the task's own, else the defaults of its kind."""
        return self.metrics or DEFAULT_METRICS[self.kind]

    @property
    def default_loss(self) -> bool:
        """Whether the loss is the default of the kind (what an exported step graph runs)."""
        return self.loss is None or self.loss is DEFAULT_LOSSES[self.kind]

    def compute_loss(
        self, z: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The batch loss; ``mask`` ((n,) bool, the classes a client holds) restricts a
        multiclass task's cross-entropy to those classes, and is ignored by other kinds."""
        if mask is not None and self.kind == "multiclass":
            z = z.masked_fill(~mask, MASK_FILL)
        return self.loss_fn(z, y)

    def compute_metrics(self, z: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """The task's metrics on ``(outputs, targets)``; always has ``"acc"``."""
        out = dict(self.metrics_fn(z, y))
        if "acc" not in out:
            raise _bad(self, "metrics", f"must return an 'acc' entry, returned {sorted(out)}")
        return {k: float(v) for k, v in out.items()}

    def label_mask(self, targets: np.ndarray) -> np.ndarray | None:
        """The classes ``targets`` hold, as an ``(n,)`` bool mask, for a multiclass task;
        ``None`` for other kinds (their losses take no mask)."""
        if self.kind != "multiclass":
            return None
        return np.isin(np.arange(self.num_outputs), np.asarray(targets))

    def targets(self, labels: np.ndarray) -> np.ndarray:
        """``target(labels)``, or :class:`TaskDefinitionError` if the task has no target."""
        if self.target is None:
            raise _bad(self, "target", "is None: the task cannot derive targets from labels")
        return self.target(labels)


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

    return Task(name, len(output_names), "multiclass", domain, target, output_names)


def _multilabel(name: str, domain: str, table: np.ndarray, output_names: tuple[str, ...]) -> Task:
    """A task whose target row is ``table[label]`` (0/1 per output)."""
    num_in = _NUM_DOMAIN_CLASSES[domain]

    def target(labels: np.ndarray) -> np.ndarray:
        return table[check_labels(labels, num_in, name)]  # (N, num_outputs) float32

    return Task(name, len(output_names), "multilabel", domain, target, output_names)


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


# ----------------------------------------------------------------------------- the registry
_BUILTIN = "builtin"
_REGISTRY: dict[str, Task] = {}
_ORIGIN: dict[str, str] = {}  # task name -> "builtin", "python" or a factory path
TASKS: Mapping[str, Task] = MappingProxyType(_REGISTRY)  # a read-only live view
FACTORY_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def register_task(task: Task, *, origin: str = "python") -> Task:
    """Add ``task`` to the registry; returns it.

    A name already registered raises :class:`TaskDefinitionError` (field ``name``),
    unless both registrations come from the same config factory ``origin`` (a config
    read twice in one process): then the new object replaces the old one.
    """
    if not isinstance(task, Task):
        raise TaskDefinitionError(
            f"register_task takes a Task, got {type(task).__name__}", field="task"
        )
    old = _ORIGIN.get(task.name)
    if old is not None and not (old == origin and origin not in (_BUILTIN, "python")):
        raise _bad(task, "name", f"is already registered (by {old}); task names are unique")
    _REGISTRY[task.name] = task
    _ORIGIN[task.name] = origin
    return task


def unregister_task(name: str) -> None:
    """Remove a user task (built-ins stay); unknown names raise :class:`UnknownTaskError`."""
    get_task(name)
    if _ORIGIN[name] == _BUILTIN:
        raise _bad(name, "name", "is a built-in task and cannot be removed")
    del _REGISTRY[name], _ORIGIN[name]


def load_task_factory(path: str) -> list[Task]:
    """Import ``"pkg.module:callable"``, call it with no arguments, and register the
    Task (or iterable of Tasks) it returns; errors name the field ``factory``."""
    if not isinstance(path, str) or not FACTORY_RE.fullmatch(path):
        raise TaskDefinitionError(
            f"factory {path!r} must be an import path 'package.module:callable'", field="factory"
        )
    mod_name, attr = path.split(":")
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise TaskDefinitionError(f"factory {path!r} cannot be imported: {exc}",
                                  field="factory") from exc  # fmt: skip
    if not callable(fn):
        raise TaskDefinitionError(f"factory {path!r} is not callable", field="factory")
    made = fn()
    tasks = [made] if isinstance(made, Task) else list(made) if isinstance(made, Iterable) else []
    if not tasks or not all(isinstance(t, Task) for t in tasks):
        raise TaskDefinitionError(
            f"factory {path!r} must return a Task or a non-empty list of Tasks, got {made!r}",
            field="factory",
        )
    return [register_task(t, origin=path) for t in tasks]


def get_task(name: str) -> Task:
    """The registered task ``name``, or :class:`UnknownTaskError` listing the known ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {known}") from None


OWN_DOMAIN = "own"  # the input domain of a client whose tasks name no built-in dataset


def inputs_domain(tasks: Iterable[str]) -> str:
    """The input domain of a client with ``tasks``: the dataset a built-in task names (a
    client's tasks share one), else :data:`OWN_DOMAIN`, the user's own data."""
    return next((d for t in tasks if (d := get_task(t).domain) is not None), OWN_DOMAIN)


def task_domain(name: str) -> str:
    """The dataset (``domain``) registered task ``name`` trains on, or
    :class:`TaskDefinitionError` (field ``domain``) if it has none. A config's client
    tasks have one unless ``data.factory`` brings the data
    (:func:`~fmtl_lightning.config.validate_config` checks)."""
    domain = get_task(name).domain
    if domain is None:
        raise _bad(name, "domain", "is None: a federation over a built-in dataset needs it")
    return domain


for _t in _digit_tasks("mnist", "mnist") + _fashion_tasks() + _digit_tasks("digits", "digits"):
    register_task(_t, origin=_BUILTIN)
del _t
