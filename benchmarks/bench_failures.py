"""Deployed rounds under failures: time to a target accuracy, with and without failures.

A real Flower federation on 127.0.0.1 (SuperLink + one SuperNode per client, TLS, node
authentication; :class:`~fmtl_lightning.deploy.local.LocalDeployment`) of edge nodes
(ONNX Runtime, no torch: a node's per-message start costs about a second) trains
:func:`failure_config` (sklearn digits, MLP, FedPer, 6 clients). Twice, same config:

* **no failures**;
* **failures**: about 30% of the nodes (2 of 6) are SIGKILLed, the node process and its
  children, at random moments of the run (seeded), and 2 other nodes are slowed down
  5x from outside: a SIGSTOP/SIGCONT duty cycle on their process trees gives them 1/5
  of the wall time (:class:`Throttle`; no slow-down code in the library).

Per round the server records who was sent work, who replied in time (accepted), who
did not (failed: dead, or late past ``reply-timeout``) and late replies (recorded,
never averaged). The time to the target accuracy is the sum of the server's round wall
times up to the first round whose mean test accuracy over the evaluated clients
reaches it (every node scores the aggregated model each round: ``eval_every: 1``).
The edge bundle all nodes share is exported once, from a 1-round run of the same
config (their heads start there). ``tests/deploy/test_failures.py`` runs the same
machinery, smaller.

    nice -n 10 python -m benchmarks.bench_failures [--rounds 6] [--target 0.8]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import write_section

CFG: dict[str, Any] = {
    "name": "failures",
    "seed": 0,
    "data": {"samples_per_client": 80, "test_fraction": 0.25, "partition": {"kind": "iid"}},
    "model": {"family": "mlp", "hidden": [32, 16], "norm": "none"},
    "clients": [{"count": 6, "tasks": ["digits/digit"], "width": 1.0}],
    "algorithm": {"name": "fedper", "weighting": "examples"},
    "federation": {"rounds": 3, "local_epochs": 1, "batch_size": 16, "eval_every": 1},
    "optimizer": {"name": "sgd", "lr": 0.1},
    "compare_local": False,
    "checkpoints": {"keep_last": 1, "keep_every": 1},
}


# the benchmark trains longer per round than the test, so accuracy climbs within a few
# rounds (an in-process run of it: mean accuracy 0.45, 0.63, 0.80, 0.85, 0.90, 0.88)
BENCH = {"samples_per_client": 200, "local_epochs": 2, "lr": 0.2}


def failure_config(
    rounds: int,
    eval_every: int = 1,
    clients: int = 6,
    *,
    samples_per_client: int | None = None,
    local_epochs: int | None = None,
    lr: float | None = None,
) -> dict[str, Any]:
    """:data:`CFG` with ``rounds`` rounds, evaluation every ``eval_every``, ``clients``
    clients (and, given, the data size, local epochs and learning rate)."""
    cfg = copy.deepcopy(CFG)
    cfg["federation"].update(rounds=rounds, eval_every=eval_every)
    cfg["clients"][0]["count"] = clients
    if samples_per_client is not None:
        cfg["data"]["samples_per_client"] = samples_per_client
    if local_epochs is not None:
        cfg["federation"]["local_epochs"] = local_epochs
    if lr is not None:
        cfg["optimizer"]["lr"] = lr
    return cfg


# ----------------------------------------------------------------------------- faults
def _signal_tree(pid: int, sig: int) -> None:
    from fmtl_lightning.deploy.local import descendants

    for p in descendants(pid):
        try:
            os.kill(p, sig)
        except OSError:
            pass


class Throttle(threading.Thread):
    """Slow a process tree ``factor`` times from outside: SIGCONT for ``period/factor``
    seconds, SIGSTOP for the rest of each ``period`` (the tree is walked through
    ``/proc`` every cycle, so the ClientApp processes a node starts are caught too).
    :meth:`stop` leaves the tree running."""

    def __init__(self, pid: int, factor: float = 5.0, period: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.factor, self.period = pid, factor, period
        self._halt = threading.Event()

    def run(self) -> None:
        on = self.period / self.factor
        while not self._halt.is_set():
            _signal_tree(self.pid, signal.SIGCONT)
            if self._halt.wait(on):
                break
            _signal_tree(self.pid, signal.SIGSTOP)
            self._halt.wait(self.period - on)
        _signal_tree(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        _signal_tree(self.pid, signal.SIGCONT)


def node_status(state_dir: Path) -> dict[str, Any]:
    """The node's ``status.json`` (round, phase), or {} before its first message."""
    try:
        return dict(json.loads((state_dir / "status.json").read_text()))
    except (OSError, ValueError):
        return {}


