"""Accuracy parts 2 and 3: HeteroFL on MNIST (Flower's reproduction) and width sub-models.

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

Part 3 compares, at equal rounds, the global model of a federation with fixed widths
1, 1/2, 1/4, 1/8, 1/16 against a federation of only the width-1 clients (the others
dropped because they cannot run the full model), and evaluates every width's sub-model
(the global model sliced to that width) on the MNIST test set.
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
    label_axes,
    masked_accuracy,
    md_table,
    plt,
    save_fig,
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
def _to_x(images: np.ndarray, mean: float, std: float) -> torch.Tensor:
    x = (images.astype(np.float32) / 255.0 - mean) / std
    return torch.from_numpy(x[:, None, :, :].copy())


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

    Returns the :class:`Federation` and the evaluation data: the whole test set
    (``x_test``, ``y_test``), each client's test indices into it and its label mask,
    and ``stats_x`` (training images of the participating clients, for sBN statistics).
    """
    from fmtl_lightning.data import load_dataset
    from fmtl_lightning.fed_data import ClientData, Federation
    from fmtl_lightning.federation import ClientSpec
    from fmtl_lightning.partition import partition_iid, partition_shards, subsample
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
    n_out = t.num_outputs
    rng = np.random.default_rng([seed, 7])
    held = [np.isin(np.arange(n_out), np.unique(t.target(tr_ds.labels[p]))) for p in parts]
    y_test_all = t.target(te_ds.labels)
    if partition == "iid":
        test_parts = partition_iid(te_ds.labels, n, seed + 2)
    else:  # each class's test images divided among the clients holding that class
        test_lists: list[list[np.ndarray]] = [[] for _ in range(n)]
        for c in range(n_out):
            holders = [i for i in range(n) if held[i][c]]
            if not holders:
                continue
            members = rng.permutation(np.flatnonzero(y_test_all == c))
            for i, chunk in zip(holders, np.array_split(members, len(holders)), strict=True):
                test_lists[i].append(chunk)
        test_parts = [
            np.sort(np.concatenate(ls)) if ls else np.array([], dtype=np.int64) for ls in test_lists
        ]
    mean, std = float(tr_ds.mean), float(tr_ds.std)
    x_test = _to_x(te_ds.images, mean, std)
    clients = []
    for i, (tr, te, w) in enumerate(zip(parts, test_parts, widths, strict=True)):
        spec = ClientSpec(f"c{i:03d}", (task,), float(w), tr, np.array([], dtype=np.int64), domain)
        y_tr = {task: torch.from_numpy(np.asarray(t.target(tr_ds.labels[tr])).copy())}
        clients.append(
            ClientData(
                spec,
                None,
                _to_x(tr_ds.images[tr], mean, std),
                y_tr,
                x_test[te],
                {task: torch.from_numpy(np.asarray(y_test_all[te]).copy())},
                {task: torch.from_numpy(held[i])},
            )
        )
    widths_txt = ", ".join(f"{w:g}" for w in sorted(set(widths), reverse=True))
    summary = (
        f"{n} {domain} clients ({partition}), {train_per_client} train images each, "
        f"widths {widths_txt}; the {len(te_ds)}-image test set split among them"
    )
    fed = Federation(clients, int(tr_ds.images.shape[1]), summary, {domain: (mean, std)})
    eval_data = {
        "x_test": x_test,
        "y_test": np.asarray(y_test_all),
        "client_test": test_parts,
        "client_mask": held,
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
    widths = {sim.width_of(i, 0).width for i in range(len(sim.fed.clients))}
    per_step = {}
    for w in widths:
        m = sim.module_for(c, w)
        fit(sim.fabric, m, c.x_train, c.y_train, FitPlan(f.batch_size, 1, 1), 0)  # warm-up
        t0 = time.perf_counter()
        fit(sim.fabric, m, c.x_train, c.y_train, FitPlan(f.batch_size, 1, steps), 1)
        per_step[w] = (time.perf_counter() - t0) / steps
    total = 0.0
    for i, cl in enumerate(sim.fed.clients):
        n_steps = f.local_epochs * -(-cl.num_train // f.batch_size)
        total += n_steps * per_step[sim.width_of(i, 0).width]
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
        w = sim.width_of(i, r).width
        counts[w] = counts.get(w, 0) + 1
    return counts


# ---------------------------------------------------------------------- part 3
def run_part3(
    *,
    budget_s: float | None,
    per_level: int,
    train_per_client: int,
    local_epochs: int,
    max_rounds: int,
    partition: str = "iid",
    seed: int = 0,
    stats_n: int = 2000,
    hidden: tuple[int, ...] = HETEROFL_HIDDEN,
    log=print,
) -> dict[str, Any]:
    """Width mix vs dropping every client that cannot run width 1, rounds in lockstep."""
    from fmtl_lightning.config import parse_config
    from fmtl_lightning.fed_data import Federation
    from fmtl_lightning.simulation import Simulation

    clock = Clock(budget_s)
    widths = [w for w in LEVELS for _ in range(per_level)]
    fed, ev = build_mnist_federation(partition, widths, train_per_client, seed)
    strong = [c for c in fed.clients if c.width == 1.0]
    fed_drop = Federation(
        strong, fed.image_size, fed.summary + " (width-1 only)", fed.normalisation
    )
    arms = {}
    tmps = []
    for arm, f, cw in (("mix", fed, widths), ("drop", fed_drop, [1.0] * len(strong))):
        raw = heterofl_config(
            f"acc3-{arm}",
            len(cw),
            max_rounds,
            seed=seed,
            dynamic=False,
            client_widths=cw,
            local_epochs=local_epochs,
            hidden=hidden,
        )
        tmp = Path(tempfile.mkdtemp(prefix=f"fmtl-acc3-{arm}-"))
        tmps.append(tmp)
        sim = Simulation(parse_config(raw), tmp, progress=False, federation=f)
        sim.run_dir.mkdir(parents=True, exist_ok=True)
        arms[arm] = (sim, stats_images(f, stats_n, seed))
    out: dict[str, Any] = {
        "per_level": per_level,
        "train_per_client": train_per_client,
        "partition": partition,
        "local_epochs": local_epochs,
        "seed": seed,
        "rounds": 0,
        "curve": [],
        "n_mix": len(widths),
        "n_drop": len(strong),
        "hidden": hidden,
    }
    try:
        est = sum(calibrate_round_seconds(s) for s, _ in arms.values())
        log(f"[part3] estimated {est:.0f} s per round (both arms)")
        round_s = est
        while out["rounds"] < max_rounds and clock.fits(round_s + 30):
            t0 = time.perf_counter()
            for sim, _ in arms.values():
                sim.run_round()
            round_s = time.perf_counter() - t0
            out["rounds"] += 1
            sim_mix, sx = arms["mix"]
            g_mix = accuracy(
                sim_global_logits(sim_mix, 1.0, ev["x_test"][:1000], sx[:1000]), ev["y_test"][:1000]
            )
            sim_drop, sxd = arms["drop"]
            g_drop = accuracy(
                sim_global_logits(sim_drop, 1.0, ev["x_test"][:1000], sxd[:1000]),
                ev["y_test"][:1000],
            )
            out["curve"].append((out["rounds"], g_mix, g_drop))
            log(
                f"[part3] round {out['rounds']}: width-1 acc (1k test images) mix {g_mix:.4f} "
                f"drop {g_drop:.4f} ({clock.elapsed() / 60:.1f} min)"
            )
        out["est_round_s"] = est
        table = {}
        for arm, (sim, sx) in arms.items():
            table[arm] = {
                w: accuracy(sim_global_logits(sim, w, ev["x_test"], sx), ev["y_test"])
                for w in LEVELS
            }
        out["table"] = table
    finally:
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)
    out["wall"] = clock.elapsed()
    return out


# ---------------------------------------------------------------------- reports
def report_part2(results: list[dict[str, Any]], mode: str, budget_min: float | None) -> str:
    r0 = results[0]
    sched = (
        "the published schedule (200 rounds IID with lr x0.1 at round 100; 400 rounds "
        "non-IID with lr x0.1 at 150 and 250)"
        if mode == "full"
        else "as many rounds as fit in the wall-time budget of each setting (column `budget`)"
        if budget_min
        else "a fixed number of rounds"
    )
    lines = [
        f"## Accuracy part 2: HeteroFL on MNIST against Flower's reproduction ({mode} mode)",
        "",
        f"{r0['n_clients']} clients, {_participation(r0)}, {r0['train_per_client']} "
        f"training images each, {r0['local_epochs']} local epoch(s) of batch 10, SGD lr 0.01 "
        "momentum 0.9 weight decay 5e-4, HeteroFL CNN (64, 128, 256, 512) with static batch "
        "norm, scaler and masked cross-entropy, FedAvg aggregation (`algorithm.name: fedavg`, "
        "uniform weights; every entry averaged over the clients holding it). `mix` = dynamic "
        "width assignment: each round every client draws one of 1, 1/2, 1/4, 1/8, 1/16 "
        "(even mix in expectation; Flower's `a1-b1-c1-d1-e1`); `w1` = every client at width 1 "
        f"(`a1`). Seed {r0['seed']}; {sched}.",
        "",
        "Global accuracy = full-width global model on the whole 10,000-image MNIST test set; "
        "local accuracy = the same model on each client's share of the test set with the "
        "logits of classes the client does not hold masked out, pooled over clients (HeteroFL's "
        "definitions). Batch-norm statistics: HeteroFL's sBN, computed over 2,000 training "
        "images of the clients after each round (`fmtl_lightning.static_bn`), then fixed.",
        "",
        *(
            [
                "**Default mode is not the published protocol**: to get a curve in the budget "
                "it samples 10 of the 100 clients per round (Flower's run: all 100) and runs 1 "
                "local epoch (published: 5), with a constant lr. A round is therefore about "
                "1/50 of a published round's compute; compare the curves by round with that "
                "in mind. The global model is evaluated every "
                f"{r0.get('eval_every', 1)} rounds and after the last one.",
                "",
            ]
            if r0.get("fraction", 1.0) < 1.0
            else []
        ),
        "Head aggregation: HeteroFL's label split (`algorithm.aggregator: label_split`): each "
        "class's output row is averaged only over the clients whose labels include that "
        "class; a row no sampled client holds keeps its value.",
        "",
    ]
    rows = []
    for r in results:
        tgt = TARGETS.get((r["partition"], r["widths"]), {})
        pdesc = "IID" if r["partition"] == "iid" else "non-IID (2 classes/client)"
        if r.get("skipped") or not r["curve"]:
            rows.append(
                [
                    pdesc,
                    r["widths"],
                    _budget(r),
                    0,
                    "not run: " + r.get("skipped", "no round fit"),
                    "",
                    _t(tgt, "global"),
                    _t(tgt, "local"),
                    "",
                    f"{r.get('est_round_s', float('nan')) / 60:.1f}",
                ]
            )
            continue
        gap_g = 100 * (r["global"] - tgt["global"]) if "global" in tgt else None
        gap_l = 100 * (r["local"] - tgt["local"]) if "local" in tgt else None
        gaps = ", ".join(
            f"{k} {v:+.2f}" for k, v in (("global", gap_g), ("local", gap_l)) if v is not None
        )
        rows.append(
            [
                pdesc,
                r["widths"],
                _budget(r),
                r["rounds"],
                f"{100 * r['global']:.2f}",
                f"{100 * r['local']:.2f}",
                _t(tgt, "global"),
                _t(tgt, "local"),
                gaps,
                f"{r['wall'] / max(r['rounds'], 1) / 60:.1f}",
            ]
        )
    lines += [
        md_table(
            [
                "partition",
                "widths",
                "budget",
                "rounds run",
                "global %",
                "local %",
                "target global %",
                "target local %",
                "gap (points)",
                "min/round",
            ],
            rows,
        ),
        "",
        "Targets are Flower's reproduction after 200 (IID) / 400 (non-IID) rounds; the gap "
        "column compares against them regardless of the rounds run here.",
        "",
        "Accuracy by round (global / local, %):",
        "",
    ]
    for r in results:
        if r["curve"]:
            pts = ", ".join(f"r{c[0]}: {100 * c[1]:.2f}/{100 * c[2]:.2f}" for c in r["curve"])
            lines.append(f"- {r['partition']}/{r['widths']}: {pts}")
    tot = sum(r["wall"] for r in results)
    lines += [
        "",
        "Plot: `docs/benchmarks/accuracy_part2_heterofl.png`.",
        "",
        f"Wall time: {tot / 60:.1f} min.",
    ]
    return "\n".join(lines)


def _participation(r: dict[str, Any]) -> str:
    f = r.get("fraction", 1.0)
    if f >= 1.0:
        return "all participating every round"
    return f"{math.ceil(f * r['n_clients'] - 1e-9)} sampled per round (seeded)"


def _budget(r: dict[str, Any]) -> str:
    b = r.get("budget_min")
    thr = r.get("threads")
    return (f"{b:g} min" if b else "none") + (f", {thr} thread(s)" if thr else "")


def _t(tgt: dict[str, float], k: str) -> str:
    return f"{100 * tgt[k]:.2f}" if k in tgt else ""


def plot_part2(results: list[dict[str, Any]]) -> str:
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(11, 4))
    for r in results:
        if not r["curve"]:
            continue
        rounds = [c[0] for c in r["curve"]]
        ax = axes[0] if r["partition"] == "iid" else axes[1]
        (line,) = ax.plot(
            rounds, [100 * c[1] for c in r["curve"]], marker="o", label=f"{r['widths']} global"
        )
        if r["partition"] != "iid":
            ax.plot(
                rounds,
                [100 * c[2] for c in r["curve"]],
                marker="s",
                linestyle=":",
                color=line.get_color(),
                label=f"{r['widths']} local",
            )
        for k, v in TARGETS.get((r["partition"], r["widths"]), {}).items():
            ax.axhline(
                100 * v,
                color=line.get_color(),
                linestyle="--" if k == "global" else "-.",
                linewidth=0.8,
                label=f"{r['widths']} {k} target (Flower, {200 if r['partition'] == 'iid' else 400} rounds)",
            )
    for ax, title in zip(axes, ("IID", "non-IID, 2 classes per client"), strict=True):
        ax.set_title(f"HeteroFL MNIST, {title}")
        ax.xaxis.get_major_locator().set_params(integer=True)
        label_axes(ax, "round", "accuracy %", legend_size=7)
    return save_fig(fig, "accuracy_part2_heterofl.png")


