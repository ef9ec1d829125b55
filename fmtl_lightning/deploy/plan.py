"""What a SuperLink knows about a run without holding any data: clients, model, roles.

:func:`server_plan` reads a :class:`RunConfig` and returns the client list (ids,
tasks, widths, in the order ``fmtl simulate`` numbers them), the parameter roles
and the initial global state, built exactly as :class:`~fmtl_lightning.simulation.Simulation`
builds them (same seed, same model), so a deployed run starts where the in-process
simulator starts. Image sizes come from the task domain, not from loading the data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fmtl_lightning.algorithms import get_algorithm
from fmtl_lightning.config import ConfigError, RunConfig
from fmtl_lightning.roles import ModelSpec, WidthSpec
from fmtl_lightning.tasks import get_task

if TYPE_CHECKING:
    from fmtl_lightning.models import BackboneConfig

IMAGE_SIZE = {"mnist": 28, "fashion_mnist": 28, "digits": 8}


@dataclass(frozen=True)
class PlannedClient:
    idx: int
    client_id: str
    tasks: tuple[str, ...]
    width: float
    edge: bool
    lam: float | None = None  # the client's own Ditto lambda, if its group sets one


@dataclass
class ServerPlan:
    cfg: RunConfig
    clients: list[PlannedClient]
    spec: ModelSpec
    shared_keys: tuple[str, ...]
    initial_state: dict[str, np.ndarray]

    def client(self, client_id: str) -> PlannedClient | None:
        return client_by_id(self.clients, client_id)

    def width_of(self, c: PlannedClient, declared: float, round_idx: int) -> WidthSpec:
        """The width a client trains at this round: the one its node declares, or under
        ``width_assignment: dynamic`` the same seeded draw as ``Simulation.width_of``."""
        a = self.cfg.algorithm
        width = declared
        if a.width_assignment == "dynamic":
            levels = sorted(set(a.dynamic_widths or (x.width for x in self.clients)))
            allowed = [w for w in levels if w <= declared] or [min(levels)]
            rng = np.random.default_rng([self.cfg.seed, round_idx, c.idx, 29])
            width = float(allowed[int(rng.integers(len(allowed)))])
        return WidthSpec(width, a.slicing, round_idx)

    def selected(self, idxs: list[int], round_idx: int) -> list[int]:
        """The seeded ``federation.fraction`` sample of the available clients."""
        if not idxs:
            return []
        m = max(1, math.ceil(self.cfg.federation.fraction * len(idxs) - 1e-9))
        rng = np.random.default_rng([self.cfg.seed, round_idx, 17])
        pick = rng.choice(len(idxs), size=min(m, len(idxs)), replace=False)
        return sorted(idxs[int(i)] for i in pick)


def backbone_config(cfg: RunConfig, image_size: int) -> BackboneConfig:
    """The backbone ``cfg.model`` declares, for images of ``image_size`` pixels."""
    from fmtl_lightning.models import BackboneConfig

    m = cfg.model
    return BackboneConfig(m.family, 1, image_size, tuple(m.hidden), m.norm, m.scaler)


@dataclass(frozen=True)
class ModelLayout:
    """The heads of a run's model, from the config alone.

    ``task_outputs``: every task a client holds -> its output size, in first-seen order
    (as :meth:`Federation.task_outputs`); ``model_tasks``: the model's heads and
    ``union_slices``: a union-head algorithm's (FedAvg's) task -> (start, end) columns of
    its one head, ``None`` otherwise (both from :meth:`Algorithm.model_tasks`); ``policy``:
    the algorithm's role policy (:meth:`Algorithm.role_policy`).
    """

    task_outputs: dict[str, int]
    model_tasks: dict[str, int]
    union_slices: dict[str, tuple[int, int]] | None
    policy: str

    def client_tasks(self, tasks: Sequence[str]) -> dict[str, int]:
        """The heads of the model of a client holding ``tasks``: its own tasks (a union-head
        algorithm: the one union head)."""
        if self.union_slices is not None:
            return dict(self.model_tasks)
        return {t: self.task_outputs[t] for t in tasks}


def model_layout(cfg: RunConfig, task_outputs: dict[str, int] | None = None) -> ModelLayout:
    """The :class:`ModelLayout` of ``cfg`` (no model, no data); ``task_outputs`` defaults to
    the tasks of the config's clients (the simulation passes its federation's)."""
    if task_outputs is None:
        task_outputs = {}
        for c in planned_clients(cfg):
            for t in c.tasks:
                task_outputs.setdefault(t, get_task(t).num_outputs)
    alg = get_algorithm(cfg.algorithm.name)  # what it sends: union head?, role policy
    model_tasks, slices = alg.model_tasks(task_outputs)
    return ModelLayout(task_outputs, model_tasks, slices, alg.role_policy(cfg.algorithm.policy))


def planned_clients(cfg: RunConfig) -> list[PlannedClient]:
    """The run's clients in ``fmtl simulate``'s numbering, from the config alone (cheap:
    no model, no data; what a node or a launcher needs)."""
    groups = [g for g in cfg.clients for _ in range(g.count)]
    return [
        PlannedClient(i, f"c{i:02d}", tuple(g.tasks), g.width, g.edge, g.lam)
        for i, g in enumerate(groups)
    ]


def client_by_id(clients: list[PlannedClient], client_id: str) -> PlannedClient | None:
    return next((c for c in clients if c.client_id == client_id), None)


def server_plan(cfg: RunConfig) -> ServerPlan:
    """Clients, roles and initial global state of ``cfg`` (torch only to build the init)."""
    import torch

    from fmtl_lightning.models import MultiTaskModel, model_spec, state_arrays

    agg = cfg.algorithm.aggregator
    if agg.needs_label_masks:
        # the server would need each client's label set; a deployed client keeps it private
        raise ConfigError(
            f"algorithm.aggregator: {agg.name} needs each client's label set, which a "
            "deployed client keeps private: not supported by the Flower deployment (only in "
            "`fmtl simulate`); choose an aggregator without label masks"
        )
    clients = planned_clients(cfg)
    domain = get_task(clients[0].tasks[0]).domain
    bcfg = backbone_config(cfg, IMAGE_SIZE[domain])
    layout = model_layout(cfg)
    model_tasks = layout.model_tasks
    spec = model_spec(bcfg, model_tasks, layout.policy)
    shared = spec.shared_keys()
    torch.manual_seed(cfg.seed)
    init = state_arrays(MultiTaskModel(bcfg, model_tasks, 1.0))
    return ServerPlan(cfg, clients, spec, shared, {k: init[k] for k in shared})
