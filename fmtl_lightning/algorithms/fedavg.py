"""``fedavg``: one global model. Its single head spans the union of every task's outputs
and is shared with the rest; local SGD on all parameters ("global" phase)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fmtl_lightning.algorithms.base import Algorithm, ClientResult, ClientRound, train_jointly


@dataclass(frozen=True)
class FedAvg(Algorithm):
    name: ClassVar[str] = "fedavg"
    title: ClassVar[str] = "FedAvg"
    policy: ClassVar[str | None] = "fedavg"  # everything trained is sent
    union_head: ClassVar[bool] = True

    def train(self, cr: ClientRound) -> ClientResult:
        return train_jointly(cr)
