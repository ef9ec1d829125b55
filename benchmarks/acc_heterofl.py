"""Accuracy part 2: HeteroFL on MNIST (Flower's reproduction), and what part 3 shares.

Part 2 follows Flower's HeteroFL baseline (``baselines/heterofl``, conf/base.yaml):
100 clients, all participating, 600 training images each (the whole MNIST train set),
5 local epochs of batch 10, SGD lr 0.01 momentum 0.9 weight decay 5e-4, the HeteroFL
CNN (64, 128, 256, 512) with static batch norm, the scaler and masked cross-entropy,
dynamic width assignment (each round each client draws one of the levels 1, 1/2, 1/4,
1/8, 1/16) or every client at width 1. IID (600 random images per client) or non-IID
(label shards, at most 2 classes per client). The MNIST test set is split among the
clients like HeteroFL does (IID: at random; non-IID: each class's test images are
divided among the clients holding that class), so:

* global accuracy = the full-width global model on the whole MNIST test set;
* local accuracy = the same global model on each client's test images with the logits
  of the classes the client does not hold masked out (HeteroFL's "local" metric),
  pooled over clients.

Both use static batch norm as HeteroFL does: statistics computed over pooled training
images after the round by the library's pass (:func:`fmtl_lightning.static_bn.compute_static_stats`
via :func:`benchmarks.acc_common.global_model_logits`), then fixed.

The federation is built from the library's partitions
(:mod:`fmtl_lightning.partition`) and :func:`fmtl_lightning.fed_data.federation_from_parts`;
the federation, config and evaluation here are shared with part 3
(:mod:`benchmarks.acc_part3`). The report is :mod:`benchmarks.acc_part2_report`.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.acc_common import (
    Clock,
    accuracy,
    masked_accuracy,
    sim_global_logits,
)

LEVELS = (1.0, 0.5, 0.25, 0.125, 0.0625)
HETEROFL_HIDDEN = (64, 128, 256, 512)
TARGETS = {  # Flower's reproduction (README of baselines/heterofl), MNIST, dynamic
    ("iid", "w1"): {"global": 0.9947},
    ("iid", "mix"): {"global": 0.9923},
    ("shards", "mix"): {"local": 0.9984, "global": 0.985},
    ("shards", "w1"): {"local": 0.9982, "global": 0.9887},
}
FULL_SCHEDULE = {"iid": (200, (100,)), "shards": (400, (150, 250))}  # rounds, lr milestones


# ---------------------------------------------------------------------- data
def build_mnist_federation(
    partition: str,
    widths: list[float],
    train_per_client: int,
    seed: int,
    *,
    domain: str = "mnist",
    task: str = "mnist/digit",
    data_dir: str | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Clients with ``train_per_client`` training images each and a share of the test set.

    Built from the library's partitions and :func:`~fmtl_lightning.fed_data.federation_from_parts`.
    Returns the :class:`Federation` and the evaluation data: the whole test set
    (``x_test``, ``y_test``), each client's test indices into it (``client_test``), its
    label mask (``client_mask``) and its training indices (``train_parts``).
    """
    from fmtl_lightning.data import load_dataset
    from fmtl_lightning.fed_data import federation_from_parts, images_to_tensor
    from fmtl_lightning.partition import (
        partition_by_held_classes,
        partition_iid,
        partition_shards,
        subsample,
    )
    from fmtl_lightning.tasks import get_task

    n = len(widths)
    tr_ds = load_dataset(domain, "train", data_dir)
    te_ds = load_dataset(domain, "test", data_dir)
    need = n * train_per_client
    if need > len(tr_ds):
        raise ValueError(f"{n} clients x {train_per_client} exceed the {len(tr_ds)} images")
    pool = subsample(tr_ds.labels, need, seed) if need < len(tr_ds) else None
    if partition == "iid":
        parts = partition_iid(tr_ds.labels, n, seed + 1, indices=pool)
    else:
        parts = partition_shards(tr_ds.labels, n, 2, seed + 1, indices=pool)
    t = get_task(task)
    y_test = np.asarray(t.target(te_ds.labels))
    if partition == "iid":
        test_parts = partition_iid(te_ds.labels, n, seed + 2)
    else:  # each class's test images divided among the clients holding that class
        held = [t.target(tr_ds.labels[p]) for p in parts]
        test_parts = partition_by_held_classes(y_test, held, [seed, 7])
    fed = federation_from_parts(tr_ds, te_ds, [task], widths, parts, test_parts)
    mean, std = fed.normalisation[domain]
    eval_data = {
        "x_test": images_to_tensor(te_ds.images, mean, std),
        "y_test": y_test,
        "client_test": test_parts,
        "client_mask": [c.label_masks[task].numpy() for c in fed.clients],
        "train_parts": parts,
    }
    return fed, eval_data


