"""The federated round loop (in-process simulation), written once for every algorithm.

One round::

    select clients (seeded fraction) -> width per client (fixed or dynamic draw)
    -> per client: slice the global shared state to its WidthSpec, load it with the
       client's own local state, run the algorithm's procedure (Lightning/Fabric)
    -> validate + aggregate the shared updates (the configured aggregator, pure numpy)
    -> static batch norm's statistics pass (:meth:`Simulation.static_stats`)
    -> when evaluation is due: every client on its own test split
    -> checkpoint atomically.

Clients keep their local state (heads, FedBN norms, Ditto's personal model) in
full-width global coordinates, so a client whose width changes between rounds
(dynamic assignment, FedRolex windows) writes back exactly the entries it trained.

All randomness is derived from (seed, round, client), so ``resume`` replays the
remaining rounds exactly as an uninterrupted run would.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from lightning.fabric.loggers import CSVLogger
from tqdm.auto import tqdm

from fmtl_lightning.aggregation import ClientUpdate
from fmtl_lightning.aggregators import AggregationRule, Mean
from fmtl_lightning.algorithms import (
    UNION_HEAD,
    ClientResult,
    ClientRound,
    FitContext,
    get_algorithm,
    load_for_eval,
)
from fmtl_lightning.checkpoint import (
    append_history,
    completed_rounds,
    prune_rounds,
    read_history,
    read_round,
    rounds_to_keep,
    write_round,
)
from fmtl_lightning.config import (
    ConfigError,
    RunConfig,
    config_to_dict,
    load_config,
    parse_config,
    validate_config,
)
from fmtl_lightning.deploy.plan import backbone_config, model_layout
from fmtl_lightning.edge_bridge import EdgeBridge, EdgeJob
from fmtl_lightning.fed_data import ClientData, Federation, build_federation
from fmtl_lightning.local_fit import FitPlan
from fmtl_lightning.models import MultiTaskModel, model_spec, state_arrays
from fmtl_lightning.module import MultiTaskModule
from fmtl_lightning.roles import ModelSpec, WidthSpec
from fmtl_lightning.run_artifacts import ClientStore, deployed_state, write_normalisation
from fmtl_lightning.slicing import embed_array, slice_state
from fmtl_lightning.tasks import get_task
from mobile_client.fileio import atomic_write_text

METRIC_FIELDS = ("round", "client", "width", "task", "loss", "acc", "f1")


@dataclass
class RoundTimes:
    train: float = 0.0
    aggregate: float = 0.0
    evaluate: float = 0.0
    checkpoint: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in self.__dict__.items()}


class Simulation:
    """An in-process federation for one RunConfig, writing to ``run_dir``.

    ``aggregator`` replaces the configured ``cfg.algorithm.aggregator`` for this object
    only (e.g. a benchmark's wrapper around a registered rule); ``config.yaml`` in the run
    still names the configured one. It must fit ``algorithm.weighting`` (its own call
    raises ``ValueError`` otherwise).
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | Path,
        *,
        progress: bool = True,
        federation: Federation | None = None,
        aggregator: AggregationRule | None = None,
    ) -> None:
        self.cfg = cfg
        self.aggregator = cfg.algorithm.aggregator if aggregator is None else aggregator
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.fed = federation if federation is not None else build_federation(cfg)
        self.alg = cfg.algorithm.name
        self.algorithm = get_algorithm(self.alg)
        self.bcfg = backbone_config(cfg, self.fed.image_size)
        # heads (FedAvg: one union head, task -> its columns) and role policy
        self.layout = layout = model_layout(cfg, self.fed.task_outputs())
        self.task_outputs = layout.task_outputs
        self.union_slices = layout.union_slices
        self.model_tasks = model_tasks = layout.model_tasks
        self.spec: ModelSpec = model_spec(self.bcfg, model_tasks, layout.policy)
        self.shared_keys = self.spec.shared_keys()
        torch.manual_seed(cfg.seed)
        init = state_arrays(MultiTaskModel(self.bcfg, model_tasks, 1.0))
        self.global_state = {k: init[k] for k in self.shared_keys}
        self._client_keys: dict[tuple[str, ...], tuple[str, ...]] = {}
        self.stores: dict[str, ClientStore] = {}
        for c in self.fed.clients:
            keys = self.client_keys(c)
            st = ClientStore(local={k: init[k].copy() for k in keys if k not in self.shared_keys})
            if self.algorithm.evaluates_personal:
                st.personal = {k: init[k].copy() for k in keys}
            self.stores[c.cid] = st
        self._modules: dict[tuple, MultiTaskModule] = {}
        # Lightning's own CSV logger gets the per-round aggregates; our metrics.csv the details
        self.logger = CSVLogger(str(self.run_dir), name="lightning_logs")
        self.fabric = L.Fabric(accelerator="cpu", devices=1, loggers=[self.logger])
        self.round_idx = 0  # rounds completed
        self.history: list[dict[str, Any]] = []  # per-round metric rows (all rounds so far)
        self.times: list[RoundTimes] = []
        self.phase_log: dict[str, list[str]] | None = None  # tests: phases per client
        self.edge = EdgeBridge(self.run_dir / "edge")

    # ------------------------------------------------------------------ helpers
    def client_tasks(self, c: ClientData) -> dict[str, int]:
        """The heads of a client's model: its own tasks (FedAvg: the one union head)."""
        return self.layout.client_tasks(c.tasks)

    def client_keys(self, c: ClientData) -> tuple[str, ...]:
        """The keys of a client's model, as its ModelSpec declares them (no name matching)."""
        if c.tasks not in self._client_keys:
            self._client_keys[c.tasks] = model_spec(self.bcfg, self.client_tasks(c)).keys
        return self._client_keys[c.tasks]

    def head_row_masks(self, c: ClientData) -> dict[str, np.ndarray]:
        """Rows of the union head a client holds: the classes it has, of its own tasks.

        Multi-label and regression tasks hold all their rows; other tasks' rows none.
        """
        assert self.union_slices is not None
        rows = np.zeros(self.model_tasks[UNION_HEAD], dtype=bool)
        for t in c.tasks:
            a, b = self.union_slices[t]
            m = c.label_masks.get(t)
            rows[a:b] = True if m is None else np.asarray(m, dtype=bool)
        return {k: rows for k in self.spec.keys_of_kind("head")}  # the union head's rows

    def module_for(self, c: ClientData, width: float) -> MultiTaskModule:
        key = (c.tasks, width)
        if key not in self._modules:
            tasks = self.client_tasks(c)
            o = self.cfg.optimizer
            self._modules[key] = MultiTaskModule(
                MultiTaskModel(self.bcfg, tasks, width),
                {t: get_task(t).kind for t in c.tasks},
                lr=o.lr,
                momentum=o.momentum,
                weight_decay=o.weight_decay,
                union_slices=self.union_slices,
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
            plan=self._plan(),
            spec=self.spec,
            hparams=self.cfg.algorithm,
            label_masks=self.label_masks(c),
            phases=None if self.phase_log is None else self.phase_log.setdefault(c.cid, []),
        )

    def selected(self, round_idx: int) -> list[int]:
        n = len(self.fed.clients)
        m = max(1, math.ceil(self.cfg.federation.fraction * n - 1e-9))
        rng = np.random.default_rng([self.cfg.seed, round_idx, 17])
        return sorted(int(i) for i in rng.choice(n, size=m, replace=False))

    def width_of(self, idx: int, round_idx: int) -> WidthSpec:
        a = self.cfg.algorithm
        c = self.fed.clients[idx]
        width = c.width
        if a.width_assignment == "dynamic":
            levels = sorted(set(a.dynamic_widths or (x.width for x in self.fed.clients)))
            allowed = [w for w in levels if w <= c.width] or [min(levels)]
            rng = np.random.default_rng([self.cfg.seed, round_idx, idx, 29])
            width = float(allowed[int(rng.integers(len(allowed)))])
        return WidthSpec(width, a.slicing, round_idx)

    def _plan(self) -> FitPlan:
        f = self.cfg.federation
        return FitPlan(f.batch_size, f.local_epochs, f.local_steps)

    def _sub(self, full: dict[str, np.ndarray], ws: WidthSpec) -> dict[str, np.ndarray]:
        return slice_state(full, self.spec, ws)

    def _embed(self, full: dict[str, np.ndarray], sub: dict[str, np.ndarray], ws: WidthSpec):
        for k, v in sub.items():
            full[k] = embed_array(self.spec, k, full[k], v, ws)

    # ------------------------------------------------------------------ one round
    def train_client(self, idx: int, ws: WidthSpec, round_idx: int) -> ClientResult:
        c = self.fed.clients[idx]
        st = self.stores[c.cid]
        received = self._sub(self.global_state, ws)
        local = self._sub(st.local, ws)
        if c.edge:
            res = self.edge.train(self._edge_job(idx, ws, round_idx), received, local)
        else:
            cr = ClientRound(
                **vars(self.fit_context(idx, ws.width, round_idx)),
                shared_keys=self.shared_keys,
                received=received,
                local=local,
                personal=self._sub(st.personal, ws) if st.personal else None,
                lam=self.cfg.algorithm.lam if c.lam is None else c.lam,
            )
            res = self.algorithm.train(cr)
        self._embed(st.local, res.local, ws)
        if res.personal is not None:
            self._embed(st.personal, res.personal, ws)
        return res

    def _edge_job(self, idx: int, ws: WidthSpec, round_idx: int = 0) -> EdgeJob:
        c = self.fed.clients[idx]
        mean, std = self.fed.normalisation[c.spec.domain]
        return EdgeJob(
            client=c,
            idx=idx,
            ws=ws,
            round_idx=round_idx,
            module=self.module_for(c, ws.width),
            deployed=lambda: self.client_state(c, ws),
            normalisation=(mean, std, self.fed.image_size),
            spec=self.spec,
            seed=self.cfg.seed,
            plan=self._plan(),
            lr=self.cfg.optimizer.lr,
        )

    def edge_bundle(self, idx: int, ws: WidthSpec) -> Path:
        """The device bundle of client ``idx`` at ``ws`` as it stands (exported once per width)."""
        return self.edge.bundle_for(self._edge_job(idx, ws))

    def run_round(self) -> dict[str, Any]:
        t = self.round_idx
        times = RoundTimes()
        updates = []
        chosen = self.selected(t)
        for idx in chosen:
            ws = self.width_of(idx, t)
            if self._bar is not None:
                self._bar.set_description(f"round {t + 1}/{self.cfg.federation.rounds}")
                self._bar.set_postfix_str(f"{self.fed.clients[idx].cid} w={ws.width:g}")
            t0 = time.perf_counter()
            res = self.train_client(idx, ws, t)
            times.train += time.perf_counter() - t0
            if res.shared is not None:
                cid = self.fed.clients[idx].cid
                updates.append(ClientUpdate(cid, res.shared, res.num_examples, ws))
            if self._bar is not None:
                self._bar.update(1)
        t0 = time.perf_counter()
        if updates:
            agg = self.aggregator
            masks = None
            if agg.needs_label_masks:
                masks = {self.fed.clients[i].cid: self.head_row_masks(self.fed.clients[i])
                         for i in chosen}  # fmt: skip
            self.global_state = agg(
                self.global_state,
                updates,
                self.spec,
                weighting=self.cfg.algorithm.weighting,
                row_masks=masks,
            )
        times.aggregate = time.perf_counter() - t0
        t0 = time.perf_counter()
        f = self.cfg.federation
        due = (t + 1) % f.eval_every == 0 or t + 1 == f.rounds
        self.static_stats(t + 1)  # every round: each checkpoint holds its own statistics
        rows = self.evaluate(t + 1) if due else []
        times.evaluate = time.perf_counter() - t0
        self.round_idx += 1
        t0 = time.perf_counter()
        self._checkpoint(rows, times, chosen)
        times.checkpoint = time.perf_counter() - t0
        self.times.append(times)
        self.history.extend(rows)
        if rows:
            self._log_round(rows)
        return {"round": self.round_idx, "clients": [self.fed.clients[i].cid for i in chosen]}

    # ------------------------------------------------------------------ evaluation
    def eval_width(self, c: ClientData, round_no: int) -> WidthSpec:
        """The WidthSpec a client is evaluated (and exported) with after round ``round_no``."""
        return WidthSpec(c.width, self.cfg.algorithm.slicing, max(round_no - 1, 0))

    def static_stats(self, round_no: int) -> None:
        """HeteroFL's sBN statistics pass, after aggregation (no-op without static BN).

        Every client computes the static batch-norm statistics of the model it is
        evaluated with (:meth:`client_state`) at its width, over its own training data,
        and keeps them with its local state (the personal model under Ditto/local), so
        evaluation and checkpoints hold them. It runs after every aggregation (the
        statistics do not affect training), so every round's checkpoint holds the
        statistics of that round's weights and export only reads them. See
        :mod:`fmtl_lightning.static_bn`.
        """
        from fmtl_lightning.models import load_arrays
        from fmtl_lightning.static_bn import compute_static_stats

        if not self.spec.keys_of_kind("static_stat"):
            return
        for c in self.fed.clients:
            ws = self.eval_width(c, round_no)
            m = self.module_for(c, c.width)
            load_arrays(m.model, self.client_state(c, ws))
            stats = compute_static_stats(m.model, c.x_train)
            st = self.stores[c.cid]
            self._embed(st.personal if self.algorithm.evaluates_personal else st.local, stats, ws)

    def client_state(self, c: ClientData, ws: WidthSpec) -> dict[str, np.ndarray]:
        """The arrays a client would deploy at ``ws`` (personal, or global + local)."""
        st = self.stores[c.cid]
        return deployed_state(self.spec, self.alg, self.global_state, st.local, st.personal, ws)

    def evaluate(self, round_no: int) -> list[dict[str, Any]]:
        """Every client on its test split, with the model its algorithm evaluates (after
        the algorithm's fine-tune, if any, on a copy: stored states do not change)."""
        rows = []
        for idx, c in enumerate(self.fed.clients):
            ws = self.eval_width(c, round_no)
            ctx = self.fit_context(idx, c.width, round_no - 1)
            load_for_eval(self.algorithm, ctx, self.client_state(c, ws))
            for task, vals in ctx.module.evaluate(c.x_test, c.y_test, ctx.label_masks).items():
                rows.append(
                    {
                        "round": round_no,
                        "client": c.cid,
                        "width": c.width,
                        "task": task,
                        "loss": round(vals["loss"], 6),
                        "acc": round(vals["acc"], 6),
                        "f1": round(vals["f1"], 6) if "f1" in vals else "",
                    }
                )
        return rows

    # ------------------------------------------------------------------ persistence
    def _client_files(self) -> dict[str, dict[str, np.ndarray]]:
        return {cid: st.to_arrays() for cid, st in self.stores.items()}

    def _checkpoint(self, rows: list[dict], times: RoundTimes, chosen: list[int]) -> None:
        meta = {
            "round": self.round_idx,
            "algorithm": self.alg,
            "clients_trained": [self.fed.clients[i].cid for i in chosen],
            "times": times.as_dict(),
        }
        # history first: a record of a round that never completed is ignored on resume
        record = {"round": self.round_idx, "times": times.as_dict(), "rows": rows}
        append_history(self.run_dir, record, fresh=self.round_idx == 1)
        write_round(
            self.run_dir, self.round_idx, self.global_state, self._client_files(), meta, _csv(rows)
        )
        self._prune()

    def _prune(self) -> None:
        """Checkpoint retention (``cfg.checkpoints``), once the newest round is in place."""
        ck = self.cfg.checkpoints
        keep = rounds_to_keep(self.round_idx, ck.keep_last, ck.keep_every)
        prune_rounds(self.run_dir / "checkpoints", keep)
        self.edge.prune(keep)

    def _restore(self, round_idx: int) -> None:
        g, clients, _, _ = read_round(self.run_dir, round_idx)
        from fmtl_lightning.validation import validate_state

        validate_state(g, self.spec, 1.0, self.shared_keys, client="<checkpoint>")
        self.global_state = g
        for cid, st in self.stores.items():
            saved = ClientStore.from_arrays(clients.get(cid, {}))
            st.local, st.personal = saved.local, saved.personal
        self.history = []
        for rec in read_history(self.run_dir, round_idx):
            self.history.extend(rec["rows"])
            self.times.append(RoundTimes(**rec["times"]))
        self.round_idx = round_idx

    def _log_round(self, rows: list[dict]) -> None:
        per_client = client_scores(rows)
        vals = np.array(list(per_client.values()))
        metrics = {"mean_acc": float(vals.mean()), "worst_acc": float(vals.min())}
        metrics.update({f"acc/{cid}": v for cid, v in per_client.items()})
        self.fabric.log_dict(metrics, step=self.round_idx)

    # ------------------------------------------------------------------ driver
    _bar: Any = None

    def run(self, on_round: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Run the remaining rounds; writes metrics.csv, summary.json and plots."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # atomic: a run killed mid-write never leaves a truncated config.yaml behind
        config = yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False)
        atomic_write_text(self.run_dir / "config.yaml", config)
        atomic_write_text(self.run_dir / "spec.json", self.spec.to_json())
        write_normalisation(self.run_dir, self.fed.normalisation, self.fed.image_size)
        atomic_write_text(self.run_dir / "federation.txt", self.fed.summary + "\n")
        self._prune()  # a fresh run drops stale rounds; a resumed one, leftovers of a kill
        logger = self.logger
        rounds = self.cfg.federation.rounds
        per_round = len(self.selected(0))
        self._bar = tqdm(
            total=rounds * per_round,
            initial=self.round_idx * per_round,
            unit="fit",
            disable=not self.progress,
            desc=f"{self.cfg.name} [{self.alg}]",
            leave=True,
            mininterval=1.0,
        )
        try:
            while self.round_idx < rounds:
                self.run_round()
                logger.save()
                if on_round is not None:
                    on_round(self.round_idx)
        finally:
            self._bar.close()
            self._bar = None
        logger.finalize("success")
        atomic_write_text(self.run_dir / "metrics.csv", _csv(self.history))
        summary = summarize(self.history, self.alg, self.cfg)
        summary["times"] = [t.as_dict() for t in self.times]
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        return summary

    @classmethod
    def resume(cls, run_dir: str | Path, **kw: Any) -> Simulation:
        """Continue a run from its last complete checkpoint (the config is read from the run)."""
        run_dir = Path(run_dir)
        cfg = load_config(run_dir / "config.yaml")
        sim = cls(cfg, run_dir, **kw)
        done = completed_rounds(run_dir)
        if done:
            sim._restore(done[-1])
        return sim


