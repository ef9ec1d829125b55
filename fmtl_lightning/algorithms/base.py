"""The shape of a client algorithm, and the machinery every algorithm shares.

An :class:`Algorithm` declares, in its own file (``fmtl_lightning/algorithms/<name>.py``):

* **what it sends**: the role policy of its ModelSpec (``policy``; ``None``: the
  configured ``algorithm.policy``) and whether the model has one head over the union of
  all tasks' outputs (``union_head``, FedAvg's single global model);
* **its local phases**: :meth:`Algorithm.train` runs :class:`Phase` objects (which
  parameters train, for how long) through :meth:`FitContext.run`, optionally with a
  prox pull; every phase goes through the one loop, :func:`fmtl_lightning.local_fit.fit`;
* **how a client is evaluated**: with its personal model (``evaluates_personal``) or
  with the global shared state + its local state, after an optional fine-tune
  (:meth:`Algorithm.finetune`) that :func:`load_for_eval` runs on a copy.

Training configuration reaches the module as an explicit
:class:`~fmtl_lightning.module.TrainSpec`, never as attributes set on it. Importing this
module needs no torch (the registry is read by the config validator).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    import lightning as L

    from fmtl_lightning.config import AlgorithmConfig
    from fmtl_lightning.fed_data import ClientData
    from fmtl_lightning.local_fit import FitPlan
    from fmtl_lightning.module import MultiTaskModule, ProxTerm
    from fmtl_lightning.roles import ModelSpec

UNION_HEAD = "union"  # the single head of a union-head model (FedAvg)


@dataclass(frozen=True)
class Phase:
    """One local fit: ``name`` seeds its batch order (``engine.seeds.PHASES``), ``keys`` are
    the parameters it trains (``None``: all), ``epochs`` whole epochs instead of the
    run's plan (``None``: ``federation.local_epochs`` / ``local_steps``)."""

    name: str
    keys: frozenset[str] | None = None
    epochs: int | None = None


@dataclass
class FitContext:
    """Everything a client's fits need: the module at the client's width, its data,
    the seeds, the run's plan and the algorithm's hyperparameters."""

    fabric: L.Fabric
    module: MultiTaskModule
    client: ClientData
    client_idx: int
    round_idx: int
    seed: int
    plan: FitPlan
    spec: ModelSpec  # the run's spec: roles and kinds of every key
    hparams: AlgorithmConfig
    label_masks: Mapping[str, Any]  # task -> bool tensor (masked_ce), else empty
    phases: list[str] | None = None  # filled with the phases run, in order (for tests)
    callbacks: tuple[Any, ...] = ()  # Lightning Callbacks of every fit (own_steps.LocalFit)

    def param_names(self) -> list[str]:
        return [k for k, _ in self.module.model.named_parameters()]

    def run(self, phase: Phase, prox: ProxTerm | None = None) -> None:
        """One fit of ``phase`` on the client's training split, seeded by (run seed,
        round, client, phase name) so a resumed run replays it exactly."""
        from fmtl_lightning.engine.seeds import phase_seed
        from fmtl_lightning.local_fit import fit
        from fmtl_lightning.module import TrainSpec

        if self.phases is not None:
            self.phases.append(phase.name)
        plan = (
            self.plan
            if phase.epochs is None
            else replace(self.plan, epochs=phase.epochs, steps=None)
        )
        train = TrainSpec(phase.keys, prox, dict(self.label_masks))
        c = self.client
        seed = phase_seed(self.seed, self.round_idx, self.client_idx, phase.name)
        info = {"client": c.cid, "round": self.round_idx, "phase": phase.name,
                "width": self.module.model.width}  # fmt: skip
        fit(self.fabric, self.module, c.x_train, c.y_train, plan, seed, train, info,
            callbacks=self.callbacks)  # fmt: skip


@dataclass
class ClientRound(FitContext):
    """A :class:`FitContext` plus what one training round receives and holds."""

    shared_keys: tuple[str, ...] = ()
    received: Mapping[str, np.ndarray] | None = None  # shared arrays at the client's width
    local: Mapping[str, np.ndarray] | None = None  # the client's local arrays at its width
    personal: Mapping[str, np.ndarray] | None = None  # the personal model (Ditto / local)
    lam: float = 0.0  # the client's Ditto lambda (its own, or algorithm.lam)


@dataclass
class ClientResult:
    shared: dict[str, np.ndarray] | None  # what goes to the server (None: nothing)
    local: dict[str, np.ndarray]  # the client's new local arrays at its width
    personal: dict[str, np.ndarray] | None
    num_examples: int