def stats_images(fed: Any, n: int, seed: int) -> torch.Tensor:
    """``n`` training images drawn evenly from the federation's clients (sBN statistics)."""
    x = torch.cat([c.x_train for c in fed.clients])
    idx = np.random.default_rng(seed).permutation(x.shape[0])[: min(n, x.shape[0])]
    return x[torch.from_numpy(np.sort(idx))]


def heterofl_config(
    name: str,
    n_clients: int,
    rounds: int,
    *,
    seed: int = 0,
    hidden: tuple[int, ...] = HETEROFL_HIDDEN,
    dynamic: bool = True,
    levels: tuple[float, ...] = LEVELS,
    client_widths: list[float] | None = None,
    local_epochs: int = 5,
    batch_size: int = 10,
    lr: float = 0.01,
    task: str = "mnist/digit",
    fraction: float = 1.0,
) -> dict[str, Any]:
    if client_widths is None:
        groups = [{"count": n_clients, "tasks": [task], "width": 1.0}]
    else:
        groups = []
        for w in client_widths:  # consecutive equal widths -> one group
            if groups and groups[-1]["width"] == w:
                groups[-1]["count"] += 1
            else:
                groups.append({"count": 1, "tasks": [task], "width": w})
    alg: dict[str, Any] = {
        "name": "fedavg",
        "masked_ce": True,
        "aggregator": "label_split",
        "weighting": "uniform",
    }
    if dynamic:
        alg.update(width_assignment="dynamic", dynamic_widths=list(levels))
    return {
        "name": name,
        "seed": seed,
        "model": {"family": "cnn", "hidden": list(hidden), "norm": "static_batch", "scaler": True},
        "clients": groups,
        "algorithm": alg,
        "federation": {
            "rounds": rounds,
            "fraction": fraction,
            "local_epochs": local_epochs,
            "batch_size": batch_size,
            "eval_every": rounds,
        },
        "optimizer": {"name": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": 5e-4},
        "compare_local": False,
    }


# ---------------------------------------------------------------------- driving
def calibrate_round_seconds(sim: Any, steps: int = 4) -> float:
    """Estimated wall time of one round: a few timed SGD steps at each width in use."""
    from fmtl_lightning.local_fit import FitPlan, fit

    f = sim.cfg.federation
    c = sim.fed.clients[0]
    widths = {sim.engine.width_of(i, 0).width for i in range(len(sim.fed.clients))}
    per_step = {}
    for w in widths:
        m = sim.pool.module_for(c, w)
        fit(sim.pool.fabric, m, c.x_train, c.y_train, FitPlan(f.batch_size, 1, 1), 0)  # warm-up
        t0 = time.perf_counter()
        fit(sim.pool.fabric, m, c.x_train, c.y_train, FitPlan(f.batch_size, 1, steps), 1)
        per_step[w] = (time.perf_counter() - t0) / steps
    total = 0.0
    for i, cl in enumerate(sim.fed.clients):
        n_steps = f.local_epochs * -(-cl.num_train // f.batch_size)
        total += n_steps * per_step[sim.engine.width_of(i, 0).width]
    n = len(sim.fed.clients)
    return total * max(1, math.ceil(f.fraction * n - 1e-9)) / n  # sampled clients only


def evaluate_global(sim: Any, ev: dict[str, Any], stats_x: torch.Tensor, width: float = 1.0):
    """(global accuracy on the whole test set, pooled masked local accuracy)."""
    logits = sim_global_logits(sim, width, ev["x_test"], stats_x)
    g = accuracy(logits, ev["y_test"])
    hits = tot = 0
    for te, mask in zip(ev["client_test"], ev["client_mask"], strict=True):
        if len(te):
            hits += masked_accuracy(logits[te], ev["y_test"][te], mask) * len(te)
            tot += len(te)
    return g, hits / max(tot, 1)


def run_setting(
    partition: str,
    widths: str,
    *,
    mode: str,
    budget_s: float | None,
    n_clients: int,
    train_per_client: int,
    local_epochs: int,
    max_rounds: int,
    milestones: tuple[int, ...] = (),
    seed: int = 0,
    stats_n: int = 2000,
    fraction: float = 1.0,
    eval_every: int = 1,
    log=print,
) -> dict[str, Any]:
    """One Part 2 setting, as many rounds as fit in ``budget_s`` (None: ``max_rounds``).

    ``fraction``: share of the clients sampled each round; ``eval_every``: evaluate the
    global model (whole test set) every that many rounds, and always after the last one.
    """
    from fmtl_lightning.config import parse_config
    from fmtl_lightning.simulation import Simulation

    clock = Clock(budget_s)
    fed, ev = build_mnist_federation(partition, [1.0] * n_clients, train_per_client, seed)
    raw = heterofl_config(
        f"acc2-{partition}-{widths}",
        n_clients,
        max_rounds,
        seed=seed,
        dynamic=widths == "mix",
        local_epochs=local_epochs,
        fraction=fraction,
    )
    if widths == "w1":
        raw["algorithm"].pop("width_assignment", None)
        raw["algorithm"].pop("dynamic_widths", None)
    cfg = parse_config(raw)
    tmp = Path(tempfile.mkdtemp(prefix="fmtl-acc2-"))
    out: dict[str, Any] = {
        "partition": partition,
        "widths": widths,
        "curve": [],
        "rounds": 0,
        "n_clients": n_clients,
        "train_per_client": train_per_client,
        "local_epochs": local_epochs,
        "fraction": fraction,
        "eval_every": eval_every,
        "seed": seed,
        "threads": torch.get_num_threads(),
    }
    try:
        sim = Simulation(cfg, tmp, progress=False, federation=fed)
        sim.run_dir.mkdir(parents=True, exist_ok=True)
        stats_x = stats_images(fed, stats_n, seed)
        est = calibrate_round_seconds(sim)
        out["est_round_s"] = est
        log(f"[part2 {partition}/{widths}] estimated {est:.0f} s per round")
        lr0 = cfg.optimizer.lr
        round_s = eval_s = est
        while sim.round_idx < max_rounds:
            if not clock.fits(round_s + eval_s):  # room for this round and a last evaluation
                if sim.round_idx == 0:
                    out["skipped"] = (
                        f"one round needs ~{est / 60:.1f} min, more than the "
                        f"{budget_s / 60:.1f} min budget"
                    )
                break
            r = sim.round_idx
            n_decays = sum(1 for m in milestones if r >= m)
            sim.set_lr(lr0 * 0.1**n_decays)
            t0 = time.perf_counter()
            sim.run_round()
            round_s = time.perf_counter() - t0
            out["rounds"] = sim.round_idx
            if sim.round_idx % eval_every == 0 or sim.round_idx == max_rounds:
                eval_s = _eval_point(sim, ev, stats_x, out, clock, round_s, log)
        if out["rounds"] and (not out["curve"] or out["curve"][-1][0] != out["rounds"]):
            _eval_point(sim, ev, stats_x, out, clock, round_s, log)
        if out["curve"]:
            out["global"], out["local"] = out["curve"][-1][1], out["curve"][-1][2]
            # which widths were drawn: the mix of the last round
            out["width_counts"] = _width_counts(sim, sim.round_idx - 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["wall"] = clock.elapsed()
    return out


def _eval_point(sim, ev, stats_x, out, clock, round_s, log) -> float:
    """Evaluate the global model, append (round, global, local, elapsed) to the curve."""
    t1 = time.perf_counter()
    g, loc = evaluate_global(sim, ev, stats_x)
    eval_s = time.perf_counter() - t1
    out["curve"].append((sim.round_idx, g, loc, clock.elapsed()))
    log(
        f"[part2 {out['partition']}/{out['widths']}] round {sim.round_idx}: global {g:.4f} "
        f"local {loc:.4f} (train {round_s:.0f}s, eval {eval_s:.0f}s, "
        f"total {clock.elapsed() / 60:.1f} min)"
    )
    return eval_s


def _width_counts(sim: Any, r: int) -> dict[float, int]:
    counts: dict[float, int] = {}
    for i in range(len(sim.fed.clients)):
        w = sim.engine.width_of(i, r).width
        counts[w] = counts.get(w, 0) + 1
    return counts
