"""The report of :mod:`benchmarks.pfllib`: ours next to PFLlib's leaderboard, and the curves.

:func:`table` is pure (results in, markdown out); :func:`write` puts it in BENCHMARKS.md
(section ``pfllib``) with the curves plot ``docs/benchmarks/pfllib_curves.png``, or, for a
smoke run, prints it and writes the plot under ``runs/pfllib/`` only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.acc_common import label_axes, md_table, plt, save_fig
from benchmarks.common import REPO_ROOT, write_section

# PFLlib's leaderboard (pfllib.com/benchmark.html; JMLR 2025): test accuracy in %, mean and
# std over 3 trials, best round of 2,000; Fashion-MNIST, 20 clients, FedAvgCNN.
THEIRS: dict[str, dict[str, tuple[float, float | None]]] = {
    "dir": {  # "practical" label skew, Dir(0.1)
        "fedavg": (85.85, 0.19),
        "ditto": (97.47, 0.04),
        "fedper": (97.44, 0.06),
        "fedrep": (97.56, 0.04),
        "fedbabu": (97.46, 0.07),
    },
    "pat": {  # pathological, 2 classes per client
        "fedavg": (80.41, 0.08),
        "ditto": (99.44, 0.06),
        "fedper": (99.47, None),
        "fedrep": (99.56, None),
        "fedbabu": (99.41, None),
    },
}
TITLES = {
    "fedavg": "FedAvg",
    "fedper": "FedPer",
    "fedrep": "FedRep",
    "ditto": "Ditto",
    "local": "Local",
    "fedbabu": "FedBABU",
    "fedavg_ft": "FedAvg+FT",
}
SPLIT_TITLES = {"dir": "Dir(0.1) (practical)", "pat": "pathological (2 classes)"}

PROTOCOL = (
    "Protocol (PFLlib's, `fmtl_lightning.data.pfllib` + `model.family: fedavgcnn`): "
    "Fashion-MNIST train+test merged (70k), normalised mean 0.5 / std 0.5, 20 clients, "
    "their split drawn with their RNG calls (seed 1), each client 75/25 train/test; "
    "FedAvgCNN; every client every round, 1 local epoch, batch 10, SGD lr 0.005, no "
    "momentum. Accuracy = correct predictions pooled over all 20 clients' test sets, each "
    "round; **best** = the best round (PFLlib's figure, an early-stopping number), "
    "**final** = the last round."
)
DIFFERENCES = (
    "Where we differ from PFLlib's run: one trial (their figures are the mean ± std of 3); "
    "our batches keep the last short batch of an epoch (PFLlib drops it: `drop_last=True`; "
    "the simulation has no drop-last option); Ditto is scored with the personal model only "
    "(PFLlib's best takes the max over its global and personal evaluations), lambda = "
    "{lam:g} (PFLlib's script default `-mu 0` makes the personal model plain local training; "
    "the leaderboard's value is not in their repository); FedBABU is evaluated once, after "
    "the last round's 10-epoch head fine-tune (PFLlib's per-round FedBABU evaluations use "
    "the untrained init heads; its best is this final one); FedAvg+FT fine-tunes the global "
    "model for 1 epoch before each evaluation (no PFLlib figure)."
)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _theirs(split: str, method: str) -> str:
    t = THEIRS.get(split, {}).get(method)
    if t is None:
        return "n/a"
    return f"{t[0]:.2f} ± {t[1]:.2f}" if t[1] is not None else f"{t[0]:.2f}"


def _delta(split: str, method: str, best: float) -> str:
    t = THEIRS.get(split, {}).get(method)
    return "" if t is None else f"{100 * best - t[0]:+.2f}"


def table(results: Sequence[Mapping[str, Any]]) -> str:
    """One row per (split, method): theirs, our best (its round), our final, rounds, time."""
    order = {m: i for i, m in enumerate(TITLES)}
    rows = []
    for r in sorted(results, key=lambda r: (r["split"], order.get(r["method"], 99))):
        per_round = sum(r["round_s"]) / max(len(r["round_s"]), 1)
        rows.append(
            [
                SPLIT_TITLES.get(r["split"], r["split"]),
                TITLES.get(r["method"], r["method"]),
                _theirs(r["split"], r["method"]),
                f"{_pct(r['best'])} (r{r['best_round']})",
                _pct(r["final"]),
                _delta(r["split"], r["method"], r["best"]),
                f"{r['rounds']} (PFLlib: 2000)",
                f"{r['wall'] / 60:.1f}",
                f"{per_round:.0f}",
            ]
        )
    header = [
        "split",
        "method",
        "PFLlib best, %",
        "ours best, % (round)",
        "ours final, %",
        "ours − PFLlib (best)",
        "rounds run",
        "wall, min",
        "s / round",
    ]
    return md_table(header, rows, "ll" + "r" * 7)


def report(data: Mapping[str, Any]) -> str:
    """The section's markdown: the mode note, protocol, table, differences, timing."""
    rounds, mode = data["rounds"], data["mode"]
    note = {
        "default": f"**Default mode: {rounds} rounds per run, not PFLlib's 2,000** (about "
        "60 minutes on 2 cores; `--full` runs 2,000). Best-over-rounds is over these "
        f"{rounds} rounds only.",
        "full": "Full mode: PFLlib's 2,000 rounds.",
        "smoke": f"**Smoke run, not a result**: {data['results'][0]['clients']} clients, "
        f"{rounds} rounds, a subset of the data.",
    }[mode]
    return "\n\n".join(
        [
            f"{note} Wall time of the whole benchmark: {data['wall'] / 60:.1f} min "
            f"({data['workers']} worker processes, one torch thread each).",
            PROTOCOL,
            table(data["results"]),
            DIFFERENCES.format(lam=data["ditto_lam"]),
            "Curves: ![pfllib curves](docs/benchmarks/pfllib_curves.png)",
        ]
    )


