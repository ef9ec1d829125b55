"""What the server knows about a run without holding any data: clients, model, roles.

:func:`server_plan` reads a :class:`RunConfig` and returns the client list (ids,
tasks, widths, in the order ``fmtl simulate`` numbers them), the parameter roles
and the initial global state. Every transport builds its server from it (the
in-process simulation passes the clients and task sizes of the federation it loaded;
a Flower SuperLink derives them from the config alone), so every transport starts
from the same state. Image sizes come from the task domain, not from loading the data,
except under ``data.factory``, whose images may have any size (:func:`config_image_size`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fmtl_lightning.algorithms import get_algorithm
from fmtl_lightning.config import ConfigError, RunConfig
from fmtl_lightning.data.datasets import IMAGE_SIZES
from fmtl_lightning.roles import ModelSpec
from fmtl_lightning.tasks import get_task, task_domain

if TYPE_CHECKING:
    from fmtl_lightning.model_source import ModelSource
    from fmtl_lightning.models import BackboneConfig


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
    """A run as the server holds it: config, clients, roles and the initial model.

    ``initial_model`` holds every key of the full-width model (``shared_keys`` start the
    global state; clients start their local arrays from the rest); ``layout`` is its heads
    and ``model`` the :class:`~fmtl_lightning.model_source.ModelSource` that builds it at
    every width (a built-in family, or a user's own model).
    """

    cfg: RunConfig
    clients: list[PlannedClient]
    spec: ModelSpec
    shared_keys: tuple[str, ...]
    initial_model: dict[str, np.ndarray]
    layout: ModelLayout
    model: ModelSource

    @property
    def initial_state(self) -> dict[str, np.ndarray]:
        """The initial global state: the shared keys of the initial model."""
        return {k: self.initial_model[k] for k in self.shared_keys}

    def client(self, client_id: str) -> PlannedClient | None:
        return client_by_id(self.clients, client_id)


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


def config_image_size(cfg: RunConfig) -> int:
    """The pixels of the run's images: the built-in dataset's of the first client's task,
    or, under ``data.factory`` (which may bring a built-in task's data at another size),
    those of the federation the factory builds (built here to find out)."""
    if cfg.data.factory is not None:
        from fmtl_lightning.fed_data import build_federation

        return build_federation(cfg).image_size
    return IMAGE_SIZES[task_domain(cfg.clients[0].tasks[0])]


def client_by_id(clients: list[PlannedClient], client_id: str) -> PlannedClient | None:
    return next((c for c in clients if c.client_id == client_id), None)


def server_plan(
    cfg: RunConfig,
    *,
    clients: Sequence[PlannedClient] | None = None,
    task_outputs: dict[str, int] | None = None,
    image_size: int | None = None,
    model: ModelSource | None = None,
) -> ServerPlan:
    """Clients, roles and initial global state of ``cfg`` (torch only to build the init).

    ``clients``, ``task_outputs`` and ``image_size`` default to what the config alone
    says (:func:`planned_clients`, the task registry, :func:`config_image_size`); the
    in-process simulation passes those of the federation it loaded. ``model`` defaults
    to what ``model.factory`` builds, else the configured built-in family
    (:class:`~fmtl_lightning.model_source.BuiltinModel`).
    """
    import torch

    from fmtl_lightning.model_source import BuiltinModel
    from fmtl_lightning.models import state_arrays

    clients = list(planned_clients(cfg) if clients is None else clients)
    if model is None and cfg.model.factory is not None:
        from fmtl_lightning.model_source import model_from_factory

        model = model_from_factory(cfg.model.factory)
    if model is None:
        model = BuiltinModel(backbone_config(cfg, image_size or config_image_size(cfg)))
    layout = model_layout(cfg, task_outputs)
    spec = model.spec(layout.model_tasks, layout.policy)
    shared = spec.shared_keys()
    torch.manual_seed(cfg.seed)
    init = state_arrays(model.build(layout.model_tasks, 1.0))
    return ServerPlan(cfg, clients, spec, shared, init, layout, model)


def refuse_undeployable(cfg: RunConfig) -> None:
    """What only ``fmtl simulate`` can run: an aggregator that needs the clients' labels
    (a deployed server never sees them), and tasks without a built-in dataset (their data
    comes from ``data.factory`` in the simulator; a deployed node reads a built-in
    dataset's images)."""
    from fmtl_lightning.tasks import get_task

    own = sorted({t for g in cfg.clients for t in g.tasks if get_task(t).domain is None})
    if own:
        raise ConfigError(
            f"clients: tasks {own} have no built-in dataset (data.factory brings their data "
            "to `fmtl simulate`): not supported by the Flower deployment, whose nodes read a "
            "built-in dataset's images"
        )
    agg = cfg.algorithm.aggregator
    if agg.needs_label_masks:
        raise ConfigError(
            f"algorithm.aggregator: {agg.name} needs each client's label set, which a "
            "deployed client keeps private: not supported by the Flower deployment (only in "
            "`fmtl simulate`); choose an aggregator without label masks"
        )