@dataclass
class Kill:
    client: str
    delay_s: float  # after the first node started training round 1
    at_status: dict[str, Any] = field(default_factory=dict)  # its status when killed
    left: list[int] = field(default_factory=list)  # pids that survived (should be none)


class Faults(threading.Thread):
    """The failures of a run, from the moment any node first reports training round 1
    (the nodes have registered by then): the ``slowed`` nodes are throttled
    (:class:`Throttle`, ``factor``), and each victim's node tree is SIGKILLed at its
    random moment, ``uniform(0, window)`` seconds later."""

    def __init__(self, fleet: Fleet, victims: list[str], slowed: list[str], window: float,
                 rng: random.Random, factor: float = 5.0) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.fleet, self.slowed, self.factor = fleet, slowed, factor
        self.kills = sorted((Kill(c, rng.uniform(0.0, window)) for c in victims),
                            key=lambda k: k.delay_s)  # fmt: skip
        self._halt = threading.Event()

    def run(self) -> None:
        dirs = [n.state_dir for n in self.fleet.nodes.values()]
        while not any(node_status(d).get("round") == 1 for d in dirs):
            if self._halt.wait(0.05):
                return
        t0 = time.monotonic()
        for c in self.slowed:
            self.fleet.slow(c, self.factor)
        for k in self.kills:
            if self._halt.wait(max(0.0, t0 + k.delay_s - time.monotonic())):
                return
            k.at_status = node_status(self.fleet.nodes[k.client].state_dir)
            k.left = self.fleet.dep.kill(f"node-{k.client}", signal.SIGKILL)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


# ----------------------------------------------------------------------------- the fleet
@dataclass
class Fleet:
    """A LocalDeployment of edge nodes for one config (see :func:`start_fleet`)."""

    cfg: Any
    app: Path
    run_dir: Path
    bundle: Path
    data: dict[str, Path]
    nodes: dict[str, Any]
    dep: Any
    throttles: list[Throttle] = field(default_factory=list)

    def run(self, **run_config: Any) -> Any:
        """``flwr run`` on the fleet (blocks); raises if the ServerApp failed."""
        rc = {"run-dir": str(self.run_dir), **run_config}
        res = self.dep.run(self.app, rc, timeout=900)
        if res.returncode != 0 or "fmtl: done" not in res.stdout + res.stderr:
            log = (self.dep.root / "logs" / "superlink.log").read_text(errors="replace")
            raise RuntimeError(f"flwr run failed:\n{res.stdout[-3000:]}{res.stderr[-3000:]}\n"
                               f"superlink log:\n{log[-4000:]}")  # fmt: skip
        return res

    def slow(self, cid: str, factor: float = 5.0) -> Throttle:
        t = Throttle(self.dep.procs[f"node-{cid}"].popen.pid, factor)
        t.start()
        self.throttles.append(t)
        return t

    def stop(self) -> list[int]:
        """Stop the throttles, then every process; returns pids still alive."""
        for t in self.throttles:
            t.stop()
        return self.dep.stop()


