"""The ServerApp: the deployed round loop, with checkpoints after every round and resume.

Run config keys (``[tool.flwr.app.config]`` of the Flower app, or ``flwr run -c``):

========================  ========================================================
``config``                the fmtl YAML (same file as ``fmtl simulate``); a relative
                          path is looked up in the Flower app directory (the FAB)
``run-dir``               where rounds are checkpointed; relative to the SuperLink's
                          working directory. An existing run dir is resumed.
``num-rounds``            0: ``federation.rounds`` of the YAML
``reply-timeout``         the round deadline: seconds a round waits for replies; late
                          nodes are recorded as failed and the round goes on without
                          them (their late replies are recorded, never aggregated)
``min-replies``           a round with fewer accepted replies by its deadline
                          aggregates nothing (int in [1, clients of the YAML]; 1)
``min-nodes``             registered nodes to wait for before round 1 (0: every client
                          of the YAML)
``node-wait-timeout``     seconds to wait for ``min-nodes``; then start with whoever is
                          there (at least one)
``node-auth``             true (default): every client of the YAML must be bound in
                          ``node-ids`` (the SuperLink runs ``--enable-supernode-auth``);
                          false: no binding required (trials, the simulation engine)
``node-ids``              ``c00=NODE_ID,c01=NODE_ID``: the node id of the key registered
                          for each client (``flwr supernode register``); a node claiming
                          a client bound to another node is refused
``log-colour``            false: Flower's log lines without ANSI colour codes (``fmtl
                          deploy local`` sets it when its output is not a terminal)
``max-examples``          the largest ``num-examples`` a reply may claim; a larger
                          claim (it would outweigh the other clients under example
                          weighting) is rejected. 0: ``data.samples_per_client`` of the
                          YAML, the most a client's shard holds; raise it for nodes
                          that train on their own, larger data
========================  ========================================================

The round logic is the server engine's (:class:`~fmtl_lightning.engine.ServerEngine`,
the same the in-process simulation runs); this module is its Flower transport: it waits
for nodes, moves messages through the :class:`FMTLStrategy` and commits each round.

Layout of the run dir (the simulation's): ``config.yaml``, ``spec.json``,
``checkpoints/round_NNNN/`` (``global.safetensors``, ``meta.json`` with the round report:
who was sent what at which width and how many bytes, who was accepted / rejected /
failed and why, client metrics, wall times; ``metrics.csv``) kept by the YAML's
``checkpoints`` rule, ``checkpoints/history.jsonl`` (every round's report and metric
rows), and ``metrics.csv`` and ``summary.json`` after the last round.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.logger import update_console_handler
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fmtl_lightning.checkpoint import round_dir
from fmtl_lightning.config import ConfigError, RunConfig, load_config
from fmtl_lightning.deploy.auth import missing_bindings, parse_node_ids
from fmtl_lightning.deploy.evaluation import eval_due
from fmtl_lightning.deploy.rounds import LateReplies, RoundReport, check_round_rules, collect
from fmtl_lightning.deploy.strategy import FMTLStrategy
from fmtl_lightning.engine import ServerEngine, server_plan
from fmtl_lightning.engine.metrics import metric_rows, per_task, rows_csv, summarize
from fmtl_lightning.engine.plan import planned_clients, refuse_undeployable
from fmtl_lightning.errors import FMTLError
from mobile_client.fileio import atomic_write_text

DEFAULTS: dict[str, Any] = {
    "config": "fmtl.yaml",
    "run-dir": "runs/flower",
    "num-rounds": 0,
    "reply-timeout": 600.0,
    "min-nodes": 0,
    "node-wait-timeout": 300.0,
    "max-examples": 0,
    "log-colour": True,
    "node-auth": True,
    "node-ids": "",
    "min-replies": 1,
}


def app_dir(grid: Grid) -> Path | None:
    """Where the SuperLink unpacked this run's Flower app (FAB)."""
    from flwr.common.config import get_project_dir

    try:
        r = grid.run
        return get_project_dir(r.fab_id, r.fab_version, r.fab_hash)
    except (AttributeError, ValueError):
        return None


def resolve_config(value: str, base: Path | None) -> Path:
    p = Path(value).expanduser()
    if not p.is_absolute() and base is not None and (base / p).is_file():
        return base / p
    if not p.is_file():
        raise ConfigError(f"run config 'config': {value!r} is not a file (app dir: {base})")
    return p


def _rows(report: RoundReport) -> list[dict[str, Any]]:
    """metrics.csv rows (the simulator's columns, in client order) from the nodes' scores
    of the aggregated model, at the width each was evaluated with."""
    rows = []
    for cid in sorted(report.evaluated):
        m = report.evaluated[cid]
        rows.extend(metric_rows(report.round, cid, m["width"], per_task(m)))
    return rows


