"""``fedavg_ft``: FedAvg (one global model, union head, everything shared), then, before
evaluation, each client fine-tunes the whole global model on its own training split for
``algorithm.finetune_epochs`` epochs, on an evaluation-time copy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fmtl_lightning.algorithms.base import FitContext, Phase
from fmtl_lightning.algorithms.fedavg import FedAvg


@dataclass(frozen=True)
class FedAvgFT(FedAvg):
    name: ClassVar[str] = "fedavg_ft"
    title: ClassVar[str] = "FedAvg+FT"

    def finetune(self, ctx: FitContext) -> Phase | None:
        epochs = ctx.hparams.finetune_epochs
        return Phase("finetune", None, epochs=epochs) if epochs > 0 else None
