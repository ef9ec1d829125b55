"""Local fits that run a user's own LightningModule steps, and Lightning Callbacks.

A model given as :meth:`FederatedModel.from_model(lit, head=..., ...)
<fmtl_lightning.model_source.FederatedModel.from_model>` keeps the user's class as its
backbone (a width-sliced deep copy; its head slot holds ``nn.Identity`` between fits).
For one fit, :class:`OwnSteps` puts the task's head (at the client's width) back in the
head slot, so inside the user's methods ``self`` *is* the client-width model:

* ``configure_optimizers()`` is called once per fit; ``self.parameters()`` are the
  client-width parameters, and those outside the phase's keys have
  ``requires_grad=False`` (torch optimisers skip them: no step, no decay, no moments).
  It may return an optimiser, ``[optimiser]``, ``([optimiser], [scheduler])`` or
  ``{"optimizer": ..., "lr_scheduler": ...}`` (a scheduler, or a dict with
  ``"scheduler"`` and ``"interval"``: ``"epoch"`` (default) or ``"step"``); optimiser
  state and schedules start afresh in every fit. The first task's head is in the slot
  then; the other tasks' heads join the param groups of its parameters. A class that does not override it
  trains with the run's ``optimizer`` (SGD).
* ``training_step(batch, batch_idx)`` gets batches in the user's format ``(x, y)``
  (``batch_idx`` counts from 0 in each epoch) and returns the loss (or
  ``{"loss": ...}``); the algorithm's prox pull (Ditto, FedProx) is added to it. A
  multi-task client runs it once per task, with that task's head in the slot, on
  ``(x, y_task)``, and steps on the sum of the losses.

Callbacks (``FederatedModel.from_model(..., callbacks=[...])`` plus the module's own
``configure_callbacks()``) are called in every local fit, under the run's one Fabric
(:func:`fmtl_lightning.local_fit.fit`), with the arguments of a Lightning ``Callback``;
the ``trainer`` argument is the fit's :class:`LocalFit` (no Trainer exists; not
``Fabric(callbacks=)``, which also calls every LightningModule it set up): ``on_train_start``, ``on_train_epoch_start``, ``on_train_batch_start``,
``on_before_backward``, ``on_after_backward``, ``on_before_optimizer_step``,
``on_train_batch_end``, ``on_train_epoch_end``, ``on_train_end``. The module's own
hooks of the same names are called after the callbacks'.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeGuard

import lightning as L
import torch
from torch import nn

from fmtl_lightning.errors import OwnStepsError
from fmtl_lightning.models import head_name

if TYPE_CHECKING:
    from fmtl_lightning.model_source import ClientModel


@dataclass
class LocalFit:
    """What a callback's ``trainer`` argument is in a federated local fit."""

    fabric: L.Fabric
    num_batches: int  # batches of this fit
    batches_per_epoch: int
    max_epochs: int  # epochs this fit starts (the last may be partial under local_steps)
    info: Mapping[str, Any] = field(default_factory=dict)  # client, round, phase, width
    current_epoch: int = 0
    global_step: int = 0  # optimiser steps taken in this fit

    @property
    def client(self) -> str | None:
        return self.info.get("client")

    @property
    def round(self) -> int | None:
        return self.info.get("round")

    @property
    def phase(self) -> str | None:
        return self.info.get("phase")


class _Columns(nn.Module):
    """A task's columns ``[a, b)`` of a union head (FedAvg's single global head)."""

    def __init__(self, head: nn.Module, a: int, b: int) -> None:
        super().__init__()
        self.head, self.a, self.b = head, a, b

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats)[:, self.a : self.b]


def overrides(model: nn.Module, name: str) -> TypeGuard[L.LightningModule]:
    """Whether ``model``'s class defines ``name`` itself (not LightningModule's default)."""
    return isinstance(model, L.LightningModule) and (
        getattr(type(model), name, None) is not getattr(L.LightningModule, name)
    )