def plot(results: Sequence[Mapping[str, Any]], path: Any = None) -> str:
    """Pooled accuracy per round, one panel per split; PFLlib's figures as dotted lines."""
    pyplot = plt()
    splits = sorted({r["split"] for r in results})
    fig, axes = pyplot.subplots(1, len(splits), figsize=(6 * len(splits), 4.2), squeeze=False)
    colours = {m: f"C{i}" for i, m in enumerate(TITLES)}
    for ax, split in zip(axes[0], splits, strict=True):
        for r in sorted((r for r in results if r["split"] == split), key=lambda r: r["method"]):
            xs = [p[0] for p in r["curve"]]
            ys = [100 * p[1] for p in r["curve"]]
            c = colours.get(r["method"], "k")
            ax.plot(
                xs,
                ys,
                marker="o" if len(xs) < 30 else None,
                ms=3 if len(xs) > 1 else 7,  # FedBABU: one evaluation, at the end
                color=c,
                label=TITLES.get(r["method"], r["method"]),
            )
            theirs = THEIRS.get(split, {}).get(r["method"])
            if theirs is not None:
                ax.axhline(theirs[0], color=c, ls=":", lw=1, alpha=0.7)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(f"Fashion-MNIST, {SPLIT_TITLES.get(split, split)}  (dotted: PFLlib)")
        label_axes(ax, "round", "pooled test accuracy, %")
    if path is None:
        return save_fig(fig, "pfllib_curves.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)
    return str(path)


def write(data: Mapping[str, Any]) -> str:
    """BENCHMARKS.md section ``pfllib`` + the plot (a smoke run: printed, plot in runs/)."""
    md = report(data)
    if data["mode"] == "smoke":
        out = REPO_ROOT / "runs" / "pfllib"
        out.mkdir(parents=True, exist_ok=True)
        plot(data["results"], out / "smoke_curves.png")
        print(md)
        return md
    plot(data["results"])
    write_section("pfllib", md, command=data.get("command"), machine=data.get("machine"))
    return md
