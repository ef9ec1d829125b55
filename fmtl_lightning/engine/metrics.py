"""A run's metric rows: one per (round, client, task), the same columns on every transport.

The in-process simulation evaluates every client itself; a deployed node reports its
metrics in its train reply (``acc/<task>``, ``loss/<task>``, ``f1/<task>``). Both become
the rows below, ``metrics.csv`` of each round and of the run, and the run's summary.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

METRIC_FIELDS = ("round", "client", "width", "task", "loss", "acc", "f1")
_PER_TASK = ("loss", "acc", "f1")


def metric_rows(
    round_no: int, client: str, width: float, per_task: Mapping[str, Mapping[str, float]]
) -> list[dict[str, Any]]:
    """One row per task of ``per_task`` (task -> ``loss``, ``acc``, optional ``f1``);
    values rounded to 6 decimals, a missing one left empty."""
    rows = []
    for task, vals in per_task.items():
        row: dict[str, Any] = {"round": round_no, "client": client, "width": width, "task": task}
        for k in _PER_TASK:
            row[k] = round(float(vals[k]), 6) if k in vals else ""
        rows.append(row)
    return rows


def per_task(flat: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """``{"acc/<task>": v, "loss/<task>": v, ...}`` (a node's reply) -> task -> metrics;
    tasks are those with an accuracy, in sorted order."""
    tasks = sorted({k.split("/", 1)[1] for k in flat if k.startswith("acc/")})
    return {t: {k: flat[f"{k}/{t}"] for k in _PER_TASK if f"{k}/{t}" in flat} for t in tasks}


def flat_metrics(per: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Inverse of :func:`per_task`: ``<metric>/<task>`` -> value."""
    return {f"{k}/{t}": float(v) for t, vals in per.items() for k, v in vals.items()}


def rows_csv(rows: list[dict[str, Any]]) -> str:
    """``metrics.csv``: a header and the rows."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def client_scores(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per client: mean over its tasks of the accuracy, at the last round in ``rows``."""
    last = max(r["round"] for r in rows)
    acc: dict[str, list[float]] = {}
    for r in rows:
        if r["round"] == last:
            acc.setdefault(r["client"], []).append(float(r["acc"]))
    return {c: float(np.mean(v)) for c, v in acc.items()}


def summarize(rows: list[dict[str, Any]], algorithm: str, name: str) -> dict[str, Any]:
    """The run's summary at the last evaluated round: per client and task, the mean, the
    worst client and the mean of the bottom 10% of clients."""
    scores = client_scores(rows)
    last = max(r["round"] for r in rows)
    clients: dict[str, Any] = {}
    for r in rows:
        if r["round"] != last:
            continue
        c = clients.setdefault(r["client"], {"width": r["width"], "tasks": {}})
        c["tasks"][r["task"]] = {k: r[k] for k in ("acc", "loss", "f1") if r[k] != ""}
    for cid, c in clients.items():
        c["acc"] = scores[cid]
    vals = np.sort(np.array(list(scores.values())))
    k = max(1, math.ceil(0.1 * vals.size))
    return {
        "name": name,
        "algorithm": algorithm,
        "rounds": last,
        "clients": clients,
        "mean_acc": float(vals.mean()),
        "worst_acc": float(vals[0]),
        "worst_client": min(scores, key=scores.__getitem__),
        "bottom10_acc": float(vals[:k].mean()),
    }