@dataclass(frozen=True)
class OwnSteps:
    """The head slot (a submodule path of the user's module) the task heads go into."""

    head: str

    def check(self, model: nn.Module) -> None:
        """Refuse, naming why, a module whose steps cannot drive a local fit."""
        name = type(model).__name__
        if not overrides(model, "training_step"):
            raise OwnStepsError(f"own_steps: {name} defines no training_step")
        if not model.automatic_optimization:
            raise OwnStepsError(
                f"own_steps: {name}.automatic_optimization is False; federated local fits "
                "step the optimiser themselves (manual optimisation needs a Trainer)"
            )

    def _slot(self, backbone: nn.Module) -> tuple[nn.Module, str]:
        parent, _, leaf = self.head.rpartition(".")
        return (backbone.get_submodule(parent) if parent else backbone), leaf

    def attach(self, backbone: nn.Module, head: nn.Module) -> None:
        """Put ``head`` in the head slot (for one task's ``training_step``)."""
        parent, leaf = self._slot(backbone)
        setattr(parent, leaf, head)

    def detach(self, backbone: nn.Module) -> None:
        """Back to ``nn.Identity``: the backbone maps inputs to features again."""
        self.attach(backbone, nn.Identity())

    def task_heads(
        self,
        model: ClientModel,
        tasks: Sequence[str],
        union_slices: Mapping[str, tuple[int, int]] | None,
    ) -> dict[str, nn.Module]:
        """task -> the module a ``training_step`` for that task sees as its head."""
        if union_slices is None:
            return {t: model.heads[head_name(t)] for t in tasks}
        (union,) = model.heads.values()
        return {t: _Columns(union, *union_slices[t]) for t in tasks}

    def optimizers(self, module: L.LightningModule) -> tuple[torch.optim.Optimizer, Any, str]:
        """(optimiser, scheduler or None, its interval) from ``configure_optimizers()``."""
        name = f"{type(module).__name__}.configure_optimizers()"
        out: Any = module.configure_optimizers()  # the user's return, checked below
        opt: Any
        sched: Any = None
        if isinstance(out, Mapping):
            opt, sched = out.get("optimizer"), out.get("lr_scheduler")
        elif (
            isinstance(out, Sequence)
            and len(out) == 2
            and all(isinstance(o, Sequence) for o in out)
        ):
            opts, scheds = out
            if len(scheds) > 1:
                raise OwnStepsError(f"{name}: returns {len(scheds)} schedulers; give one")
            opt, sched = (opts[0] if len(opts) == 1 else opts), (scheds[0] if scheds else None)
        elif isinstance(out, Sequence):
            opt = out[0] if len(out) == 1 else out
        else:
            opt = out
        if not isinstance(opt, torch.optim.Optimizer):
            raise OwnStepsError(
                f"{name}: must give one torch optimizer (federated fits step one), got "
                f"{type(opt).__name__}"
            )
        interval = "epoch"
        if isinstance(sched, Mapping):
            interval = sched.get("interval", "epoch")
            sched = sched.get("scheduler")
            if interval not in ("epoch", "step"):
                raise OwnStepsError(f"{name}: lr_scheduler interval must be 'epoch' or "
                                    f"'step', got {interval!r}")  # fmt: skip
        return opt, sched, interval


def cover_heads(optimizer: torch.optim.Optimizer, heads: Sequence[nn.Module]) -> None:
    """Give the other tasks' heads the optimiser treatment of the first (the one in the
    slot during ``configure_optimizers``): each parameter joins the param group of the
    first head's parameter at the same position (when the heads have as many parameters;
    else the group of its first). Heads the user left out of the optimiser stay out."""
    first = list(heads[0].parameters())
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    groups = [group_of.get(id(p)) for p in first]
    for head in heads[1:]:
        params = list(head.parameters())
        for i, p in enumerate(params):
            g = groups[i] if len(params) == len(first) else (groups[0] if groups else None)
            if g is not None and id(p) not in group_of:
                g["params"].append(p)
                group_of[id(p)] = g


def step_loss(out: Any, name: str) -> torch.Tensor:
    """The loss of a ``training_step``'s return value (a tensor or ``{"loss": ...}``)."""
    if isinstance(out, Mapping):
        out = out.get("loss")
    if not isinstance(out, torch.Tensor) or out.ndim != 0:
        raise OwnStepsError(
            f"{name}.training_step must return a scalar loss tensor (or {{'loss': ...}}), "
            f"got {type(out).__name__}"
        )
    return out
