"""What one client does in one round, per algorithm. One small function each.

Every procedure receives a :class:`ClientRound` (the module at the client's
width, already loaded with the received shared arrays and the client's own local
state) and returns the trained arrays. The round loop in ``simulation.py`` owns
slicing, aggregation, evaluation and checkpoints; none of that is repeated here.

* ``local``  - no federation: the personal model trains alone.
* ``fedavg`` - one global model (union head shared); plain local SGD.
* ``fedper`` - shared backbone + local heads, trained jointly.
* ``fedrep`` - head epochs (body frozen), then body epochs (head frozen); the head is
  what the ModelSpec keeps local (heads, FedBN's norms), the body what it shares.
* ``ditto``  - (a) train the global copy and return it; (b) train the personal
  model with lam/2 ||v - w_t||^2 on the shared keys, anchored at round start.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

import lightning as L
import numpy as np
import torch

from fmtl_lightning.fed_data import ClientData
from fmtl_lightning.local_fit import FitPlan, fit, phase_seed
from fmtl_lightning.models import load_arrays, state_arrays
from fmtl_lightning.module import MultiTaskModule, ProxTerm


@dataclass
class ClientRound:
    fabric: L.Fabric
    module: MultiTaskModule
    client: ClientData
    client_idx: int
    round_idx: int
    seed: int
    plan: FitPlan
    shared_keys: tuple[str, ...]
    received: Mapping[str, np.ndarray]  # shared arrays at the client's width
    local: Mapping[str, np.ndarray]  # the client's local arrays at its width
    personal: Mapping[str, np.ndarray] | None  # Ditto/local personal model at its width
    lam: float = 0.0
    rep_head_epochs: int = 1
    phases: list[str] | None = None  # filled with the phases run, in order (for tests)

    def run(
        self, phase: str, keys: Iterable[str] | None = None, plan: FitPlan | None = None
    ) -> None:
        """One fit; ``keys``: the parameters it trains (``None``: all)."""
        self.module.train_keys = None if keys is None else frozenset(keys)
        if self.phases is not None:
            self.phases.append(phase)
        c = self.client
        fit(
            self.fabric,
            self.module,
            c.x_train,
            c.y_train,
            plan or self.plan,
            phase_seed(self.seed, self.round_idx, self.client_idx, phase),
        )
        self.module.train_keys = None


@dataclass
class ClientResult:
    shared: dict[str, np.ndarray] | None  # what goes to the server (None: nothing)
    local: dict[str, np.ndarray]  # the client's new local arrays at its width
    personal: dict[str, np.ndarray] | None
    num_examples: int


def _split(cr: ClientRound, state: dict[str, np.ndarray]) -> tuple[dict, dict]:
    shared = {k: state[k] for k in cr.shared_keys}
    local = {k: v for k, v in state.items() if k not in shared}
    return shared, local


def _load(cr: ClientRound, *parts: Mapping[str, np.ndarray]) -> None:
    merged: dict[str, np.ndarray] = {}
    for p in parts:
        merged.update(p)
    load_arrays(cr.module.model, merged)


def _train_jointly(cr: ClientRound) -> ClientResult:
    _load(cr, cr.received, cr.local)
    cr.run("global")
    shared, local = _split(cr, state_arrays(cr.module.model))
    return ClientResult(shared, local, None, cr.client.num_train)


def _fedrep(cr: ClientRound) -> ClientResult:
    _load(cr, cr.received, cr.local)
    body = set(cr.shared_keys)  # the roles the ModelSpec declares, never layer names
    names = [k for k, _ in cr.module.model.named_parameters()]
    if cr.rep_head_epochs > 0:
        head_plan = replace(cr.plan, epochs=cr.rep_head_epochs, steps=None)
        cr.run("head", [k for k in names if k not in body], plan=head_plan)
    cr.run("body", [k for k in names if k in body])
    shared, local = _split(cr, state_arrays(cr.module.model))
    return ClientResult(shared, local, None, cr.client.num_train)


def _train_personal(cr: ClientRound, lam: float) -> dict[str, np.ndarray]:
    assert cr.personal is not None, "personal state is created by the round loop"
    _load(cr, cr.personal)
    anchor = {k: torch.from_numpy(np.array(cr.received[k])) for k in cr.shared_keys}
    anchor = {k: v for k, v in anchor.items() if v.is_floating_point()}
    names = dict(cr.module.model.named_parameters())
    cr.module.prox = ProxTerm(lam, {k: v for k, v in anchor.items() if k in names})
    try:
        cr.run("personal")
    finally:
        cr.module.prox = None
    return state_arrays(cr.module.model)


def _local(cr: ClientRound) -> ClientResult:
    personal = _train_personal(cr, 0.0)
    return ClientResult(None, {}, personal, cr.client.num_train)


def _ditto(cr: ClientRound) -> ClientResult:
    glob = _train_jointly(cr)  # (a) the global copy, with the client's global-copy heads
    personal = _train_personal(cr, cr.lam)  # (b) the personal model, pulled toward w_t
    return ClientResult(glob.shared, glob.local, personal, cr.client.num_train)


PROCEDURES: dict[str, Callable[[ClientRound], ClientResult]] = {
    "local": _local,
    "fedavg": _train_jointly,
    "fedper": _train_jointly,
    "fedrep": _fedrep,
    "ditto": _ditto,
}

# which model a client is evaluated with: its personal one, or global shared + its local
EVAL_PERSONAL = {"local": True, "ditto": True, "fedavg": False, "fedper": False, "fedrep": False}
