"""The in-process simulation: the server engine and the clients in one process.

One round::

    engine.assign: seeded client sample, width per client, the global state sliced
    -> per client: ClientPool.train (its algorithm through Lightning's Fabric, or an
       edge client's exported step graphs in ONNX Runtime)
    -> engine.aggregate: the configured aggregator over the shared updates (pure numpy)
    -> static batch norm's statistics pass (ClientPool.static_stats)
    -> when evaluation is due: every client on its own test split
    -> engine.commit_round: history, atomic checkpoint, retention.

The server logic is :class:`~fmtl_lightning.engine.ServerEngine`'s (the Flower
deployment runs the same engine); the clients are a
:class:`~fmtl_lightning.clients.ClientPool`. All randomness is derived from (seed,
round, client), so ``resume`` replays the remaining rounds exactly as an uninterrupted
run would.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from lightning.fabric.loggers import CSVLogger
from lightning.pytorch.callbacks import Callback
from tqdm.auto import tqdm

from fmtl_lightning.aggregation import ClientUpdate
from fmtl_lightning.aggregators import AggregationRule, Mean
from fmtl_lightning.clients import ClientPool, federation_plan
from fmtl_lightning.config import RunConfig, load_config, parse_config, validate_config
from fmtl_lightning.engine import ServerEngine
from fmtl_lightning.engine.metrics import client_scores, metric_rows, rows_csv, summarize
from fmtl_lightning.errors import FMTLError
from fmtl_lightning.export_checks import warn_step_optimizer
from fmtl_lightning.fed_data import ClientData, Federation, build_federation
from fmtl_lightning.model_source import ModelSource
from fmtl_lightning.roles import ModelSpec, WidthSpec
from fmtl_lightning.run_artifacts import write_normalisation
from fmtl_lightning.slicing import slice_state
from mobile_client.fileio import atomic_write_text


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

    ``engine`` is the server (global state, rounds, checkpoints), ``pool`` the clients
    (data, local state, training). ``aggregator`` replaces the configured
    ``cfg.algorithm.aggregator`` for this object only (e.g. a benchmark's wrapper around
    a registered rule); ``config.yaml`` in the run still names the configured one. It
    must fit ``algorithm.weighting`` (its own call raises ``ValueError`` otherwise).
    ``model``: a user's own model (:class:`~fmtl_lightning.model_source.FederatedModel`)
    instead of the configured built-in family; ``federation``: the clients' data (default:
    the config's dataset, partitioned as it says); ``callbacks``: Lightning Callbacks
    called in every local fit (after the model's own, :mod:`fmtl_lightning.own_steps`).
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | Path,
        *,
        progress: bool = True,
        federation: Federation | None = None,
        aggregator: AggregationRule | None = None,
        model: ModelSource | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.fed = fed = federation if federation is not None else build_federation(cfg)
        plan = federation_plan(cfg, fed, model)
        self.engine = ServerEngine(plan, self.run_dir, aggregator=aggregator)
        # Lightning's own CSV logger gets the per-round aggregates; our metrics.csv the details
        self.logger = CSVLogger(str(self.run_dir), name="lightning_logs")
        self.pool = ClientPool(cfg, fed, plan, self.run_dir / "edge", loggers=[self.logger],
                               callbacks=callbacks)  # fmt: skip
        self.engine.on_prune = self.pool.edge.prune
        self.times: list[RoundTimes] = []

    # ------------------------------------------------------------------ views
    @property
    def spec(self) -> ModelSpec:
        return self.engine.spec

    @property
    def shared_keys(self) -> tuple[str, ...]:
        return self.engine.shared_keys

    @property
    def global_state(self) -> dict[str, np.ndarray]:
        return self.engine.global_state

    @global_state.setter
    def global_state(self, state: dict[str, np.ndarray]) -> None:
        self.engine.global_state = state

    @property
    def round_idx(self) -> int:
        """Rounds completed."""
        return self.engine.round_idx

    @property
    def history(self) -> list[dict[str, Any]]:
        """Metric rows of every round so far."""
        return self.engine.history

    def client_state(self, c: ClientData, ws: WidthSpec) -> dict[str, np.ndarray]:
        """The arrays client ``c`` would deploy at ``ws`` now (personal, or global + local)."""
        return self.pool.client_state(c, ws, self.engine.global_state)

    def set_lr(self, lr: float) -> None:
        """Change the SGD learning rate from the next fit on (a schedule, e.g. HeteroFL's
        step decay): the run's config and every client module built so far."""
        self.pool.set_lr(lr)
        self.cfg = self.pool.cfg

    def edge_bundle(self, idx: int, ws: WidthSpec) -> Path:
        """The device bundle of client ``idx`` at ``ws`` as it stands (exported once per width)."""
        received = slice_state(self.engine.global_state, self.engine.spec, ws)
        return self.pool.edge.bundle_for(self.pool.edge_job(idx, ws, received))

    def export_client(self, cid: str, out_dir: str | Path, **kw: Any) -> Path:
        """Export client ``cid``'s model as it stands (its personal model, or the global
        state with its own heads, at its width) as a device bundle, with its data's
        normalisation (:func:`export.run_export.export_model`; ``kw`` go there). Works for
        a user's own model too; a run directory of a built-in family can also be exported
        later with ``fmtl export``."""
        from export.bundle import RunExportError
        from export.run_export import export_model
        from export.step_optimizer import step_optimizer
        from fmtl_lightning.models import load_arrays
        from fmtl_lightning.tasks import get_task

        ids = [c.cid for c in self.fed.clients]
        if cid not in ids:
            raise FMTLError(f"client {cid!r} is not in this run (clients: {', '.join(ids)})")
        idx = ids.index(cid)
        c = self.fed.clients[idx]
        model = self.pool.module_for(c, c.width).model
        load_arrays(model, self.client_state(c, self.engine.eval_width(idx, self.round_idx)))
        mean, std = self.fed.normalisation[c.spec.domain]
        norm = {"mean": mean, "std": std, "input_shape": list(model.input_shape),
                "scale": 1.0, "domain": c.spec.domain}  # fmt: skip
        kw.setdefault("normalisation", norm)
        opt = self.pool.trained_optimizer(c)
        try:  # SGD with momentum / weight decay / nesterov: the step graphs take it
            step_optimizer(opt, f"client {cid}")
            kw.setdefault("optimizer", opt)
        except RunExportError as exc:
            warn_step_optimizer(opt, f"client {cid}", str(exc))
        return export_model(model, {t: get_task(t) for t in c.tasks}, out_dir, client=cid,
                            policy=self.spec.policy, **kw)  # fmt: skip

    # ------------------------------------------------------------------ one round
    def run_round(self) -> dict[str, Any]:
        """One round (see the module docstring); returns the round number and who trained."""
        eng, pool = self.engine, self.pool
        t = eng.round_idx
        times = RoundTimes()
        updates = []
        chosen = eng.assign(t)
        for a in chosen:
            if self._bar is not None:
                self._bar.set_description(f"round {t + 1}/{self.cfg.federation.rounds}")
                self._bar.set_postfix_str(f"{a.client.client_id} w={a.ws.width:g}")
            t0 = time.perf_counter()
            res = pool.train(a.idx, a.ws, t, a.received)
            times.train += time.perf_counter() - t0
            if res.shared is not None:
                updates.append(ClientUpdate(a.client.client_id, res.shared, res.num_examples, a.ws))
            if self._bar is not None:
                self._bar.update(1)
        t0 = time.perf_counter()
        masks = None
        if updates and eng.aggregator.needs_label_masks:
            masks = {a.client.client_id: pool.head_row_masks(self.fed.clients[a.idx])
                     for a in chosen}  # fmt: skip
        refused = eng.aggregate(updates, masks)
        if refused is not None:  # checked in-process updates: a bug, never adopted
            raise FMTLError(f"round {t + 1}: {refused}")
        times.aggregate = time.perf_counter() - t0
        t0 = time.perf_counter()
        f = self.cfg.federation
        due = (t + 1) % f.eval_every == 0 or t + 1 == f.rounds
        # every round: each checkpoint holds its own statistics
        pool.static_stats(self.eval_widths(t + 1), eng.global_state)
        rows = self.evaluate(t + 1) if due else []
        times.evaluate = time.perf_counter() - t0
        t0 = time.perf_counter()
        trained = [a.client.client_id for a in chosen]
        files, unchanged = pool.client_files()
        eng.commit_round(t + 1, rows, {"clients_trained": trained, "times": times.as_dict()},
                         files, {"times": times.as_dict()}, carried=unchanged)  # fmt: skip
        times.checkpoint = time.perf_counter() - t0
        self.times.append(times)
        if rows:
            self._log_round(rows)
        return {"round": eng.round_idx, "clients": trained}

    def eval_widths(self, round_no: int) -> dict[int, WidthSpec]:
        """Every client's eval (and export) WidthSpec after round ``round_no``."""
        return {i: self.engine.eval_width(i, round_no) for i in range(len(self.fed.clients))}

    def evaluate(self, round_no: int) -> list[dict[str, Any]]:
        """Every client on its test split, with the model its algorithm evaluates (after
        the algorithm's fine-tune, if any, on a copy: stored states do not change)."""
        rows = []
        for idx, ws in self.eval_widths(round_no).items():
            c = self.fed.clients[idx]
            per = self.pool.evaluate(idx, self.client_state(c, ws), c.width, round_no - 1)
            rows.extend(metric_rows(round_no, c.cid, c.width, per))
        return rows

    def _log_round(self, rows: list[dict]) -> None:
        per_client = client_scores(rows)
        vals = np.array(list(per_client.values()))
        metrics = {"mean_acc": float(vals.mean()), "worst_acc": float(vals.min())}
        metrics.update({f"acc/{cid}": v for cid, v in per_client.items()})
        self.pool.fabric.log_dict(metrics, step=self.round_idx)

    # ------------------------------------------------------------------ driver
    _bar: Any = None

    def run(self, on_round: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Run the remaining rounds; writes metrics.csv, summary.json and plots."""
        eng = self.engine
        eng.write_run_files()
        write_normalisation(self.run_dir, self.fed.normalisation, self.fed.image_size)
        atomic_write_text(self.run_dir / "federation.txt", self.fed.summary + "\n")
        eng.prune()  # a fresh run drops stale rounds; a resumed one, leftovers of a kill
        rounds = self.cfg.federation.rounds
        per_round = len(eng.sample(0))
        self._bar = tqdm(
            total=rounds * per_round,
            initial=eng.round_idx * per_round,
            unit="fit",
            disable=not self.progress,
            desc=f"{self.cfg.name} [{self.cfg.algorithm.name}]",
            leave=True,
            mininterval=1.0,
        )
        try:
            while eng.round_idx < rounds:
                self.run_round()
                self.logger.save()
                if on_round is not None:
                    on_round(eng.round_idx)
        finally:
            self._bar.close()
            self._bar = None
        self.logger.finalize("success")
        atomic_write_text(self.run_dir / "metrics.csv", rows_csv(self.history))
        summary = summarize(self.history, self.cfg.algorithm.name, self.cfg.name)
        summary["times"] = [t.as_dict() for t in self.times]
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        return summary

    def close(self) -> None:
        """Remove the clients' state files kept while the run is live (the checkpoints
        hold them); the object must not train or read client states after."""
        self.pool.close()

    @classmethod
    def resume(cls, run_dir: str | Path, *, rounds: int | None = None, **kw: Any) -> Simulation:
        """Continue a run from its last complete checkpoint (the config is read from the run).

        ``rounds``: a new total, to take a run further than it was started for (the
        deployed server's ``num-rounds`` on a resumed run). No setting depends on the
        total but the schedule of evaluations (the last round is always evaluated), so
        a run of N rounds taken to M trains as a run of M would."""
        from fmtl_lightning.checkpoint import completed_rounds
        from fmtl_lightning.config import ConfigError

        run_dir = Path(run_dir)
        cfg = load_config(run_dir / "config.yaml")
        if rounds is not None:
            if isinstance(rounds, bool) or not isinstance(rounds, int):
                raise ConfigError(f"federation.rounds: expected an integer, got {rounds!r}")
            cfg = cfg.replace(federation=dataclasses.replace(cfg.federation, rounds=rounds))
            validate_config(cfg)  # a number in range first
            done = completed_rounds(run_dir)
            if done and rounds < done[-1]:
                raise ConfigError(
                    f"federation.rounds: {rounds} is fewer than the {done[-1]} rounds "
                    f"{str(run_dir)!r} has completed"
                )
        sim = cls(cfg, run_dir, **kw)
        sim.pool.restore(sim.engine.restore())
        sim.times = [RoundTimes(**rec["times"]) for rec in sim.engine.records]
        return sim


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
    clients = [c.replace(edge=False) for c in fed.clients]
    return local_cfg, dataclasses.replace(fed, clients=clients)


def run_config(
    cfg: RunConfig | dict,
    run_dir: str | Path,
    *,
    progress: bool = True,
    model: ModelSource | None = None,
    federation: Federation | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict:
    """Python API of ``fmtl simulate``: the run, then (optionally) its local-only baseline.

    ``model``: a user's own model instead of the configured family; ``federation``: the
    clients' own data (:mod:`fmtl_lightning.fed_data`) instead of the configured dataset;
    ``callbacks``: Lightning Callbacks called in every local fit of both runs.
    """
    from fmtl_lightning.report import write_report

    cfg = parse_config(cfg) if isinstance(cfg, dict) else cfg
    run_dir = Path(run_dir)
    kw: dict[str, Any] = {"progress": progress, "model": model, "callbacks": callbacks}
    sim = Simulation(cfg, run_dir, federation=federation, **kw)
    summary = sim.run()
    sim.close()
    baseline = None
    if cfg.compare_local and cfg.algorithm.name != "local":
        local_cfg, local_fed = local_baseline(cfg, sim.fed)
        bsim = Simulation(local_cfg, run_dir / "local_baseline", federation=local_fed, **kw)
        baseline = bsim.run()
        bsim.close()
    return write_report(run_dir, summary, baseline)


def resume_run(
    run_dir: str | Path,
    *,
    rounds: int | None = None,
    progress: bool = True,
    model: ModelSource | None = None,
    federation: Federation | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict:
    """Python API of ``fmtl simulate --resume RUN_DIR [--rounds N]`` (pass the ``model``
    and ``federation`` the run was started with, if it was started with its own;
    ``callbacks`` as :func:`run_config`). ``rounds``: take the run, and its local
    baseline, further to this many rounds (:meth:`Simulation.resume`)."""
    from fmtl_lightning.report import write_report

    run_dir = Path(run_dir)
    kw: dict[str, Any] = {"progress": progress, "model": model, "callbacks": callbacks}
    sim = Simulation.resume(run_dir, rounds=rounds, federation=federation, **kw)
    summary = sim.run()
    sim.close()
    baseline = None
    bdir = run_dir / "local_baseline"
    if sim.cfg.compare_local and sim.cfg.algorithm.name != "local":
        local_cfg, local_fed = local_baseline(sim.cfg, sim.fed)
        if bdir.is_dir() and (bdir / "config.yaml").exists():
            bsim = Simulation.resume(bdir, rounds=rounds, federation=local_fed, **kw)
        else:
            bsim = Simulation(local_cfg, bdir, federation=local_fed, **kw)
        baseline = bsim.run()
        bsim.close()
    return write_report(run_dir, summary, baseline)
