"""Run reports: summary.json with the local-only comparison, PNG plots, a console table."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def write_report(run_dir: Path, summary: dict[str, Any], baseline: dict[str, Any] | None) -> dict:
    """Merge the baseline into summary.json and draw the plots; returns the merged summary."""
    out = dict(summary)
    if baseline is not None:
        out["local_baseline"] = {
            k: baseline[k] for k in ("mean_acc", "worst_acc", "worst_client", "bottom10_acc")
        }
        out["local_baseline"]["clients"] = {
            cid: {"acc": c["acc"]} for cid, c in baseline["clients"].items()
        }
    (run_dir / "summary.json").write_text(json.dumps(out, indent=1))
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    plot_rounds(run_dir / "metrics.csv", plot_dir / "accuracy_by_round.png", summary["algorithm"])
    plot_final(out, plot_dir / "final_vs_local.png")
    return out


def _client_curves(metrics_csv: Path) -> tuple[dict[str, dict[int, list[float]]], dict[str, float]]:
    curves: dict[str, dict[int, list[float]]] = {}
    widths: dict[str, float] = {}
    with open(metrics_csv) as fh:
        for r in csv.DictReader(fh):
            curves.setdefault(r["client"], {}).setdefault(int(r["round"]), []).append(
                float(r["acc"])
            )
            widths[r["client"]] = float(r["width"])
    return curves, widths


def plot_rounds(metrics_csv: Path, out: Path, title: str) -> None:
    """Accuracy against round for each client, coloured (and grouped in the legend) by width."""
    curves, widths = _client_curves(metrics_csv)
    levels = sorted(set(widths.values()), reverse=True)
    cmap = plt.get_cmap("viridis", max(len(levels), 2))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labelled = set()
    for cid, by_round in sorted(curves.items()):
        rounds = sorted(by_round)
        accs = [sum(by_round[r]) / len(by_round[r]) for r in rounds]
        w = widths[cid]
        lab = f"width {w:g}" if w not in labelled else None
        labelled.add(w)
        ax.plot(rounds, accs, color=cmap(levels.index(w)), alpha=0.8, label=lab)
    ax.set_xlabel("round")
    ax.set_ylabel("personalised accuracy (own test split)")
    ax.set_title(f"{title}: accuracy by round, one line per client")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_final(summary: dict[str, Any], out: Path) -> None:
    """Final per-client accuracy next to the local-only baseline (when there is one)."""
    cids = sorted(summary["clients"])
    fed = [summary["clients"][c]["acc"] for c in cids]
    base = summary.get("local_baseline", {}).get("clients", {})
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(cids) + 2), 4))
    xs = range(len(cids))
    ax.bar([x - 0.2 for x in xs], fed, width=0.4, label=summary["algorithm"])
    if base:
        ax.bar([x + 0.2 for x in xs], [base[c]["acc"] for c in cids], width=0.4, label="local-only")
    ax.set_xticks(
        list(xs), [f"{c}\nw={summary['clients'][c]['width']:g}" for c in cids], fontsize=7
    )
    ax.set_ylabel("final accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def format_table(summary: dict[str, Any]) -> str:
    """Console table: client, width, tasks, personalised accuracy, local-only, difference."""
    base = summary.get("local_baseline", {}).get("clients", {})
    lines = [
        f"{'client':<7} {'width':>5}  {'tasks':<28} {summary['algorithm']:>8} {'local':>7} {'gain':>7}"
    ]
    for cid in sorted(summary["clients"]):
        c = summary["clients"][cid]
        tasks = ",".join(t.split("/")[-1] for t in c["tasks"])
        b = base.get(cid, {}).get("acc")
        bs = f"{b:7.3f}" if b is not None else "      -"
        gain = f"{c['acc'] - b:+7.3f}" if b is not None else "      -"
        lines.append(f"{cid:<7} {c['width']:>5g}  {tasks:<28} {c['acc']:8.3f} {bs} {gain}")
    lb = summary.get("local_baseline")
    lines.append(
        f"{'mean':<42} {summary['mean_acc']:8.3f} "
        + (f"{lb['mean_acc']:7.3f} {summary['mean_acc'] - lb['mean_acc']:+7.3f}" if lb else "")
    )
    lines.append(
        f"{'worst':<42} {summary['worst_acc']:8.3f} "
        + (f"{lb['worst_acc']:7.3f} {summary['worst_acc'] - lb['worst_acc']:+7.3f}" if lb else "")
    )
    return "\n".join(lines)
