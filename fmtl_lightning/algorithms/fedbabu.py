"""``fedbabu`` (Oh et al., ICLR 2022): the heads stay frozen at their initialisation
during federated training; only the body (every non-head parameter) trains, and the
shared part of it is aggregated. Before evaluation each client fine-tunes its heads
alone for ``algorithm.finetune_epochs`` epochs, on an evaluation-time copy.

Heads are local under the configured policy, so each client's heads are the common
initialisation for the whole run (nothing to send); the ModelSpec's kinds, not layer
names, say what a head is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fmtl_lightning.algorithms.base import (
    Algorithm,
    ClientResult,
    ClientRound,
    FitContext,
    Phase,
    head_keys,
    train_jointly,
)


@dataclass(frozen=True)
class FedBABU(Algorithm):
    name: ClassVar[str] = "fedbabu"
    title: ClassVar[str] = "FedBABU"

    def train(self, cr: ClientRound) -> ClientResult:
        heads = head_keys(cr)
        body = frozenset(k for k in cr.param_names() if k not in heads)
        return train_jointly(cr, Phase("body", body))

    def finetune(self, ctx: FitContext) -> Phase | None:
        epochs = ctx.hparams.finetune_epochs
        return Phase("finetune", head_keys(ctx), epochs=epochs) if epochs > 0 else None