class Algorithm:
    """Base class of a client algorithm (subclasses: frozen dataclasses, one per file)."""

    name: ClassVar[str]  # algorithm.name in configs
    title: ClassVar[str]  # for messages, e.g. "FedPer"
    policy: ClassVar[str | None] = None  # fixed role policy; None: algorithm.policy
    union_head: ClassVar[bool] = False  # one head over the union of all tasks' outputs
    evaluates_personal: ClassVar[bool] = False  # evaluated (and exported) with its personal model
    edge_clients: ClassVar[bool] = False  # edge clients (ONNX step graphs) can run it

    def role_policy(self, configured: str) -> str:
        """The ModelSpec's role policy under this algorithm: what it sends."""
        return self.policy or configured

    def model_tasks(
        self, task_outputs: Mapping[str, int]
    ) -> tuple[dict[str, int], dict[str, tuple[int, int]] | None]:
        """The heads of the global model (task -> outputs) and, for a union head, each
        task's (start, stop) columns of it."""
        if not self.union_head:
            return dict(task_outputs), None
        slices, start = {}, 0
        for t, n in task_outputs.items():
            slices[t] = (start, start + n)
            start += n
        return {UNION_HEAD: start}, slices

    def train(self, cr: ClientRound) -> ClientResult:
        """One client's round: the phases it runs and what it returns."""
        raise NotImplementedError

    def finetune(self, ctx: FitContext) -> Phase | None:
        """The fine-tune before evaluation (``None``: evaluate the model as held)."""
        return None


# ---------------------------------------------------------------------- shared steps
def load(cr: FitContext, *parts: Mapping[str, np.ndarray]) -> None:
    """Load the merged ``parts`` (later ones win) into the client's module."""
    from fmtl_lightning.models import load_arrays

    merged: dict[str, np.ndarray] = {}
    for p in parts:
        merged.update(p)
    load_arrays(cr.module.model, merged)


def split(cr: ClientRound, state: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """(shared, local) parts of a trained state, by the ModelSpec's roles."""
    shared = {k: state[k] for k in cr.shared_keys}
    local = {k: v for k, v in state.items() if k not in shared}
    return shared, local


def result(cr: ClientRound) -> ClientResult:
    """The module's state, split into what is sent and what stays."""
    from fmtl_lightning.models import state_arrays

    shared, local = split(cr, state_arrays(cr.module.model))
    return ClientResult(shared, local, None, cr.client.num_train)


def train_jointly(cr: ClientRound, phase: Phase | None = None) -> ClientResult:
    """Received shared + own local state, one fit of ``phase`` (default: all, "global")."""
    assert cr.received is not None and cr.local is not None
    load(cr, cr.received, cr.local)
    cr.run(phase or Phase("global"))
    return result(cr)


def train_personal(cr: ClientRound, lam: float) -> dict[str, np.ndarray]:
    """The personal model, pulled by ``lam/2 ||v - w_t||^2`` toward the received shared
    parameters (anchored at round start); ``lam = 0``: trained alone."""
    import torch

    from fmtl_lightning.models import state_arrays
    from fmtl_lightning.module import ProxTerm

    assert cr.personal is not None, "personal state is created by the round loop"
    assert cr.received is not None
    load(cr, cr.personal)
    anchor = {k: torch.from_numpy(np.array(cr.received[k])) for k in cr.shared_keys}
    names = set(cr.param_names())
    anchor = {k: v for k, v in anchor.items() if v.is_floating_point() and k in names}
    cr.run(Phase("personal"), ProxTerm(lam, anchor))
    return state_arrays(cr.module.model)


def head_keys(ctx: FitContext) -> frozenset[str]:
    """The module's parameters of kind ``head`` (by the ModelSpec, never by name)."""
    heads = set(ctx.spec.keys_of_kind("head"))
    return frozenset(k for k in ctx.param_names() if k in heads)


def load_for_eval(
    algorithm: Algorithm, ctx: FitContext, state: Mapping[str, np.ndarray]
) -> Phase | None:
    """Load the state a client is evaluated with into ``ctx.module`` and run the
    algorithm's fine-tune on it, if any. Only the module's copy changes: the client's
    stored state and the server's are untouched. The fine-tune is seeded like every
    phase (phase ``finetune`` of the evaluated round), so a resumed run repeats it; with
    static batch norm the statistics are recomputed for the fine-tuned weights."""
    load(ctx, state)
    phase = algorithm.finetune(ctx)
    if phase is not None:
        from fmtl_lightning.static_bn import compute_static_stats

        ctx.run(phase)
        compute_static_stats(ctx.module.model, ctx.client.x_train)  # no-op without sBN
    return phase
