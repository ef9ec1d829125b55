"""The LightningModule of one client's multi-task model. It knows nothing about rounds.

It holds a :class:`~fmtl_lightning.models.MultiTaskModel` or a user's
:class:`~fmtl_lightning.model_source.TaskModel` (backbone at the client's width + task heads),
sums per-task losses, and measures per-task metrics, both from each task's
:class:`~fmtl_lightning.tasks.Task` (its loss and metrics, defaults by kind). How one fit
trains is an explicit argument, a :class:`TrainSpec` (never an attribute set from
outside), passed by :func:`fmtl_lightning.local_fit.fit` to ``training_step`` and
``configure_optimizers``:

* ``keys``: the names of the parameters the optimiser steps (``None``: all);
  e.g. FedRep's phases pass the keys the ModelSpec makes local, then those it shares;
* ``prox``: a Ditto/FedProx-style pull ``lam/2 * ||w - anchor||^2`` over named
  parameters (the shared ones, by the model's role declaration);
* ``label_masks``: masked cross-entropy over the classes a client holds (HeteroFL);
  :meth:`MultiTaskModule.evaluate` takes the same masks for its losses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import nn

from fmtl_lightning.errors import BatchFormatError, TaskDefinitionError
from fmtl_lightning.tasks import Task

if TYPE_CHECKING:
    from fmtl_lightning.model_source import ClientModel

Batch = tuple[torch.Tensor, dict[str, torch.Tensor]]


@dataclass
class ProxTerm:
    """``lam / 2 * sum_k ||param_k - anchor_k||^2`` over the named parameters."""

    lam: float
    anchor: dict[str, torch.Tensor]

    def __call__(self, named: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total = torch.zeros(())
        for k, a in self.anchor.items():
            total = total + (named[k] - a).pow(2).sum()
        return 0.5 * self.lam * total


@dataclass(frozen=True)
class TrainSpec:
    """How one fit trains: which parameters step, the prox pull, the label masks."""

    keys: frozenset[str] | None = None  # parameters the optimiser steps (None: all)
    prox: ProxTerm | None = None
    label_masks: Mapping[str, torch.Tensor] = field(default_factory=dict)


class MultiTaskModule(L.LightningModule):
    """Shared backbone + private heads; ``training_step`` returns the summed task loss.

    ``tasks``: the :class:`~fmtl_lightning.tasks.Task` of each head (a mapping task name
    -> Task, or an iterable of Tasks); each task's loss and metrics come from its Task.

    Batch format (``training_step``, ``validation_step``, ``test_step``): a pair
    ``(x, {task: y})`` with ``x`` the model input ``(B, ...)`` and one target per task
    of the module (int64 ``(B,)`` for a multiclass task, float32 ``(B, n)`` for a
    multi-label or regression task); a module with a single task also takes ``(x, y)``,
    e.g. the ``[x, y]`` a ``DataLoader(TensorDataset(x, y))`` yields. Anything else
    raises :class:`~fmtl_lightning.errors.BatchFormatError`.

    Under a ``lightning.Trainer`` the steps log to its loggers (e.g. ``CSVLogger``):
    ``train_loss`` (per step and per epoch), ``train_loss/<task>`` and
    ``train_<metric>/<task>`` per epoch; ``val_*`` and ``test_*`` likewise per epoch
    (means over the epoch's batches, weighted by batch size). Metrics are each task's
    (``acc`` for every kind; ``f1``; ``mse``/``mae`` for regression). The federation's
    Fabric loop (:func:`fmtl_lightning.local_fit.fit`) passes a :class:`TrainSpec` and
    logs nothing per step.
    """

    def __init__(
        self,
        model: ClientModel,
        tasks: Mapping[str, Task] | Iterable[Task],
        *,
        lr: float = 0.05,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        union_slices: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tasks: dict[str, Task] = _task_map(tasks)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        # FedAvg's union head: task -> (start, stop) columns of the single shared head
        self.union_slices = dict(union_slices) if union_slices else None
        for t, task in self.tasks.items():
            if self._n_out(t) != task.num_outputs:
                raise TaskDefinitionError(
                    f"task {t!r}: field 'num_outputs' is {task.num_outputs}, but the model's "
                    f"head for it has {self._n_out(t)} outputs",
                    field="num_outputs",
                )

    def _n_out(self, task: str) -> int:
        if self.union_slices is not None:
            a, b = self.union_slices[task]
            return b - a
        if task not in self.model.task_outputs:
            raise TaskDefinitionError(
                f"task {task!r} has no head; the model has {list(self.model.task_outputs)}",
                field="name",
            )
        return self.model.task_outputs[task]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(x)
        if self.union_slices is None:
            return out
        (union,) = out.values()  # (B, sum of all tasks' outputs)
        return {t: union[:, a:b] for t, (a, b) in self.union_slices.items() if t in self.tasks}

    def split_batch(self, batch: Any) -> Batch:
        """``(x, {task: y})`` from a batch in the documented format (see the class)."""
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            raise BatchFormatError(
                f"a batch must be (x, {{task: y}}) (or (x, y) for a single-task module), "
                f"got {_describe(batch)}"
            )
        x, y = batch
        if not isinstance(x, torch.Tensor):
            raise BatchFormatError(f"batch[0] (x) must be a tensor, got {_describe(x)}")
        if isinstance(y, torch.Tensor):
            if len(self.tasks) != 1:
                raise BatchFormatError(
                    f"batch[1] is one tensor, but the module has {len(self.tasks)} tasks "
                    f"{list(self.tasks)}: pass (x, {{task: y}})"
                )
            return x, {next(iter(self.tasks)): y}
        if not isinstance(y, Mapping):
            raise BatchFormatError(f"batch[1] must be {{task: y}}, got {_describe(y)}")
        missing = [t for t in self.tasks if t not in y]
        if missing:
            raise BatchFormatError(
                f"batch[1] has no targets for tasks {missing} (it has {sorted(map(str, y))})"
            )
        return x, dict(y)

    def task_losses(
        self,
        logits: Mapping[str, torch.Tensor],
        targets: Mapping[str, torch.Tensor],
        label_masks: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-task losses; ``label_masks``: cross-entropy over the classes a client holds
        (multiclass tasks only; other kinds ignore masks)."""
        masks = label_masks or {}
        return {
            t: task.compute_loss(logits[t], targets[t], masks.get(t))
            for t, task in self.tasks.items()
        }

    def training_step(
        self, batch: Batch, batch_idx: int = 0, train: TrainSpec | None = None
    ) -> torch.Tensor:
        """The summed task loss (+ ``train.prox``), masked by ``train.label_masks``."""
        if train is not None:  # the federation's Fabric loop: its own batches, no logging
            x, targets = batch
            losses = self.task_losses(self(x), targets, train.label_masks)
            loss = torch.stack(list(losses.values())).sum()
            if train.prox is not None and train.prox.lam > 0:
                loss = loss + train.prox(dict(self.model.named_parameters()))
            return loss
        x, targets = self.split_batch(batch)
        logits = self(x)
        losses = self.task_losses(logits, targets)
        loss = torch.stack(list(losses.values())).sum()
        if self._trainer is not None:  # a Trainer's loggers (never under Fabric)
            n = x.shape[0]
            self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
            self._log_tasks("train", logits, targets, losses, n)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int = 0) -> torch.Tensor:
        """Logs ``val_loss``, ``val_loss/<task>`` and ``val_<metric>/<task>``."""
        return self._eval_step("val", batch)

    def test_step(self, batch: Batch, batch_idx: int = 0) -> torch.Tensor:
        """Logs ``test_loss``, ``test_loss/<task>`` and ``test_<metric>/<task>``."""
        return self._eval_step("test", batch)

    def _eval_step(self, stage: str, batch: Batch) -> torch.Tensor:
        x, targets = self.split_batch(batch)
        logits = self(x)
        losses = self.task_losses(logits, targets)
        loss = torch.stack(list(losses.values())).sum()
        if self._trainer is not None:
            n = x.shape[0]
            self.log(f"{stage}_loss", loss, on_epoch=True, prog_bar=True, batch_size=n)
            self._log_tasks(stage, logits, targets, losses, n)
        return loss

    def _log_tasks(
        self,
        stage: str,
        logits: Mapping[str, torch.Tensor],
        targets: Mapping[str, torch.Tensor],
        losses: Mapping[str, torch.Tensor],
        n: int,
    ) -> None:
        for t, task in self.tasks.items():
            vals = {f"{stage}_loss/{t}": float(losses[t].detach())}
            metrics = task.compute_metrics(logits[t].detach(), targets[t])
            vals.update({f"{stage}_{k}/{t}": v for k, v in metrics.items()})
            self.log_dict(vals, on_step=False, on_epoch=True, batch_size=n)

    @torch.no_grad()
    def evaluate(
        self,
        x: torch.Tensor,
        targets: Mapping[str, torch.Tensor],
        label_masks: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, dict]:
        """Per-task metrics on held-out data: {task: {"loss", "acc", ...}} (each task's
        metrics: ``f1`` for multi-label, ``mse``/``mae`` for regression); the losses use
        ``label_masks`` as training does (accuracy is over all classes)."""
        was_training = self.training
        self.eval()
        logits = self(x)
        losses = self.task_losses(logits, targets, label_masks)
        out: dict[str, dict[str, float]] = {}
        for t, task in self.tasks.items():
            out[t] = {"loss": losses[t].item(), **task.compute_metrics(logits[t], targets[t])}
        self.train(was_training)
        return out

    # ------------------------------------------------------------------ optim
    def trainable_parameters(self, keys: frozenset[str] | None = None) -> list[nn.Parameter]:
        """The parameters named in ``keys`` (all when ``None``); buffers are skipped."""
        named = self.model.named_parameters()
        if keys is None:
            return [p for _, p in named]
        return [p for k, p in named if k in keys]

    def configure_optimizers(self, keys: frozenset[str] | None = None) -> torch.optim.Optimizer:
        """SGD over ``keys`` (a :class:`TrainSpec`'s; ``None``: every parameter)."""
        return torch.optim.SGD(
            self.trainable_parameters(keys),
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )


def _task_map(tasks: Mapping[str, Task] | Iterable[Task]) -> dict[str, Task]:
    """``{name: Task}`` from a mapping or an iterable of Tasks; keys must be the names."""
    if isinstance(tasks, Mapping):
        items = list(tasks.items())
    else:
        items = [(getattr(t, "name", None), t) for t in tasks]
    if not items:
        raise TaskDefinitionError("a MultiTaskModule needs at least one task", field="tasks")
    out = {}
    for name, task in items:
        if not isinstance(task, Task):
            raise TaskDefinitionError(
                f"tasks[{name!r}] must be a fmtl_lightning.tasks.Task (register_task / "
                f"get_task), got {type(task).__name__}",
                field="tasks",
            )
        if name != task.name:
            raise TaskDefinitionError(
                f"tasks[{name!r}] holds task {task.name!r}: keys must be the task names",
                field="name",
            )
        out[name] = task
    return out


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"a tensor of shape {tuple(v.shape)}"
    if isinstance(v, tuple | list):
        return f"a {type(v).__name__} of {len(v)}: [{', '.join(_describe(x) for x in v[:3])}]"
    return type(v).__name__
