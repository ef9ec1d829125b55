"""Wall time of `fmtl simulate` against a bare PyTorch loop doing the same local steps.

20 MNIST clients (widths 1, 1/2, 1/4), 10 rounds, the CNN, FedPer. The bare loop
uses the same models, the same batches in the same order, and plain
``torch.optim.SGD``; it does no slicing, aggregation, evaluation, logging or
checkpointing. The simulation does all of that, so the ratio is the full price of
the framework. Both run in this process, interleaved, best of 2.

    python -m benchmarks.bench_simulation
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import write_section
from fmtl_lightning.config import parse_config
from fmtl_lightning.engine.seeds import phase_seed
from fmtl_lightning.local_fit import FitPlan, batch_indices
from fmtl_lightning.models import MultiTaskModel, load_arrays
from fmtl_lightning.simulation import Simulation

CONFIG = {
    "name": "bench-sim",
    "seed": 0,
    "data": {"samples_per_client": 300, "partition": {"kind": "dirichlet", "alpha": 0.3}},
    "model": {"family": "cnn", "hidden": [32, 64, 128], "norm": "group"},
    "clients": [
        {"count": 7, "tasks": ["mnist/digit"], "width": 1.0},
        {"count": 7, "tasks": ["mnist/parity", "mnist/ge5"], "width": 0.5},
        {"count": 6, "tasks": ["mnist/attrs"], "width": 0.25},
    ],
    "algorithm": {"name": "fedper"},
    "federation": {"rounds": 10, "local_epochs": 1, "batch_size": 32},
    "optimizer": {"name": "sgd", "lr": 0.05},
    "compare_local": False,
}


def run_simulation(fed, tmp: Path, eval_every: int = 1) -> tuple[float, list]:
    raw = {**CONFIG, "federation": {**CONFIG["federation"], "eval_every": eval_every}}
    cfg = parse_config(raw)
    run_dir = tmp / "sim"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    sim = Simulation(cfg, run_dir, progress=False, federation=fed)
    sim.run()
    return time.perf_counter() - t0, sim.times


def run_bare(sim: Simulation) -> float:
    """Same local steps in plain PyTorch: load weights, SGD over the same batches."""
    cfg = sim.cfg
    models = {}
    t0 = time.perf_counter()
    for r in range(cfg.federation.rounds):
        for i, c in enumerate(sim.fed.clients):
            key = (c.tasks, c.width)
            if key not in models:
                outputs = sim.engine.plan.layout.task_outputs
                models[key] = MultiTaskModel(
                    sim.engine.plan.model.cfg, {t: outputs[t] for t in c.tasks}, c.width
                )
            m = models[key]
            load_arrays(m, sim.client_state(c, sim.engine.width_of(i, r)))
            opt = torch.optim.SGD(m.parameters(), lr=cfg.optimizer.lr)
            plan = FitPlan(cfg.federation.batch_size, cfg.federation.local_epochs)
            for idx in batch_indices(c.num_train, plan, phase_seed(cfg.seed, r, i, "global")):
                x = c.x_train[idx]
                opt.zero_grad(set_to_none=True)
                out = m(x)
                loss = 0
                for t in c.tasks:
                    y = c.y_train[t][idx]
                    if y.dtype == torch.int64:
                        loss = loss + torch.nn.functional.cross_entropy(out[t], y)
                    else:
                        loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(
                            out[t], y
                        )
                loss.backward()
                opt.step()
    return time.perf_counter() - t0


def main() -> None:
    from fmtl_lightning.fed_data import build_federation

    torch.set_num_threads(2)
    cfg = parse_config(CONFIG)
    fed = build_federation(cfg)
    tmp = Path(tempfile.mkdtemp(prefix="fmtl-bench-sim-"))
    try:
        ref = Simulation(cfg, tmp / "ref", progress=False, federation=fed)
        run_bare(ref)  # warm-up (first conv calls, allocator)
        sims, sims5, bares, times = [], [], [], None
        for _ in range(2):
            t, times_ = run_simulation(fed, tmp)
            sims.append(t)
            sims5.append(run_simulation(fed, tmp, eval_every=5)[0])
            bares.append(run_bare(ref))
            if t == min(sims):
                times = times_
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sim_t, sim5_t, bare_t = min(sims), min(sims5), min(bares)
    rounds = cfg.federation.rounds
    parts = {
        k: float(np.mean([getattr(t, k) for t in times]))
        for k in ("train", "aggregate", "evaluate", "checkpoint")
    }
    per_round = sim_t / rounds
    other = per_round - sum(parts.values())
    ratio, ratio5 = sim_t / bare_t, sim5_t / bare_t
    md = f"""## Simulation overhead: `fmtl simulate` vs a bare PyTorch loop

20 MNIST clients (7 at width 1, 7 at 1/2, 6 at 1/4; 225 train samples each), 10 rounds,
CNN (32, 64, 128) with GroupNorm, FedPer, 1 local epoch of batch 32, plain SGD. The bare loop
runs the same local steps on the same batches (loading the same weights each fit) and
nothing else: no aggregation, no evaluation, no checkpoints. Best of 2 interleaved runs.

| | wall time (s) | ratio (goal <= 1.10x) |
|---|---:|---:|
| bare PyTorch loop (local steps only) | {bare_t:.2f} | 1.00x |
| `Simulation.run`, every client evaluated every round | {sim_t:.2f} | **{ratio:.2f}x** |
| `Simulation.run`, `eval_every: 5` | {sim5_t:.2f} | **{ratio5:.2f}x** |

Per-round breakdown of the simulation evaluating every round (mean over rounds, ms):

| local training | aggregation | evaluation (all 20 clients' test sets) | checkpoint (atomic safetensors) | logging + other |
|---:|---:|---:|---:|---:|
| {1e3 * parts["train"]:.0f} | {1e3 * parts["aggregate"]:.1f} | {1e3 * parts["evaluate"]:.0f} | {1e3 * parts["checkpoint"]:.0f} | {1e3 * other:.0f} |

Local training inside the simulation vs the bare loop's whole time per round:
{1e3 * parts["train"]:.0f} ms vs {1e3 * bare_t / rounds:.0f} ms
({parts["train"] / (bare_t / rounds):.2f}x): the Lightning/Fabric fit path itself. What is left
is evaluation, which is forward passes over every client's test split (the bare loop does none);
`federation.eval_every` trades curve resolution for it.
"""
    write_section("simulation", md)
    print(md)


if __name__ == "__main__":
    main()
