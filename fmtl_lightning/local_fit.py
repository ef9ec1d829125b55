"""The thin loop around Lightning that runs one client's local training.

A ``Trainer`` per client per round would cost ~80 ms of setup each time, so the
federation runs every fit through one long-lived :class:`lightning.Fabric`: the
client's :class:`MultiTaskModule` supplies ``training_step`` and
``configure_optimizers`` exactly as it would under a Trainer (or a user's own
LightningModule does, :mod:`fmtl_lightning.own_steps`), and a user's Lightning
Callbacks get Lightning's training hooks.

Batch order comes from a numpy generator seeded by (run seed, round, client,
phase), never from global RNG state, so a resumed run replays the same batches
and an edge client (numpy + onnxruntime) sees the very same batches. Randomness
inside a model (dropout) uses torch's RNG seeded by the same seed, in a forked RNG
state that leaves the caller's untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import lightning as L
import torch

from fmtl_lightning.errors import OwnStepsError
from fmtl_lightning.module import MultiTaskModule, TrainSpec
from fmtl_lightning.own_steps import LocalFit, OwnSteps, cover_heads, overrides, step_loss
from mobile_client.batching import batch_order, num_batches


@dataclass(frozen=True)
class FitPlan:
    """How much local work one fit does: whole epochs, or exactly ``steps`` SGD steps.
    ``drop_last`` (epochs only): each pass skips its last batch when it is short, as
    PyTorch's ``DataLoader(drop_last=True)`` does."""

    batch_size: int
    epochs: int = 1
    steps: int | None = None
    drop_last: bool = False

    def batches_per_epoch(self, n: int) -> int:
        """Batches one pass over ``n`` examples yields."""
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def num_batches(self, n: int) -> int:
        """Batches of the whole fit over ``n`` examples."""
        if self.drop_last and self.steps is None:
            return self.epochs * self.batches_per_epoch(n)
        return num_batches(n, self.batch_size, self.epochs, self.steps)


def batch_indices(n: int, plan: FitPlan, seed: int) -> Iterator[torch.Tensor]:
    """Shuffled mini-batch index tensors, in exactly the order an edge client uses.

    Delegates to :func:`mobile_client.batching.batch_order` (numpy), so a Lightning
    client and an ONNX Runtime client with the same seed see the same batches;
    ``plan.drop_last`` leaves out each pass's short last batch (same permutations).
    """
    if plan.drop_last and plan.steps is not None:
        raise ValueError("FitPlan: drop_last counts whole epochs; it cannot take steps")
    for idx in batch_order(n, plan.batch_size, plan.epochs, plan.steps, seed):
        if plan.drop_last and idx.size < plan.batch_size:
            continue
        yield torch.from_numpy(idx)


def fit(
    fabric: L.Fabric,
    module: MultiTaskModule,
    x: torch.Tensor,
    y: dict[str, torch.Tensor],
    plan: FitPlan,
    seed: int,
    train: TrainSpec | None = None,
    info: Mapping[str, Any] | None = None,
    *,
    callbacks: Sequence[Any] = (),
) -> tuple[int, float]:
    """Run local SGD on ``module`` in place. Returns (steps taken, mean training loss).

    ``train``: which parameters step, the prox pull and the label masks (default: all
    parameters, plain loss); it reaches the module as an argument, never as state.
    A user's LightningModule with its own steps (``module.model.own_steps``) trains with
    its own ``configure_optimizers`` and ``training_step`` (:mod:`fmtl_lightning.own_steps`).
    ``callbacks`` (Lightning Callbacks) get Lightning's training hooks, their ``trainer``
    argument a :class:`~fmtl_lightning.own_steps.LocalFit` carrying ``info`` (client,
    round, phase, width)."""
    train = train or TrainSpec()
    module.train()
    own: OwnSteps | None = getattr(module.model, "own_steps", None)
    named = dict(module.model.named_parameters())  # before a user's head slot is filled
    # parameters the optimiser does not step need no gradient: a head-only phase then
    # back-propagates through the head alone (same updates, a fraction of the work)
    frozen = [
        p
        for k, p in named.items()
        if train.keys is not None and k not in train.keys and p.requires_grad
    ]
    optimizer = module.configure_optimizers(train.keys)
    if own is None:
        target: L.LightningModule = module
    else:
        if train.label_masks:
            raise OwnStepsError(
                "algorithm.masked_ce: label masks cannot reach a user's own training_step; "
                "turn masked_ce off or mask inside the step"
            )
        # own steps: the backbone is the user's LightningModule (from_model checks it)
        target = cast(L.LightningModule, module.model.backbone)
        heads = own.task_heads(module.model, list(module.tasks), module.union_slices)
        own.attach(target, next(iter(heads.values())))
    for p in frozen:
        p.requires_grad_(False)
    try:
        sched, interval = None, "epoch"
        if own is not None and overrides(target, "configure_optimizers"):
            optimizer, sched, interval = own.optimizers(target)
            cover_heads(optimizer, list(heads.values()))
        wrapped, optimizer = fabric.setup(target, optimizer)
        # randomness inside the model (dropout in a user's model) draws from torch's RNG,
        # seeded like the batch order and isolated from the caller's: a resumed run replays it
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            n = x.shape[0]
            per_epoch = max(plan.batches_per_epoch(n), 1)  # 0: drop_last, n < batch_size
            count = plan.num_batches(n)
            state = LocalFit(fabric, count, per_epoch, -(-count // per_epoch), dict(info or {}))

            def hook(name: str, *args: Any) -> None:
                for cb in callbacks:
                    method = getattr(cb, name, None)
                    if method is not None:
                        method(state, target, *args)
                if own is not None:
                    getattr(target, name)(*args)

            steps, total = 0, 0.0
            hook("on_train_start")
            for idx in batch_indices(n, plan, seed):
                epoch, b = divmod(steps, per_epoch)
                if b == 0:
                    state.current_epoch = epoch
                    hook("on_train_epoch_start")
                if own is None:
                    batch: Any = (x[idx], {t: v[idx] for t, v in y.items()})
                    hook("on_train_batch_start", batch, b)
                    optimizer.zero_grad(set_to_none=True)
                    loss = outputs = wrapped.training_step(batch, steps, train=train)
                else:
                    xb, ys = x[idx], {t: v[idx] for t, v in y.items()}
                    batch = (xb, next(iter(ys.values()))) if len(ys) == 1 else (xb, ys)
                    hook("on_train_batch_start", batch, b)
                    optimizer.zero_grad(set_to_none=True)
                    losses = []
                    for t, head in heads.items():
                        own.attach(target, head)
                        outputs = wrapped.training_step((xb, ys[t]), b)
                        losses.append(step_loss(outputs, type(target).__name__))
                    loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
                    if len(losses) > 1:
                        outputs = loss
                    if train.prox is not None and train.prox.lam > 0:
                        loss = loss + train.prox(named)
                hook("on_before_backward", loss)
                fabric.backward(loss)
                hook("on_after_backward")
                hook("on_before_optimizer_step", optimizer)
                optimizer.step()
                state.global_step += 1
                if sched is not None and interval == "step":
                    sched.step()
                total += float(loss.detach())
                steps += 1
                hook("on_train_batch_end", outputs, batch, b)
                if b == per_epoch - 1 or steps == count:
                    hook("on_train_epoch_end")
                    if sched is not None and interval == "epoch":
                        sched.step()
            hook("on_train_end")
    finally:
        for p in frozen:
            p.requires_grad_(True)
        if own is not None:
            own.detach(target)
    return steps, total / max(steps, 1)