def report_part3(res: dict[str, Any], mode: str) -> str:
    t = res["table"]
    rows = []
    for w in LEVELS:
        rows.append(
            [
                f"{w:g}",
                f"{100 * t['mix'][w]:.2f}",
                f"{100 * t['drop'][w]:.2f}",
                f"{100 * (t['mix'][w] - t['drop'][w]):+.2f}",
            ]
        )
    pdesc = "IID" if res["partition"] == "iid" else "non-IID shards (2 classes per client)"
    lines = [
        f"## Accuracy part 3: does system heterogeneity pay? ({mode} mode)",
        "",
        f"MNIST, {pdesc}, {res['train_per_client']} training images per client. `mix`: "
        f"{res['n_mix']} clients with fixed widths, {res['per_level']} at each of 1, 1/2, 1/4, "
        f"1/8, 1/16, all participating. `drop`: the same federation without every client "
        f"that cannot run width 1 ({res['n_drop']} clients left, same data for them). HeteroFL "
        f"CNN {tuple(res['hidden'])}, static batch norm + scaler + masked CE, FedAvg "
        f"(uniform), {res['local_epochs']} local epoch(s) of batch 10 per round, SGD lr 0.01 "
        f"momentum 0.9 wd 5e-4, {res['rounds']} rounds for both (lockstep, seed {res['seed']}).",
        "",
        "Each row: the global model sliced to that width (HeteroFL prefix; `slice_state` + "
        "a `MultiTaskModel` at that width, sBN statistics from 2,000 of the arm's training "
        "images) on the whole MNIST test set. Chance = 10%.",
        "",
        md_table(["sub-model width", "mix %", "drop %", "mix - drop"], rows),
        "",
        "Width-1 accuracy by round (first 1,000 test images, sBN from 1,000 training images, mix / drop, %): "
        + ", ".join(f"r{c[0]}: {100 * c[1]:.1f}/{100 * c[2]:.1f}" for c in res["curve"]),
        "",
        "Plot: `docs/benchmarks/accuracy_part3_widths.png`.",
        "",
        f"Wall time: {res['wall'] / 60:.1f} min (estimated {res['est_round_s']:.0f} s per "
        "round for both arms).",
    ]
    return "\n".join(lines)


def plot_part3(res: dict[str, Any]) -> str:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6.5, 4))
    xs = np.arange(len(LEVELS))
    t = res["table"]
    ax.bar(xs - 0.2, [100 * t["mix"][w] for w in LEVELS], 0.4, label="width mix (all clients)")
    ax.bar(
        xs + 0.2,
        [100 * t["drop"][w] for w in LEVELS],
        0.4,
        label="width-1 clients only (others dropped)",
    )
    ax.axhline(10, color="grey", linestyle=":", label="chance")
    ax.set_xticks(xs, [f"{w:g}" for w in LEVELS])
    ax.set_xlabel("sub-model width")
    ax.set_ylabel("MNIST test accuracy %")
    ax.set_title(f"Global model sliced to each width ({res['rounds']} rounds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return save_fig(fig, "accuracy_part3_widths.png")
