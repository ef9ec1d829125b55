"""Helpers shared by the accuracy benchmark (``python -m benchmarks.accuracy``).

* :func:`global_model_logits` evaluates the server's global model (any width) on a test
  set, outside the round loop: a ``MultiTaskModel`` at that width, loaded with the
  sliced global state. For ``static_batch`` models it follows HeteroFL's static batch
  norm (sBN): the library's statistics pass (:func:`fmtl_lightning.static_bn.compute_static_stats`)
  over pooled training images, then evaluation with those fixed statistics (so a test
  batch never normalises itself).
* :func:`round_curve` turns a simulation's metric rows into (round, mean, worst) points.
* small formatting helpers for the markdown tables.

Not named ``bench_*`` on purpose: ``make bench`` runs every ``bench_*.py``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def set_threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(int(n))


def global_model_logits(
    global_state: Mapping[str, np.ndarray],
    spec: Any,
    bcfg: Any,
    model_tasks: Mapping[str, int],
    width: float,
    x: Any,
    *,
    head: str | None = None,
    stats_x: Any = None,
    batch: int = 500,
) -> np.ndarray:
    """Logits (N, outputs) of the global model sliced to ``width`` on images ``x``.

    ``global_state`` must hold every trained key of the model (a FedAvg-style run: heads
    shared); static batch-norm statistics are computed here, over ``stats_x``.
    ``stats_x``: images for the sBN statistics of ``static_batch`` models (required then).
    """
    import torch

    from fmtl_lightning.models import MultiTaskModel, head_name, load_arrays
    from fmtl_lightning.roles import WidthSpec
    from fmtl_lightning.slicing import slice_state
    from fmtl_lightning.static_bn import compute_static_stats

    model = MultiTaskModel(bcfg, dict(model_tasks), width)
    state = slice_state(global_state, spec, WidthSpec(width))
    load_arrays(model, state)
    head = head or next(iter(model_tasks))
    with torch.no_grad():
        if bcfg.norm == "static_batch":
            if stats_x is None:
                raise ValueError("static_batch models need stats_x for the sBN statistics")
            compute_static_stats(model, stats_x, chunk=batch)
        model.eval()
        out = [
            model.backbone(x[i : i + batch]) for i in range(0, x.shape[0], batch)
        ]  # features first: one head lookup below
        feats = torch.cat(out)
        logits = model.heads[head_name(head)](feats)
    return logits.numpy()


def sim_global_logits(sim: Any, width: float, x: Any, stats_x: Any = None) -> np.ndarray:
    """:func:`global_model_logits` for a FedAvg :class:`~fmtl_lightning.simulation.Simulation`."""
    return global_model_logits(
        sim.global_state,
        sim.spec,
        sim.engine.plan.model.cfg,
        sim.engine.plan.layout.model_tasks,
        width,
        x,
        stats_x=stats_x,
    )


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == np.asarray(labels)).mean())


def masked_accuracy(logits: np.ndarray, labels: np.ndarray, allowed: np.ndarray) -> float:
    """Accuracy with the logits of classes outside ``allowed`` (bool mask) removed."""
    z = np.where(np.asarray(allowed)[None, :], logits, -np.inf)
    return float((z.argmax(1) == np.asarray(labels)).mean())


def round_curve(rows: Sequence[Mapping[str, Any]]) -> list[tuple[int, float, float]]:
    """(round, mean over clients, worst client) of the per-client accuracy (mean over tasks)."""
    by_round: dict[int, dict[str, list[float]]] = {}
    for r in rows:
        by_round.setdefault(int(r["round"]), {}).setdefault(r["client"], []).append(float(r["acc"]))
    out = []
    for rnd in sorted(by_round):
        vals = np.array([np.mean(v) for v in by_round[rnd].values()])
        out.append((rnd, float(vals.mean()), float(vals.min())))
    return out


def fmt_pct(x: float, nd: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{nd}f}"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def pm(values: Sequence[float], nd: int = 1) -> str:
    m, s = mean_std(values)
    return f"{100 * m:.{nd}f} ± {100 * s:.{nd}f}" if len(values) > 1 else f"{100 * m:.{nd}f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


class Clock:
    """Wall time since construction, and a deadline check."""

    def __init__(self, budget_s: float | None = None) -> None:
        self.t0 = time.perf_counter()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def fits(self, more_s: float) -> bool:
        return self.budget_s is None or self.elapsed() + more_s <= self.budget_s


def docs_dir() -> Any:
    from benchmarks.common import REPO_ROOT

    d = REPO_ROOT / "docs" / "benchmarks"
    d.mkdir(parents=True, exist_ok=True)
    return d


def plt():
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def label_axes(ax: Any, xlabel: str, ylabel: str, *, legend_size: int = 8) -> None:
    """Axis labels, a light grid and the legend: the same on every accuracy plot."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def save_fig(fig: Any, name: str) -> str:
    """Lay out, write ``docs/benchmarks/<name>`` at 110 dpi, close; returns the path."""
    fig.tight_layout()
    f = docs_dir() / name
    fig.savefig(f, dpi=110)
    plt().close(fig)
    return str(f)