class DeployedRun:
    """The server side of one deployed run directory (see the module docstring)."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | Path,
        *,
        reply_timeout: float,
        max_examples: int = 0,
        node_ids: Mapping[str, int] | None = None,
        min_replies: int = 1,
    ) -> None:
        """``node_ids``: client id -> node id of its registered key (None: unbound);
        ``reply_timeout`` (the round deadline) and ``min_replies``: see
        :mod:`fmtl_lightning.deploy.rounds`."""
        refuse_undeployable(cfg)
        n = len(planned_clients(cfg))
        check_round_rules(reply_timeout, min_replies,
                          max(1, math.ceil(cfg.federation.fraction * n - 1e-9)))  # fmt: skip
        self.cfg = cfg
        self.engine = ServerEngine(server_plan(cfg), run_dir, max_examples=max_examples)
        self.run_dir = self.engine.run_dir
        self.engine.check_same_config()
        self.engine.restore()  # an existing run dir is resumed after its last round
        self.start_round = self.engine.round_idx
        if self.start_round:
            log(INFO, "fmtl: resuming %s after round %d", self.run_dir, self.start_round)
        self.engine.write_run_files()
        self.strategy = FMTLStrategy(self.engine, reply_timeout=reply_timeout, node_ids=node_ids,
                                     min_replies=min_replies)  # fmt: skip
        self.late = LateReplies()
        self.num_rounds = cfg.federation.rounds  # the last round (evaluation is due then)

    def wait_for_nodes(self, grid: Grid, min_nodes: int, timeout: float) -> int:
        want = min_nodes or len(self.engine.plan.clients)
        t0 = time.monotonic()
        while True:
            self.strategy.register(grid)
            n = len(self.strategy.nodes)
            if n >= want:
                return n
            if time.monotonic() - t0 > timeout and n >= 1:
                log(WARNING, "fmtl: %d of %d nodes after %g s; starting", n, want, timeout)
                return n
            time.sleep(1.0)

    def run_round(self, grid: Grid, server_round: int) -> RoundReport:
        """Train, aggregate, evaluate when due (every node scores the aggregated model,
        as the simulation does), commit."""
        from flwr.app import ArrayRecord, ConfigRecord

        t0 = time.perf_counter()
        s = self.strategy
        late = self.late.pull(grid)  # replies to earlier rounds since: recorded, never used
        s.register(grid)  # nodes that joined since the last round
        msgs = list(s.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
        t1 = time.perf_counter()
        replies, unanswered, by_link = collect(grid, msgs, s.reply_timeout)  # the deadline
        t2 = time.perf_counter()
        s.aggregate_train(server_round, replies)
        rep = s.report
        rep.late = late
        for n in s.nodes.values():  # e.g. a node that stopped sending heartbeats
            if n.node_id in by_link:
                rep.failed[n.client.client_id] = by_link[n.node_id]
        rep.times["wait"] = t2 - t1
        self.late.expect(server_round, unanswered,
                         {n.node_id: n.client.client_id for n in s.nodes.values()})  # fmt: skip
        if eval_due(server_round, self.cfg.federation.eval_every, self.num_rounds):
            t3 = time.perf_counter()
            msgs = list(s.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), grid))
            ev_replies, _, ev_link = collect(grid, msgs, s.reply_timeout)
            s.aggregate_evaluate(server_round, ev_replies)
            for n in s.nodes.values():
                if n.node_id in ev_link:
                    rep.not_evaluated[n.client.client_id] = ev_link[n.node_id]
            rep.times["evaluate"] = time.perf_counter() - t3
        rep.late.update(self.late.pull(grid))  # including this round's, since its deadline
        t3 = time.perf_counter()
        meta: dict[str, Any] = {"clients_trained": sorted(rep.accepted), "report": rep.as_dict()}
        self.engine.commit_round(server_round, _rows(rep), meta, record={"report": rep.as_dict()})
        rep.times["checkpoint"] = time.perf_counter() - t3
        rep.times["total"] = time.perf_counter() - t0
        # the round's meta again, with its final times (the journal keeps the first)
        meta = {"round": server_round, "algorithm": self.cfg.algorithm.name, **meta,
                "report": rep.as_dict()}  # fmt: skip
        path = round_dir(self.run_dir, server_round) / "meta.json"
        atomic_write_text(path, json.dumps(meta, indent=1))
        return rep

    def run(self, grid: Grid, num_rounds: int, min_nodes: int, node_wait: float) -> dict:
        self.num_rounds = num_rounds
        self.wait_for_nodes(grid, min_nodes, node_wait)
        for r in range(self.start_round + 1, num_rounds + 1):
            log(INFO, "fmtl: [ROUND %d/%d]", r, num_rounds)
            self.run_round(grid, r)
        atomic_write_text(self.run_dir / "metrics.csv", rows_csv(self.engine.history))
        summary = self.summary(num_rounds)
        summary["late_after_last_round"] = self.late.pull(grid)
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        return summary

    def summary(self, num_rounds: int) -> dict[str, Any]:
        """``fmtl simulate``'s summary (:func:`summarize` of the metric rows: per client the
        mean over its tasks of the test accuracy of the aggregated model at the last
        evaluated round), plus the deployment's: nodes, refusals, every round's report,
        and ``not_evaluated``: the clients without a score at that round, and why."""
        rounds = []
        for rec in self.engine.records:  # the journal: every round, whatever was pruned
            rep = rec.get("report", {})
            rounds.append(
                {
                    "round": rec["round"],
                    "accepted": sorted(rep.get("accepted", {})),
                    "rejected": rep.get("rejected", {}),
                    "failed": rep.get("failed", {}),
                    "not_evaluated": rep.get("not_evaluated", {}),
                    "late": rep.get("late", {}),
                    "not_aggregated": rep.get("not_aggregated", ""),
                    "times": rep.get("times", {}),
                }
            )
        rows = self.engine.history
        out: dict[str, Any] = {"name": self.cfg.name, "algorithm": self.cfg.algorithm.name,
                               "rounds": num_rounds, "clients": {}}  # fmt: skip
        if rows:
            out = summarize(rows, self.cfg.algorithm.name, self.cfg.name)
        last = max((r["round"] for r in rows), default=None)
        planned = {c.client_id for c in self.engine.plan.clients}
        missing = {}
        for rec in self.engine.records:
            if rec["round"] == last:
                missing = dict(rec.get("report", {}).get("not_evaluated", {}))
        for cid in sorted(planned - set(out["clients"]) - set(missing)):
            missing[cid] = "no node of this client was registered at the last evaluation"
        out.update(
            {
                "rounds": num_rounds,
                "evaluated_round": last,
                "resumed_after": self.start_round,
                "nodes": {
                    n.client.client_id: {
                        "node": n.node_id,
                        "width": n.width,
                        "runtime": n.runtime,
                    }  # fmt: skip
                    for n in self.strategy.nodes.values()
                },
                "refused_nodes": {str(k): v for k, v in self.strategy.refused.items()},
                "per_round": rounds,
                "not_evaluated": missing,
            }
        )
        return out


def node_bindings(cfg: RunConfig, node_auth: object, node_ids: object) -> dict[str, int] | None:
    """The run config's ``node-ids`` (client -> node id; :mod:`fmtl_lightning.deploy.auth`).
    With ``node-auth`` on, every client of the YAML must be bound; off, an empty
    ``node-ids`` binds nothing (any node may claim any client: trials, the simulation
    engine's virtual nodes)."""
    if not isinstance(node_auth, bool):
        raise ConfigError(f"run config 'node-auth': expected true or false, got {node_auth!r}")
    clients = [c.client_id for c in planned_clients(cfg)]
    ids = parse_node_ids(str(node_ids), clients)
    if not node_auth:
        return ids or None
    missing = missing_bindings(ids, clients)
    if missing:
        raise ConfigError(
            f"run config 'node-ids' binds no node to {', '.join(missing)}, and 'node-auth' is "
            "on: register each client's SuperNode key (fmtl deploy register, or flwr "
            'supernode register KEY.pub) and pass node-ids="c00=NODE_ID,..." (or '
            "node-auth=false for a trial without node authentication)"
        )
    return ids


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = {**DEFAULTS, **dict(context.run_config)}
    update_console_handler(colored=bool(rc["log-colour"]))
    try:
        cfg = load_config(resolve_config(str(rc["config"]), app_dir(grid)))
        num_rounds = int(rc["num-rounds"]) or cfg.federation.rounds
        run = DeployedRun(
            cfg,
            Path(str(rc["run-dir"])),
            reply_timeout=rc["reply-timeout"],
            max_examples=int(rc["max-examples"]),
            node_ids=node_bindings(cfg, rc["node-auth"], rc["node-ids"]),
            min_replies=rc["min-replies"],
        )
    except FMTLError as exc:
        log(WARNING, "fmtl: %s", exc)
        raise
    summary = run.run(grid, num_rounds, int(rc["min-nodes"]), float(rc["node-wait-timeout"]))
    log(INFO, "fmtl: done: %s", json.dumps({k: summary[k] for k in ("rounds", "nodes")}))
