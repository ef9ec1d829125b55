"""``ditto``: (a) train the global copy (with the client's global-copy heads) and send
its shared part; (b) train the personal model with ``lam/2 ||v - w_t||^2`` on the shared
parameters, anchored at the received ``w_t``. Evaluated with the personal model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fmtl_lightning.algorithms.base import (
    Algorithm,
    ClientResult,
    ClientRound,
    train_jointly,
    train_personal,
)


@dataclass(frozen=True)
class Ditto(Algorithm):
    name: ClassVar[str] = "ditto"
    title: ClassVar[str] = "Ditto"
    evaluates_personal: ClassVar[bool] = True

    def train(self, cr: ClientRound) -> ClientResult:
        glob = train_jointly(cr)  # (a) "global" phase
        personal = train_personal(cr, cr.lam)  # (b) "personal" phase, pulled toward w_t
        return ClientResult(glob.shared, glob.local, personal, cr.client.num_train)
