"""``fedper``: shared body + local heads, trained jointly ("global" phase). What is
shared is the configured policy (``fedper``: backbone and norms; ``fedbn``: no norms)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fmtl_lightning.algorithms.base import Algorithm, ClientResult, ClientRound, train_jointly


@dataclass(frozen=True)
class FedPer(Algorithm):
    name: ClassVar[str] = "fedper"
    title: ClassVar[str] = "FedPer"
    edge_clients: ClassVar[bool] = True  # the exported step graphs train exactly this

    def train(self, cr: ClientRound) -> ClientResult:
        return train_jointly(cr)
