"""The thin loop around Lightning that runs one client's local training.

A ``Trainer`` per client per round would cost ~80 ms of setup each time, so the
federation runs every fit through one long-lived :class:`lightning.Fabric`: the
client's :class:`MultiTaskModule` supplies ``training_step`` and
``configure_optimizers`` exactly as it would under a Trainer.

Batch order comes from a numpy generator seeded by (run seed, round, client,
phase), never from global RNG state, so a resumed run replays the same batches
and an edge client (numpy + onnxruntime) sees the very same batches. Randomness
inside a model (dropout) uses torch's RNG seeded by the same seed, in a forked RNG
state that leaves the caller's untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import lightning as L
import torch

from fmtl_lightning.module import MultiTaskModule, TrainSpec
from mobile_client.batching import batch_order


@dataclass(frozen=True)
class FitPlan:
    """How much local work one fit does: whole epochs, or exactly ``steps`` SGD steps."""

    batch_size: int
    epochs: int = 1
    steps: int | None = None


def batch_indices(n: int, plan: FitPlan, seed: int) -> Iterator[torch.Tensor]:
    """Shuffled mini-batch index tensors, in exactly the order an edge client uses.

    Delegates to :func:`mobile_client.batching.batch_order` (numpy), so a Lightning
    client and an ONNX Runtime client with the same seed see the same batches.
    """
    for idx in batch_order(n, plan.batch_size, plan.epochs, plan.steps, seed):
        yield torch.from_numpy(idx)


def fit(
    fabric: L.Fabric,
    module: MultiTaskModule,
    x: torch.Tensor,
    y: dict[str, torch.Tensor],
    plan: FitPlan,
    seed: int,
    train: TrainSpec | None = None,
) -> tuple[int, float]:
    """Run local SGD on ``module`` in place. Returns (steps taken, mean training loss).

    ``train``: which parameters step, the prox pull and the label masks (default: all
    parameters, plain loss); it reaches the module as an argument, never as state."""
    train = train or TrainSpec()
    module.train()
    optimizer = module.configure_optimizers(train.keys)
    wrapped, optimizer = fabric.setup(module, optimizer)
    # parameters the optimiser does not step need no gradient: a head-only phase then
    # back-propagates through the head alone (same updates, a fraction of the work)
    frozen = [
        p
        for k, p in module.model.named_parameters()
        if train.keys is not None and k not in train.keys and p.requires_grad
    ]
    for p in frozen:
        p.requires_grad_(False)
    steps, total = 0, 0.0
    # randomness inside the model (dropout in a user's model) draws from torch's RNG,
    # seeded like the batch order and isolated from the caller's: a resumed run replays it
    rng = torch.random.fork_rng(devices=[])
    rng.__enter__()
    torch.manual_seed(seed)
    try:
        for idx in batch_indices(x.shape[0], plan, seed):
            batch = (x[idx], {t: v[idx] for t, v in y.items()})
            optimizer.zero_grad(set_to_none=True)
            loss = wrapped.training_step(batch, steps, train=train)
            fabric.backward(loss)
            optimizer.step()
            total += float(loss.detach())
            steps += 1
    finally:
        rng.__exit__(None, None, None)
        for p in frozen:
            p.requires_grad_(True)
    return steps, total / max(steps, 1)
