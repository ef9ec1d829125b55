"""The LightningModule of one client's multi-task model. It knows nothing about rounds.

It holds a :class:`MultiTaskModel` (backbone at the client's width + task heads),
sums per-task losses, and measures per-task metrics with torchmetrics. How one fit
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

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from fmtl_lightning.models import MultiTaskModel, head_name

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
    """Shared backbone + private heads; ``training_step`` returns the summed task loss."""

    def __init__(
        self,
        model: MultiTaskModel,
        task_kinds: Mapping[str, str],
        *,
        lr: float = 0.05,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        union_slices: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.task_kinds = dict(task_kinds)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        # FedAvg's union head: task -> (start, stop) columns of the single shared head
        self.union_slices = dict(union_slices) if union_slices else None
        self.metrics = nn.ModuleDict(
            {head_name(t): _metric(k, self._n_out(t)) for t, k in self.task_kinds.items()}
        )

    def _n_out(self, task: str) -> int:
        if self.union_slices is not None:
            a, b = self.union_slices[task]
            return b - a
        return self.model.task_outputs[task]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(x)
        if self.union_slices is None:
            return out
        (union,) = out.values()  # (B, sum of all tasks' outputs)
        return {t: union[:, a:b] for t, (a, b) in self.union_slices.items() if t in self.task_kinds}

    def task_losses(
        self,
        logits: Mapping[str, torch.Tensor],
        targets: Mapping[str, torch.Tensor],
        label_masks: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-task losses; ``label_masks``: cross-entropy over the classes a client holds."""
        masks = label_masks or {}
        losses = {}
        for t, kind in self.task_kinds.items():
            z, y = logits[t], targets[t]
            if kind == "multiclass":
                if t in masks:
                    z = z.masked_fill(~masks[t], -1e9)
                losses[t] = F.cross_entropy(z, y)
            else:
                losses[t] = F.binary_cross_entropy_with_logits(z, y)
        return losses

    def training_step(
        self, batch: Batch, batch_idx: int = 0, train: TrainSpec | None = None
    ) -> torch.Tensor:
        """The summed task loss (+ ``train.prox``), masked by ``train.label_masks``."""
        x, targets = batch
        spec = train or TrainSpec()
        losses = self.task_losses(self(x), targets, spec.label_masks)
        loss = torch.stack(list(losses.values())).sum()
        if spec.prox is not None and spec.prox.lam > 0:
            loss = loss + spec.prox(dict(self.model.named_parameters()))
        self.log("train_loss", loss, prog_bar=False, logger=False)
        return loss

    @torch.no_grad()
    def evaluate(
        self,
        x: torch.Tensor,
        targets: Mapping[str, torch.Tensor],
        label_masks: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, dict]:
        """Per-task metrics on held-out data: {task: {"loss", "acc", ["f1"]}}; the losses
        use ``label_masks`` as training does (accuracy is over all classes)."""
        was_training = self.training
        self.eval()
        logits = self(x)
        losses = self.task_losses(logits, targets, label_masks)
        out: dict[str, dict[str, float]] = {}
        for t, kind in self.task_kinds.items():
            m: Any = self.metrics[head_name(t)]  # a torchmetrics Metric
            z, y = logits[t], targets[t]
            m.reset()
            if kind == "multiclass":
                m.update(z, y)
                out[t] = {"loss": losses[t].item(), "acc": float(m.compute())}
            else:
                m.update(z, y.int())
                # element-wise accuracy over all labels, next to torchmetrics' macro F1
                acc = ((z > 0).float() == y).float().mean().item()
                out[t] = {"loss": losses[t].item(), "acc": acc, "f1": float(m.compute())}
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


def _metric(kind: str, n: int) -> Any:
    if kind == "multiclass":
        return torchmetrics.classification.MulticlassAccuracy(
            num_classes=max(n, 2), average="micro"
        )
    return torchmetrics.classification.MultilabelF1Score(num_labels=n, average="macro")