# ---------------------------------------------------------------------- summaries
def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def client_scores(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per client: mean over its tasks of the accuracy, at the last round in ``rows``."""
    last = max(r["round"] for r in rows)
    acc: dict[str, list[float]] = {}
    for r in rows:
        if r["round"] == last:
            acc.setdefault(r["client"], []).append(float(r["acc"]))
    return {c: float(np.mean(v)) for c, v in acc.items()}


def summarize(rows: list[dict[str, Any]], algorithm: str, cfg: RunConfig) -> dict[str, Any]:
    scores = client_scores(rows)
    last = max(r["round"] for r in rows)
    clients: dict[str, Any] = {}
    for r in rows:
        if r["round"] != last:
            continue
        c = clients.setdefault(r["client"], {"width": r["width"], "tasks": {}})
        c["tasks"][r["task"]] = {k: r[k] for k in ("acc", "loss", "f1") if r[k] != ""}
    for cid, c in clients.items():
        c["acc"] = scores[cid]
    vals = np.sort(np.array(list(scores.values())))
    k = max(1, math.ceil(0.1 * vals.size))
    return {
        "name": cfg.name,
        "algorithm": algorithm,
        "rounds": last,
        "clients": clients,
        "mean_acc": float(vals.mean()),
        "worst_acc": float(vals[0]),
        "worst_client": min(scores, key=scores.__getitem__),
        "bottom10_acc": float(vals[:k].mean()),
    }


def local_baseline(cfg: RunConfig, fed: Federation) -> tuple[RunConfig, Federation]:
    """The local-only baseline of a run: every client trains alone, same data, same steps.

    An edge client's baseline is the same client trained in-process: with no server
    there is nothing to exchange, and the edge runtime's SGD steps equal Lightning's
    (the edge parity tests). The baseline's config has ``edge: false`` everywhere and the
    default aggregator (nothing is aggregated), so it is a config the validator accepts
    (edge clients and the label split need a server algorithm) and ``--resume`` can reload it.
    """
    local_cfg = cfg.replace(
        algorithm=dataclasses.replace(cfg.algorithm, name="local", aggregator=Mean()),
        clients=tuple(dataclasses.replace(g, edge=False) for g in cfg.clients),
        compare_local=False,
    )
    validate_config(local_cfg)
    clients = [dataclasses.replace(c, edge=False) for c in fed.clients]
    return local_cfg, dataclasses.replace(fed, clients=clients)


def run_config(cfg: RunConfig | dict, run_dir: str | Path, *, progress: bool = True) -> dict:
    """Python API of ``fmtl simulate``: the run, then (optionally) its local-only baseline."""
    from fmtl_lightning.report import write_report

    cfg = parse_config(cfg) if isinstance(cfg, dict) else cfg
    run_dir = Path(run_dir)
    sim = Simulation(cfg, run_dir, progress=progress)
    summary = sim.run()
    baseline = None
    if cfg.compare_local and cfg.algorithm.name != "local":
        local_cfg, local_fed = local_baseline(cfg, sim.fed)
        bsim = Simulation(
            local_cfg, run_dir / "local_baseline", progress=progress, federation=local_fed
        )
        baseline = bsim.run()
    return write_report(run_dir, summary, baseline)


def resume_run(run_dir: str | Path, *, progress: bool = True) -> dict:
    """Python API of ``fmtl simulate --resume RUN_DIR``."""
    from fmtl_lightning.report import write_report

    run_dir = Path(run_dir)
    sim = Simulation.resume(run_dir, progress=progress)
    summary = sim.run()
    baseline = None
    bdir = run_dir / "local_baseline"
    if sim.cfg.compare_local and sim.cfg.algorithm.name != "local":
        local_cfg, local_fed = local_baseline(sim.cfg, sim.fed)
        if bdir.is_dir() and (bdir / "config.yaml").exists():
            bsim = Simulation.resume(bdir, progress=progress, federation=local_fed)
        else:
            bsim = Simulation(local_cfg, bdir, progress=progress, federation=local_fed)
        baseline = bsim.run()
    return write_report(run_dir, summary, baseline)
