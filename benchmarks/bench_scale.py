"""How an in-process federation grows with its number of clients: 10, 100, 1,000.

MNIST, the 2NN-style MLP (64, 32) without norms, FedPer, 50 images per client (30 to
train), 10 clients sampled per round (fraction 10/N), 3 local steps of batch 16, every
client evaluated after the last round only (``eval_every``), the last checkpoint kept.
Each size runs in a fresh process, so its peak RSS is its own. Reported: setup (data,
partition, plan, the clients' stores), seconds per round (rounds 2..R: training of the
sampled clients, aggregation, checkpoint), the final evaluation of every client, the peak
RSS, and the bytes a round's checkpoint writes.

    python -m benchmarks.bench_scale [--sizes 10,100,1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
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


def _written(run_dir: Path, before: dict[str, int]) -> int:
    """Bytes of files new in the run's checkpoints (a hard link to an old file is free)."""
    new = 0
    for p in (run_dir / "checkpoints").rglob("*.safetensors"):
        st = p.stat()
        if st.st_ino not in before:
            new += st.st_size
            before[st.st_ino] = st.st_size
    return new


def measure(n: int, rounds: int) -> dict[str, Any]:
    """One size, in this process (the parent runs it in a child)."""
    from fmtl_lightning.config import parse_config
    from fmtl_lightning.simulation import Simulation

    run_dir = Path(tempfile.mkdtemp(prefix=f"scale{n}-"))
    t0 = time.perf_counter()
    sim = Simulation(parse_config(config(n, rounds)), run_dir, progress=False)
    setup = time.perf_counter() - t0
    seen: dict[int, int] = {}
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


def run(sizes: Sequence[int], rounds: int) -> list[dict[str, Any]]:
    out = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    for n in sizes:
        res = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_scale", "--child", str(n), "--rounds",
             str(rounds)], capture_output=True, text=True, env=env, cwd=REPO_ROOT, check=True,
        )  # fmt: skip
        row = json.loads(res.stdout.strip().splitlines()[-1])
        print(row, flush=True)
        out.append(row)
    return out


def render(rows: list[dict[str, Any]], rounds: int) -> str:
    base = rows[0]
    lines = [
        "## Scale: an in-process federation of 10 to 1,000 clients",
        "",
        f"MNIST, MLP (64, 32), FedPer, 50 images per client, 10 clients sampled per round, "
        f"{rounds} rounds; each size in a fresh process. Per round: rounds 2..{rounds - 1} "
        "(train 10 clients, aggregate, checkpoint); the last round also evaluates every "
        "client. Ratios are to the first row.",
        "",
        "| clients | setup s | s / round | checkpoint s / round | KB written / round "
        "| final evaluation s | peak RSS MB | RSS ratio | s / round ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['setup_s']} | {r['round_s']} | {r['checkpoint_s']} | "
            f"{r['written_kb']} | {r['final_eval_s']} | {r['peak_rss_mb']} | "
            f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f} | "
            f"{r['round_s'] / base['round_s']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10,100,1000")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.child, args.rounds)))
        return
    rows = run([int(s) for s in args.sizes.split(",")], args.rounds)
    write_section("scale", render(rows, args.rounds), command=current_command())


if __name__ == "__main__":
    main()
