"""``local``: no federation. Each client's personal model trains alone; nothing is sent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fmtl_lightning.algorithms.base import Algorithm, ClientResult, ClientRound, train_personal


@dataclass(frozen=True)
class Local(Algorithm):
    name: ClassVar[str] = "local"
    title: ClassVar[str] = "Local"
    policy: ClassVar[str | None] = "local"  # every key stays on the client
    evaluates_personal: ClassVar[bool] = True

    def train(self, cr: ClientRound) -> ClientResult:
        personal = train_personal(cr, 0.0)  # one "personal" phase, no pull
        return ClientResult(None, {}, personal, cr.client.num_train)