def export_edge_files(raw: dict[str, Any], root: Path) -> tuple[Path, dict[str, Path]]:
    """One bundle holding every client (exported from a 1-round ``fmtl simulate`` of
    the same config) and each client's data file (train + test split)."""
    from export.run_export import export_run
    from fmtl_lightning.config import parse_config
    from fmtl_lightning.deploy.prepare import write_client_data
    from fmtl_lightning.simulation import Simulation, run_config

    one = copy.deepcopy(raw)
    one["federation"].update(rounds=1, eval_every=1)
    run_config(one, root / "prep", progress=False)
    bundle = export_run(root / "prep", root / "bundle")
    sim = Simulation(parse_config(copy.deepcopy(one)), root / "data_run", progress=False)
    data = {}
    (root / "data").mkdir(exist_ok=True)
    for c in sim.fed.clients:
        data[c.cid] = write_client_data(c, root / "data" / f"{c.cid}.npz")
    shutil.rmtree(root / "data_run", ignore_errors=True)
    return bundle, data


def start_fleet(raw: dict[str, Any], root: Path, files: tuple[Path, dict[str, Path]]) -> Fleet:
    """SuperLink + one edge SuperNode per client of ``raw`` under ``root`` (started;
    stop it with :meth:`Fleet.stop`)."""
    import yaml

    from fmtl_lightning.config import load_config
    from fmtl_lightning.deploy.cli import write_app
    from fmtl_lightning.deploy.local import LocalDeployment, NodeSpec
    from fmtl_lightning.engine.plan import planned_clients

    root.mkdir(parents=True, exist_ok=True)
    (root / "fmtl.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(root / "fmtl.yaml")
    app = write_app(root / "fmtl.yaml", root / "app")
    bundle, data = files
    nodes = {
        c.client_id: NodeSpec(c.client_id, c.width, c.tasks, root / "nodes" / c.client_id,
                              runtime="edge", bundle=bundle, data=data[c.client_id])
        for c in planned_clients(cfg)
    }  # fmt: skip
    dep = LocalDeployment(root / "dep", tls=True)
    fleet = Fleet(cfg, app, root / "run", bundle, data, nodes, dep)
    try:
        dep.start_superlink()
        dep.start_nodes(list(nodes.values()))
    except BaseException:
        fleet.stop()
        raise
    return fleet


def pick_faults(clients: list[str], rng: random.Random, kill: int = 2, slow: int = 2):
    """``(victims, slowed)``: disjoint random choices of ``kill`` and ``slow`` clients."""
    chosen = rng.sample(clients, kill + slow)
    return sorted(chosen[:kill]), sorted(chosen[kill:])


# ----------------------------------------------------------------------------- reading a run
def round_records(run_dir: Path, rounds: int) -> list[dict[str, Any]]:
    """Rounds 1..``rounds``: the journal record (report + metric rows), its report's
    ``times`` replaced by the final ones of the round's ``meta.json`` (with ``total``:
    the journal is written before the round's checkpoint, so it lacks them)."""
    from fmtl_lightning.checkpoint import read_history, round_dir

    out = []
    for rec in read_history(run_dir, rounds):
        meta = json.loads((round_dir(run_dir, rec["round"]) / "meta.json").read_text())
        rec["report"]["times"] = meta["report"]["times"]
        out.append(rec)
    return out


def mean_accuracy(rec: dict[str, Any]) -> float | None:
    """Mean test accuracy over the clients scored in a round (None: none scored)."""
    accs = [float(r["acc"]) for r in rec["rows"] if r.get("acc", "") != ""]
    return sum(accs) / len(accs) if accs else None


def time_to_target(records: list[dict[str, Any]], target: float) -> tuple[float | None, int | None]:
    """(seconds, round): the server's wall time of rounds 1..r (each round's ``total``:
    train, wait, aggregate, evaluate, checkpoint) for the first round r whose mean
    accuracy reaches ``target``; (None, None) if none does."""
    total = 0.0
    for rec in records:
        total += float(rec["report"]["times"]["total"])
        acc = mean_accuracy(rec)
        if acc is not None and acc >= target:
            return total, int(rec["round"])
    return None, None


# ----------------------------------------------------------------------------- benchmark
def one_run(raw, root, files, *, failures: bool, seed: int, reply_timeout: float) -> dict:
    fleet = start_fleet(raw, root, files)
    killer = None
    rng = random.Random(seed)
    victims: list[str] = []
    slowed: list[str] = []
    try:
        if failures:
            victims, slowed = pick_faults(sorted(fleet.nodes), rng)
            killer = Faults(fleet, victims, slowed, 2 * reply_timeout, rng)
            killer.start()
        t0 = time.perf_counter()
        fleet.run(**{"reply-timeout": reply_timeout})
        wall = time.perf_counter() - t0
    finally:
        if killer is not None:
            killer.stop()
        left = fleet.stop()
    if left:
        raise RuntimeError(f"processes left running: {left}")
    rounds = raw["federation"]["rounds"]
    recs = round_records(fleet.run_dir, rounds)
    return {
        "records": recs,
        "wall": wall,
        "victims": victims,
        "slowed": slowed,
        "kills": [
            (k.client, round(k.delay_s, 2), k.at_status.get("round"), k.at_status.get("phase"))
            for k in (killer.kills if killer else [])
        ],  # fmt: skip
    }


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--reply-timeout", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    raw = failure_config(a.rounds, eval_every=1, **BENCH)
    with tempfile.TemporaryDirectory(prefix="bench_failures_") as tmp:
        root = Path(tmp)
        files = export_edge_files(raw, root / "files")
        runs = {
            name: one_run(raw, root / name, files, failures=name == "failures", seed=a.seed,
                          reply_timeout=a.reply_timeout)
            for name in ("no failures", "failures")
        }  # fmt: skip
    lines = [
        f"{CFG['clients'][0]['count']} edge nodes (ONNX Runtime) on 127.0.0.1 over TLS with node "
        f"authentication, sklearn digits ({BENCH['samples_per_client']} samples per client, "
        f"{BENCH['local_epochs']} local epochs, SGD lr {BENCH['lr']:g}), MLP [32, 16], FedPer, "
        f"{a.rounds} rounds, every node "
        f"scores the aggregated model every round; `reply-timeout` {a.reply_timeout:g} s, "
        f"`min-replies` 1. Failures: 2 of 6 nodes SIGKILLed (node + children) at random "
        f"moments of rounds 1-2 (seed {a.seed}), 2 others slowed 5x (SIGSTOP/SIGCONT duty cycle, 1/5 of "
        "the wall time). Time to target = the server's round wall times summed up to the "
        "first round whose mean test accuracy over the scored clients reaches the target; "
        "one run each, same machine, one after the other. The mean is over the clients "
        "scored in the round: a dead node's client has no score, so after the kills the "
        "failures run's mean is over the survivors (not the same population).",
        "",
        f"| run | time to mean acc >= {a.target:g} | reached in round | final mean acc | "
        "mean s / round | whole run (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        recs = r["records"]
        t, rnd = time_to_target(recs, a.target)
        per = [float(rec["report"]["times"]["total"]) for rec in recs]
        lines.append(f"| {name} | {_fmt(t)} s | {rnd or 'not reached'} | "
                     f"{_fmt(mean_accuracy(recs[-1]), '.3f')} | {_fmt(sum(per) / len(per))} | "
                     f"{r['wall']:.1f} |")  # fmt: skip
    f = runs["failures"]
    kills = ", ".join(f"{c} after {d} s (its status: round {r}, {p})" for c, d, r, p in f["kills"])
    lines += ["", f"Killed: {kills}; slowed: {', '.join(f['slowed'])}.", "",
              "Per round (failures run):", "",
              "| round | accepted | failed (dead or past the deadline) | late replies "
              "(recorded, not averaged) | mean acc | round s |", "|---|---|---|---|---|---|"]  # fmt: skip
    for rec in f["records"]:
        rep = rec["report"]
        lines.append(f"| {rec['round']} | {', '.join(sorted(rep['accepted'])) or '-'} | "
                     f"{', '.join(sorted(rep['failed'])) or '-'} | "
                     f"{', '.join(sorted(rep['late'])) or '-'} | "
                     f"{_fmt(mean_accuracy(rec), '.3f')} | "
                     f"{float(rep['times'].get('total', 0.0)):.1f} |")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    write_section("failures", text)


if __name__ == "__main__":
    main()
