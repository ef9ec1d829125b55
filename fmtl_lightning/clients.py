"""The clients of an in-process run: their data, their local state, their training.

:class:`ClientPool` is the client side of :class:`~fmtl_lightning.simulation.Simulation`
and of a deployed Lightning node: given the shared arrays a client received at its width,
it runs the client's algorithm (:mod:`fmtl_lightning.algorithms`) through one long-lived
Lightning Fabric, or an edge client's exported step graphs in ONNX Runtime
(:class:`~fmtl_lightning.edge_bridge.EdgeBridge`), and keeps what the client keeps
between rounds (heads, FedBN norms, Ditto's personal model) in full-width global
coordinates, so a client whose width changes between rounds (dynamic assignment,
FedRolex windows) writes back exactly the entries it trained. That state lives on disk,
one file per client (:class:`~fmtl_lightning.client_states.ClientStates`), read when a
client is used and written back after its fit; only a few clients' states are in RAM at
a time. It also evaluates a client, and runs static batch norm's statistics pass. It
holds no global state: the server's (:class:`~fmtl_lightning.engine.ServerEngine`) is
passed in.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import socket
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import lightning as L
import numpy as np
import torch

from fmtl_lightning.algorithms import (
    UNION_HEAD,
    ClientResult,
    ClientRound,
    FitContext,
    get_algorithm,
    load_for_eval,
)
from fmtl_lightning.client_states import CheckpointFiles, ClientStates
from fmtl_lightning.config import ConfigError, RunConfig
from fmtl_lightning.edge_bridge import EdgeBridge, EdgeJob
from fmtl_lightning.engine.plan import PlannedClient, ServerPlan, server_plan
from fmtl_lightning.errors import OwnStepsError
from fmtl_lightning.fed_data import ClientData, Federation
from fmtl_lightning.local_fit import FitPlan
from fmtl_lightning.model_source import ModelSource
from fmtl_lightning.models import load_arrays
from fmtl_lightning.module import MultiTaskModule
from fmtl_lightning.roles import WidthSpec
from fmtl_lightning.run_artifacts import ClientStore, deployed_state
from fmtl_lightning.slicing import embed_array, slice_state
from fmtl_lightning.tasks import get_task

State = dict[str, np.ndarray]
# .client_state.<host>.<pid>.<random>: a pool's own state dir (see _state_dir)
_STATE_DIR_RE = re.compile(r"^\.client_state\.([A-Za-z0-9-]+)\.(\d+)\.")


def federation_plan(
    cfg: RunConfig, fed: Federation, model: ModelSource | None = None
) -> ServerPlan:
    """The server plan of a loaded federation: its clients, task sizes and image size
    (which a custom federation may set differently from what the config alone says);
    ``model``: a user's model (default: the configured built-in family)."""
    clients = [PlannedClient(i, c.cid, c.tasks, c.width, c.edge, c.lam)
               for i, c in enumerate(fed.clients)]  # fmt: skip
    return server_plan(cfg, clients=clients, task_outputs=fed.task_outputs(),
                       image_size=fed.image_size, model=model)  # fmt: skip


