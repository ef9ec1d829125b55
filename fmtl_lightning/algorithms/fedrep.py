"""``fedrep``: ``algorithm.rep_head_epochs`` epochs of the local part (body frozen), then
the run's local work on the shared part (head frozen). The local part is what the
ModelSpec keeps local (heads, FedBN's norms), the shared part what it sends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fmtl_lightning.algorithms.base import (
    Algorithm,
    ClientResult,
    ClientRound,
    Phase,
    load,
    result,
)


@dataclass(frozen=True)
class FedRep(Algorithm):
    name: ClassVar[str] = "fedrep"
    title: ClassVar[str] = "FedRep"

    def train(self, cr: ClientRound) -> ClientResult:
        assert cr.received is not None and cr.local is not None
        load(cr, cr.received, cr.local)
        body = set(cr.shared_keys)  # the roles the ModelSpec declares, never layer names
        names = cr.param_names()
        if cr.hparams.rep_head_epochs > 0:
            head = frozenset(k for k in names if k not in body)
            cr.run(Phase("head", head, epochs=cr.hparams.rep_head_epochs))
        cr.run(Phase("body", frozenset(k for k in names if k in body)))
        return result(cr)
