"""Accuracy part 3: does system heterogeneity pay?

At equal rounds, the global model of a federation with fixed widths 1, 1/2, 1/4, 1/8,
1/16 against a federation of only the width-1 clients (the others dropped because they
cannot run the full model); every width's sub-model (the global model sliced to that
width) evaluated on the MNIST test set. The federation, config and evaluation are part
2's (:mod:`benchmarks.acc_heterofl`).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.acc_common import Clock, accuracy, md_table, plt, save_fig, sim_global_logits
from benchmarks.acc_heterofl import (
    HETEROFL_HIDDEN,
    LEVELS,
    build_mnist_federation,
    calibrate_round_seconds,
    heterofl_config,
    stats_images,
)


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