class ClientPool:
    """The clients of ``fed`` under ``plan``, training in this process (see the module doc).

    ``loggers`` go to the one Fabric every fit runs through, ``callbacks`` (after the
    model source's own) get every local fit's training hooks; edge clients' bundles and
    update files live under ``edge_dir``. The clients' states (``stores``) live in a
    directory of this pool's own next to ``edge_dir`` (removed with the pool), at most
    ``resident`` of them in RAM.
    """

    def __init__(
        self,
        cfg: RunConfig,
        fed: Federation,
        plan: ServerPlan,
        edge_dir: str | Path,
        *,
        loggers: Sequence[Any] = (),
        callbacks: Sequence[Any] = (),
        resident: int = 16,
    ) -> None:
        self.cfg = cfg
        self.fed = fed
        self.plan = plan
        self.spec = plan.spec
        self.shared_keys = plan.shared_keys
        self.layout = plan.layout
        self.algorithm = get_algorithm(cfg.algorithm.name)
        self._client_keys: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._by_id = {c.cid: c for c in fed.clients}
        self.stores = ClientStates(_state_dir(Path(edge_dir).parent),
                                   [c.cid for c in fed.clients], self.initial_store,
                                   resident=resident)  # fmt: skip
        self._remove_states = weakref.finalize(self, shutil.rmtree, self.stores.root, True)
        # clients whose store changed since the last checkpoint (None: all of them)
        self.changed: set[str] | None = None
        self._modules: dict[tuple, MultiTaskModule] = {}
        if cfg.algorithm.masked_ce and plan.model.own_steps is not None:
            raise OwnStepsError(
                "algorithm.masked_ce: label masks cannot reach a user's own training_step; "
                "turn masked_ce off, or pass own_steps=False to FederatedModel.from_model"
            )
        # called by every local fit; not Fabric(callbacks=): Fabric also registers every
        # LightningModule it sets up as a callback, which Lightning's hook signatures break
        self.callbacks: tuple[Any, ...] = (*plan.model.callbacks, *callbacks)
        self.fabric = L.Fabric(accelerator="cpu", devices=1, loggers=list(loggers))
        self.phase_log: dict[str, list[str]] | None = None  # tests: phases per client
        self.edge = EdgeBridge(Path(edge_dir))

    def initial_store(self, cid: str) -> ClientStore:
        """Client ``cid``'s state before its first fit: the initial model's entries of its
        local keys (and of all its keys as its personal model, if it keeps one)."""
        init = self.plan.initial_model
        keys = self.client_keys(self._by_id[cid])
        st = ClientStore(local={k: init[k].copy() for k in keys if k not in self.shared_keys})
        if self.algorithm.evaluates_personal:
            st.personal = {k: init[k].copy() for k in keys}
        return st

    # ------------------------------------------------------------------ models
    def client_tasks(self, c: ClientData) -> dict[str, int]:
        """The heads of a client's model: its own tasks (FedAvg: the one union head)."""
        return self.layout.client_tasks(c.tasks)

    def client_keys(self, c: ClientData) -> tuple[str, ...]:
        """The keys of a client's model, as its ModelSpec declares them (no name matching)."""
        if c.tasks not in self._client_keys:
            self._client_keys[c.tasks] = self.plan.model.spec(self.client_tasks(c)).keys
        return self._client_keys[c.tasks]

    def module_for(self, c: ClientData, width: float) -> MultiTaskModule:
        """The client's LightningModule at ``width`` (built once per tasks and width)."""
        key = (c.tasks, width)
        if key not in self._modules:
            o = self.cfg.optimizer
            self._modules[key] = MultiTaskModule(
                self.plan.model.build(self.client_tasks(c), width),
                {t: get_task(t) for t in c.tasks},
                lr=o.lr,
                momentum=o.momentum,
                weight_decay=o.weight_decay,
                union_slices=self.layout.union_slices,
            )
        return self._modules[key]

    def set_lr(self, lr: float) -> None:
        """Change the SGD learning rate from the next fit on (a schedule, e.g. HeteroFL's
        step decay): the run's config and every client module built so far."""
        if not (lr > 0 and math.isfinite(lr)):
            raise ConfigError(f"optimizer.lr: must be a finite number > 0, got {lr}")
        self.cfg = self.cfg.replace(optimizer=dataclasses.replace(self.cfg.optimizer, lr=lr))
        for m in self._modules.values():
            m.lr = lr

    def label_masks(self, c: ClientData) -> dict[str, torch.Tensor]:
        """The classes a client holds, per multiclass task, under ``masked_ce`` (else none)."""
        return dict(c.label_masks) if self.cfg.algorithm.masked_ce else {}

    def head_row_masks(self, c: ClientData) -> dict[str, np.ndarray]:
        """Rows of the union head a client holds: the classes it has, of its own tasks.

        Multi-label and regression tasks hold all their rows; other tasks' rows none.
        """
        slices = self.layout.union_slices
        assert slices is not None
        rows = np.zeros(self.layout.model_tasks[UNION_HEAD], dtype=bool)
        for t in c.tasks:
            a, b = slices[t]
            m = c.label_masks.get(t)
            rows[a:b] = True if m is None else np.asarray(m, dtype=bool)
        return {k: rows for k in self.spec.keys_of_kind("head")}  # the union head's rows

    def fit_plan(self) -> FitPlan:
        f = self.cfg.federation
        return FitPlan(f.batch_size, f.local_epochs, f.local_steps, f.drop_last)

    def fit_context(self, idx: int, width: float, round_idx: int) -> FitContext:
        """What the algorithm's fits need for client ``idx`` at ``width`` in ``round_idx``."""
        c = self.fed.clients[idx]
        return FitContext(
            fabric=self.fabric,
            module=self.module_for(c, width),
            client=c,
            client_idx=idx,
            round_idx=round_idx,
            seed=self.cfg.seed,
            plan=self.fit_plan(),
            spec=self.spec,
            hparams=self.cfg.algorithm,
            label_masks=self.label_masks(c),
            phases=None if self.phase_log is None else self.phase_log.setdefault(c.cid, []),
            callbacks=self.callbacks,
        )

    # ------------------------------------------------------------------ state
    def embed(self, full: State, sub: Mapping[str, np.ndarray], ws: WidthSpec) -> None:
        """Write ``sub`` (arrays at ``ws``) into the full-width ``full`` in place."""
        for k, v in sub.items():
            full[k] = embed_array(self.spec, k, full[k], v, ws)

    def client_state(
        self, c: ClientData, ws: WidthSpec, global_state: Mapping[str, np.ndarray]
    ) -> State:
        """The arrays a client would deploy at ``ws`` (personal, or global + local)."""
        st = self.stores[c.cid]
        alg = self.cfg.algorithm.name
        return deployed_state(self.spec, alg, global_state, st.local, st.personal, ws)

    # ------------------------------------------------------------------ training
    def train(self, idx: int, ws: WidthSpec, round_idx: int, received: State) -> ClientResult:
        """Client ``idx``'s round: ``received`` (the shared arrays at ``ws``) plus its own
        local state, trained by its algorithm (or its edge runtime); keeps the new local
        state and returns what it sends."""
        c = self.fed.clients[idx]
        st = self.stores[c.cid]
        local = slice_state(st.local, self.spec, ws)
        if c.edge:
            job = self.edge_job(idx, ws, received, round_idx)
            res = self.edge.train(job, received, local)
        else:
            cr = ClientRound(
                **vars(self.fit_context(idx, ws.width, round_idx)),
                shared_keys=self.shared_keys,
                received=received,
                local=local,
                personal=slice_state(st.personal, self.spec, ws) if st.personal else None,
                lam=self.cfg.algorithm.lam if c.lam is None else c.lam,
            )
            res = self.algorithm.train(cr)
        self.embed(st.local, res.local, ws)
        if res.personal is not None:
            self.embed(st.personal, res.personal, ws)
        self.stores.save(c.cid, st)
        self._mark(c.cid)
        return res

    def _mark(self, cid: str) -> None:
        if self.changed is not None:
            self.changed.add(cid)

    def edge_job(self, idx: int, ws: WidthSpec, received: Mapping[str, np.ndarray],
                 round_idx: int = 0) -> EdgeJob:  # fmt: skip
        """Client ``idx``'s edge job at ``ws``; ``received`` (the global shared state at
        ``ws``) with the client's local state is the model it deploys."""
        c = self.fed.clients[idx]
        mean, std = self.fed.normalisation[c.spec.domain]

        def deployed() -> State:
            full = {k: v.copy() for k, v in self.plan.initial_state.items()}
            self.embed(full, received, ws)  # only the entries at ws are read
            return self.client_state(c, ws, full)

        return EdgeJob(
            client=c,
            idx=idx,
            ws=ws,
            round_idx=round_idx,
            module=self.module_for(c, ws.width),
            deployed=deployed,
            normalisation=(mean, std),
            spec=self.spec,
            seed=self.cfg.seed,
            plan=self.fit_plan(),
            lr=self.cfg.optimizer.lr,
            optimizer=lambda: self.trained_optimizer(c),
        )

    def trained_optimizer(self, c: ClientData) -> torch.optim.Optimizer:
        """The optimiser client ``c``'s local fits use (the user's own, or the config's)."""
        module = self.module_for(c, c.width)
        own = self.plan.model.own_steps
        if own is not None:
            # own steps: the backbone is the user's LightningModule (from_model checks it)
            return own.optimizers(cast(L.LightningModule, module.model.backbone))[0]
        return module.configure_optimizers(None)

    # ------------------------------------------------------------------ evaluation
    def static_stats(
        self, widths: Mapping[int, WidthSpec], global_state: Mapping[str, np.ndarray]
    ) -> None:
        """HeteroFL's sBN statistics pass, after aggregation (no-op without static BN).

        Every client computes the static batch-norm statistics of the model it is
        evaluated with (:meth:`client_state`) at its width (``widths``: client index ->
        its eval WidthSpec), over its own training data, and keeps them with its local
        state (the personal model under Ditto/local), so evaluation and checkpoints hold
        them. See :mod:`fmtl_lightning.static_bn`.
        """
        from fmtl_lightning.static_bn import compute_static_stats

        if not self.spec.keys_of_kind("static_stat"):
            return
        for idx, c in enumerate(self.fed.clients):
            ws = widths[idx]
            m = self.module_for(c, c.width)
            load_arrays(m.model, self.client_state(c, ws, global_state))
            stats = compute_static_stats(m.model, c.x_train)
            st = self.stores[c.cid]
            self.embed(st.personal if self.algorithm.evaluates_personal else st.local, stats, ws)
            self.stores.save(c.cid, st)
            self._mark(c.cid)

    def evaluate(
        self, idx: int, state: State, width: float, round_idx: int, *, static_stats: bool = False
    ) -> dict[str, dict[str, float]]:
        """Client ``idx``'s model ``state`` at ``width`` on its own test split, per task
        (after its algorithm's fine-tune, if any, seeded by ``round_idx``, on a copy:
        stored states do not change). ``static_stats``: recompute static batch norm's
        statistics of the evaluated weights over the client's training data first (a
        deployed node, which runs no separate statistics pass)."""
        from fmtl_lightning.static_bn import compute_static_stats

        ctx = self.fit_context(idx, width, round_idx)
        load_for_eval(self.algorithm, ctx, state)
        c = self.fed.clients[idx]
        if static_stats:
            compute_static_stats(ctx.module.model, c.x_train)
        return ctx.module.evaluate(c.x_test, c.y_test, ctx.label_masks)

    def client_files(self) -> tuple[Mapping[str, State], list[str]]:
        """The checkpoint form of every client's local state that changed since the last
        checkpoint (read from disk one client at a time, as the checkpoint is written),
        and the ids of the clients whose state did not (their files carry over from it);
        then starts tracking changes anew, and drops the resident states from RAM."""
        changed = set(self.stores) if self.changed is None else self.changed
        files = CheckpointFiles(self.stores, [cid for cid in self.stores if cid in changed])
        self.changed = set()
        self.stores.release()
        return files, [cid for cid in self.stores if cid not in changed]

    def close(self) -> None:
        """Remove the clients' state directory (the states are gone; checkpoints keep them)."""
        self._remove_states()

    def restore(self, clients: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Local states from a checkpoint's per-client arrays (a client without: empty)."""
        for cid in self.stores:
            self.stores.save(cid, ClientStore.from_arrays(clients.get(cid, {})))
        self.stores.release()
        self.changed = None  # the next checkpoint writes every client


def _state_dir(parent: Path) -> Path:
    """A new directory for one pool's client states under ``parent``
    (``.client_state.<host>.<pid>.<random>``); those of this host's processes no longer
    alive (a killed run) are removed first."""
    parent.mkdir(parents=True, exist_ok=True)
    for p in parent.iterdir():
        m = _STATE_DIR_RE.match(p.name)
        if m and m.group(1) == host_tag() and p.is_dir() and not _alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)
    prefix = f".client_state.{host_tag()}.{os.getpid()}."
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def host_tag() -> str:
    """This machine's name as it appears in a state dir's name (a run dir on a shared
    file system may hold pools of other machines: never removed from here)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
