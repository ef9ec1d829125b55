"""How a federation grows with its number of clients: 10, 100, 1,000, on two engines.

MNIST, the 2NN-style MLP (64, 32) without norms, FedPer, 50 images per client (30 to
train), 10 clients sampled per round (fraction 10/N), 3 local steps of batch 16, the last
checkpoint kept.

In-process (:class:`~fmtl_lightning.simulation.Simulation`): every client evaluated after
the last round only (``eval_every``); each size runs in a fresh process, so its peak RSS
is its own. Reported: setup (data, partition, plan, the clients' state store), seconds
per round (rounds 2..R: training of the sampled clients, aggregation, checkpoint), the
final evaluation of every client, the peak RSS, and the bytes a round's checkpoint
writes. ``--before DIR``: also run the in-process sizes with the code checked out in DIR
(e.g. the commit before a change), same machine, same run.

Flower's simulation engine (``--engines flower``; Ray, the ``[flower-sim]`` extra, ``make
setup-flower-sim``; without it the section says it was not measured):
:mod:`benchmarks.scale_flower`: peak RSS summed over every process of the run (Ray
workers included) and seconds per round.

    python -m benchmarks.bench_scale [--sizes 10,100,1000] [--rounds 5]
        [--engines inproc,flower] [--flower-rounds 4] [--flower-cpus 2] [--before DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, current_command, write_section


def config(n: int, rounds: int) -> dict[str, Any]:
    return {
        "name": f"scale-{n}",
        "seed": 0,
        "data": {"samples_per_client": 50, "test_fraction": 0.4, "partition": {"kind": "iid"}},
        "model": {"family": "mlp", "hidden": [64, 32], "norm": "none"},
        "clients": [{"count": n, "tasks": ["mnist/digit"], "width": 1.0}],
        "algorithm": {"name": "fedper"},
        "federation": {
            "rounds": rounds,
            "fraction": min(1.0, 10 / n),
            "local_steps": 3,
            "batch_size": 16,
            "eval_every": rounds,
        },  # fmt: skip
        "optimizer": {"name": "sgd", "lr": 0.05},
        "compare_local": False,
        "checkpoints": {"keep_last": 1},
    }


def _written(run_dir: Path, before: dict[tuple[int, int], int]) -> int:
    """Bytes of files new in the run's checkpoints (a hard link to an old file is free).
    A file is its (inode, mtime): an inode freed by pruning and reused by a new file counts."""
    new = 0
    for p in (run_dir / "checkpoints").rglob("*.safetensors"):
        st = p.stat()
        key = (st.st_ino, st.st_mtime_ns)
        if key not in before:
            new += st.st_size
            before[key] = st.st_size
    return new


def measure(n: int, rounds: int) -> dict[str, Any]:
    """One size, in this process (the parent runs it in a child)."""
    from fmtl_lightning.config import parse_config
    from fmtl_lightning.simulation import Simulation

    run_dir = Path(tempfile.mkdtemp(prefix=f"scale{n}-"))
    t0 = time.perf_counter()
    sim = Simulation(parse_config(config(n, rounds)), run_dir, progress=False)
    setup = time.perf_counter() - t0
    seen: dict[tuple[int, int], int] = {}
    per_round, written = [], []
    for _ in range(rounds - 1):  # the last round also evaluates everyone: timed apart
        t = time.perf_counter()
        sim.run_round()
        per_round.append(time.perf_counter() - t)
        written.append(_written(run_dir, seen))
    t = time.perf_counter()
    sim.run_round()
    last = time.perf_counter() - t
    times = sim.times[-1]
    return {
        "clients": n,
        "setup_s": round(setup, 2),
        "round_s": round(sum(per_round[1:]) / max(1, len(per_round) - 1), 3),
        "checkpoint_s": round(sum(x.checkpoint for x in sim.times[1:-1]) / max(1, rounds - 2), 3),
        "final_eval_s": round(times.evaluate, 2),
        "last_round_s": round(last, 2),
        "written_kb": round(sum(written[1:]) / max(1, len(written) - 1) / 1024, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def run(sizes: Sequence[int], rounds: int, code: Path = REPO_ROOT) -> list[dict[str, Any]]:
    """The in-process sizes, each in a fresh child process running the code in ``code``."""
    out = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(code)}
    for n in sizes:
        res = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_scale", "--child", str(n), "--rounds",
             str(rounds)], capture_output=True, text=True, env=env, cwd=code, check=True,
        )  # fmt: skip
        row = json.loads(res.stdout.strip().splitlines()[-1])
        print(row, flush=True)
        out.append(row)
    return out


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "n/a"


def render(rows: list[dict[str, Any]], rounds: int, before: list[dict[str, Any]] | None = None,
           before_label: str = "") -> str:  # fmt: skip
    """The in-process table (and the same sizes with the code before, if measured)."""
    base = rows[0]
    lines = [
        "### In-process: 10 to 1,000 clients",
        "",
        f"MNIST, MLP (64, 32), FedPer, 50 images per client, 10 clients sampled per round, "
        f"{rounds} rounds; each size in a fresh process. Per round: rounds 2..{rounds - 1} "
        "(train 10 clients, aggregate, checkpoint); the last round also evaluates every "
        "client. Ratios are to the first row.",
        "",
        "| code | clients | setup s | s / round | checkpoint s / round | KB written / round "
        "| final evaluation s | peak RSS MB | RSS ratio | s / round ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, rs in (("this commit", rows), (before_label, before or [])):
        b = rs[0] if rs else base
        for r in rs:
            lines.append(
                f"| {label} | {r['clients']} | {r['setup_s']} | {r['round_s']} | "
                f"{r['checkpoint_s']} | {r['written_kb']} | {r['final_eval_s']} | "
                f"{r['peak_rss_mb']} | {_ratio(r['peak_rss_mb'], b['peak_rss_mb'])} | "
                f"{_ratio(r['round_s'], b['round_s'])} |"
            )
    return "\n".join(lines)


def render_flower(rows: list[dict[str, Any]], rounds: int, cpus: int) -> str:
    base = rows[0]
    lines = [
        "### Flower's simulation engine (Ray): the same federation",
        "",
        f"The same YAML through our ServerApp and ClientApp on `flower-superlink --simulation` "
        f"(flwr 1.41, Ray): N virtual SuperNodes, Ray started with {cpus} CPUs, 1 CPU per "
        f"virtual node; {rounds} training rounds, no evaluation. First round: from `flwr run` "
        "to the first checkpoint (Ray start, the info query to every virtual node, round 1). "
        f"s / round: rounds 3..{rounds}, from checkpoint to checkpoint. Peak RSS: the peak of "
        "the RSS summed over every process under the SuperLink (SuperLink, the simulation "
        "process running the ServerApp, Ray's GCS, raylet and agents, the Ray workers), "
        "sampled every 0.2 s; the share of Ray's `ray::` processes on its own (the ClientApp "
        "actors, idle workers, and Ray's dashboard and runtime-env agents).",
        "",
        "| clients | first round s | s / round | peak RSS MB, all processes | `ray::` "
        "processes' peak RSS MB | `ray::` processes | RSS ratio | s / round ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['first_round_s']} | {r['round_s']} | {r['peak_rss_mb']} | "
            f"{r['ray_workers_peak_mb']} | {r['ray_workers']} | "
            f"{_ratio(r['peak_rss_mb'], base['peak_rss_mb'])} | "
            f"{_ratio(r['round_s'], base['round_s'])} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10,100,1000")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--engines", default="inproc,flower")
    p.add_argument("--flower-rounds", type=int, default=4)
    p.add_argument("--flower-cpus", type=int, default=2)
    p.add_argument("--before", type=Path, default=None, help="code dir to run in-process too")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.child, args.rounds)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    engines = set(args.engines.split(","))
    parts = ["## Scale: a federation of 10 to 1,000 clients, in-process and on Flower's "
             "simulation engine"]  # fmt: skip
    if "inproc" in engines:
        rows = run(sizes, args.rounds)
        before = run(sizes, args.rounds, args.before.resolve()) if args.before else None
        label = f"before (`{args.before.name}`)" if args.before else ""
        parts.append(render(rows, args.rounds, before, label))
    if "flower" in engines and importlib.util.find_spec("ray") is None:
        parts.append("### Flower's simulation engine (Ray): not measured\n\nRay is not "
                     "installed: `make setup-flower-sim` (the `[flower-sim]` extra).")  # fmt: skip
    elif "flower" in engines:
        from benchmarks.scale_flower import measure_flower

        frows = []
        for n in sizes:
            cfg = config(n, 1000)  # never reaches its last round: no evaluation is due
            cfg["federation"]["eval_every"] = 1000
            frows.append(measure_flower(cfg, args.flower_rounds, args.flower_cpus))
            print(frows[-1], flush=True)
        parts.append(render_flower(frows, args.flower_rounds, args.flower_cpus))
    write_section("scale", "\n\n".join(parts), command=current_command())


if __name__ == "__main__":
    main()
