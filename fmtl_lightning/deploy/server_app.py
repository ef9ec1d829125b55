"""The ServerApp: the deployed round loop, with checkpoints after every round and resume.

Run config keys (``[tool.flwr.app.config]`` of the Flower app, or ``flwr run -c``):

========================  ========================================================
``config``                the fmtl YAML (same file as ``fmtl simulate``); a relative
                          path is looked up in the Flower app directory (the FAB)
``run-dir``               where rounds are checkpointed; relative to the SuperLink's
                          working directory. An existing run dir is resumed.
``num-rounds``            0: ``federation.rounds`` of the YAML
``reply-timeout``         seconds a round waits for replies; late nodes are recorded
                          as failed and the round goes on without them
``min-nodes``             registered nodes to wait for before round 1 (0: every client
                          of the YAML)
``node-wait-timeout``     seconds to wait for ``min-nodes``; then start with whoever is
                          there (at least one)
``max-examples``          the largest ``num-examples`` a reply may claim; a larger
                          claim (it would outweigh the other clients under example
                          weighting) is rejected. 0: ``data.samples_per_client`` of the
                          YAML, the most a client's shard holds; raise it for nodes
                          that train on their own, larger data
========================  ========================================================

Layout of the run dir: ``config.yaml``, ``spec.json``, ``checkpoints/round_NNNN/``
(``global.safetensors``, ``meta.json`` with the round report: who was sent what at
which width and how many bytes, who was accepted / rejected / failed and why, client
metrics, wall times; ``metrics.csv``), and ``summary.json`` after the last round.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fmtl_lightning.checkpoint import completed_rounds, read_round, write_round
from fmtl_lightning.config import ConfigError, RunConfig, config_to_dict, load_config
from fmtl_lightning.deploy.plan import ServerPlan, server_plan
from fmtl_lightning.deploy.strategy import FMTLStrategy, RoundReport
from fmtl_lightning.errors import FMTLError
from fmtl_lightning.validation import validate_state

METRIC_FIELDS = ("round", "client", "width", "task", "loss", "acc", "f1")
DEFAULTS: dict[str, Any] = {
    "config": "fmtl.yaml",
    "run-dir": "runs/flower",
    "num-rounds": 0,
    "reply-timeout": 600.0,
    "min-nodes": 0,
    "node-wait-timeout": 300.0,
    "max-examples": 0,
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
    """metrics.csv rows (the simulator's columns) from the accepted clients' metrics."""
    rows = []
    for cid, m in report.accepted.items():
        width = report.sent[cid]["width"]
        tasks = sorted({k.split("/", 1)[1] for k in m if k.startswith("acc/")})
        for t in tasks:
            rows.append(
                {
                    "round": report.round,
                    "client": cid,
                    "width": width,
                    "task": t,
                    "loss": m.get(f"loss/{t}", ""),
                    "acc": m[f"acc/{t}"],
                    "f1": m.get(f"f1/{t}", ""),
                }
            )
    return rows


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


class DeployedRun:
    """The server side of one deployed run directory (see the module docstring)."""

    def __init__(
        self, cfg: RunConfig, run_dir: str | Path, *, reply_timeout: float, max_examples: int = 0
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.plan: ServerPlan = server_plan(cfg)
        self.start_round = 0
        state = dict(self.plan.initial_state)
        self._check_or_write_config()
        done = completed_rounds(self.run_dir)
        if done:
            g, _, meta, _ = read_round(self.run_dir, done[-1])
            validate_state(g, self.plan.spec, 1.0, self.plan.shared_keys, client="<checkpoint>")
            state, self.start_round = g, done[-1]
            log(INFO, "fmtl: resuming %s after round %d", self.run_dir, done[-1])
        self.strategy = FMTLStrategy(
            self.plan, state, reply_timeout=reply_timeout, max_examples=max_examples
        )

    def _check_or_write_config(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(config_to_dict(self.cfg), sort_keys=True)
        saved = self.run_dir / "config.json"
        if saved.is_file() and completed_rounds(self.run_dir):
            if saved.read_text() != text:
                raise ConfigError(
                    f"run dir {str(self.run_dir)!r} holds rounds of another config; "
                    "use a new run-dir (or the same YAML to resume)"
                )
        import yaml

        saved.write_text(text)
        (self.run_dir / "config.yaml").write_text(
            yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False)
        )
        (self.run_dir / "spec.json").write_text(self.plan.spec.to_json())

    def wait_for_nodes(self, grid: Grid, min_nodes: int, timeout: float) -> int:
        want = min_nodes or len(self.plan.clients)
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
        from flwr.app import ArrayRecord, ConfigRecord

        t0 = time.perf_counter()
        s = self.strategy
        s.register(grid)  # nodes that joined since the last round
        msgs = list(s.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
        t1 = time.perf_counter()
        replies = grid.send_and_receive(msgs, timeout=s.reply_timeout) if msgs else []
        t2 = time.perf_counter()
        s.aggregate_train(server_round, replies)
        rep = s.report
        rep.times["wait"] = t2 - t1
        t3 = time.perf_counter()
        meta = {
            "round": server_round,
            "algorithm": self.cfg.algorithm.name,
            "clients_trained": sorted(rep.accepted),
            "report": rep.as_dict(),
        }
        write_round(self.run_dir, server_round, s.global_state, {}, meta, _csv(_rows(rep)))
        rep.times["checkpoint"] = time.perf_counter() - t3
        rep.times["total"] = time.perf_counter() - t0
        # rewrite meta with the final times (cheap, atomic)
        meta["report"] = rep.as_dict()
        rd = self.run_dir / "checkpoints" / f"round_{server_round:04d}" / "meta.json"
        tmp = rd.with_name(".meta.json.tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, rd)
        return rep

    def run(self, grid: Grid, num_rounds: int, min_nodes: int, node_wait: float) -> dict:
        self.wait_for_nodes(grid, min_nodes, node_wait)
        for r in range(self.start_round + 1, num_rounds + 1):
            log(INFO, "fmtl: [ROUND %d/%d]", r, num_rounds)
            self.run_round(grid, r)
        summary = self.summary(num_rounds)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def summary(self, num_rounds: int) -> dict[str, Any]:
        rounds = []
        for r in completed_rounds(self.run_dir):
            _, _, meta, _ = read_round(self.run_dir, r)
            rep = meta.get("report", {})
            rounds.append(
                {
                    "round": r,
                    "accepted": sorted(rep.get("accepted", {})),
                    "rejected": rep.get("rejected", {}),
                    "failed": rep.get("failed", {}),
                    "times": rep.get("times", {}),
                }
            )
        last = self.strategy.history[-1].accepted if self.strategy.history else {}
        accs = {
            cid: float(np.mean([v for k, v in m.items() if k.startswith("acc/")]))
            for cid, m in last.items()
            if any(k.startswith("acc/") for k in m)
        }
        return {
            "name": self.cfg.name,
            "algorithm": self.cfg.algorithm.name,
            "rounds": num_rounds,
            "resumed_after": self.start_round,
            "nodes": {
                n.client.client_id: {"node": n.node_id, "width": n.width, "runtime": n.runtime}
                for n in self.strategy.nodes.values()
            },
            "refused_nodes": {str(k): v for k, v in self.strategy.refused.items()},
            "per_round": rounds,
            "last_round_client_acc": accs,
        }


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = {**DEFAULTS, **dict(context.run_config)}
    try:
        cfg = load_config(resolve_config(str(rc["config"]), app_dir(grid)))
        num_rounds = int(rc["num-rounds"]) or cfg.federation.rounds
        run = DeployedRun(
            cfg,
            Path(str(rc["run-dir"])),
            reply_timeout=float(rc["reply-timeout"]),
            max_examples=int(rc["max-examples"]),
        )
    except FMTLError as exc:
        log(WARNING, "fmtl: %s", exc)
        raise
    summary = run.run(grid, num_rounds, int(rc["min-nodes"]), float(rc["node-wait-timeout"]))
    log(INFO, "fmtl: done: %s", json.dumps({k: summary[k] for k in ("rounds", "nodes")}))
