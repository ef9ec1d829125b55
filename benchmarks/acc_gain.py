"""Is the multi-task gain measurable? Large per-client test sets, 5 seeds, paired 95% CIs.

    python -m benchmarks.acc_gain [--quick] [--seeds 0,1,2,3,4] [--models mlp,fedavgcnn]
                                  [--methods local,fedavg,...] [--test-size 500]
                                  [--workers 2] [--render]

Accuracy part 1's multi-task federation (:mod:`benchmarks.acc_part1`: 20 MNIST + Fashion-MNIST
clients holding digit / parity / ge5 / attrs / item / group, 100 samples each, half of them
training data, Dirichlet 0.3, all at width 1, the same SGD steps for every method) with one
change: each client is evaluated on ``--test-size`` images drawn from the dataset's *test*
split with the client's own training label mix (:func:`fmtl_lightning.partition.matched_sample`)
instead of its ~50 own held-out images; its training data stay the same. With ~50 test
images per client one seed's client population moves the mean by about 2 points; with 500
that noise is about sqrt(10) times smaller, so the paired comparison can see a real gain.

For each model (McMahan et al.'s 2NN MLP, and PFLlib's FedAvgCNN) and seed, every method
runs on the same clients and data; every personalised method is compared with local-only
and with FedAvg seed by seed: the mean paired difference and its 95% confidence interval
(Student t over seeds), on the mean and on the worst client. "Beyond the CI" means the
interval's lower end is above zero. The best method (highest mean over seeds) is picked on
the same runs, which favours it slightly; the report names it and shows every method's row.

Raw results: ``runs/accuracy/gain-<mode>.json``; an invocation with ``--methods``/``--seeds``/
``--models`` replaces its own (model, seed, method) runs there and keeps the others, so
methods can be added later. BENCHMARKS.md section ``accuracy-gain`` (``--quick``: printed
only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any

import numpy as np

from benchmarks import acc_part1
from benchmarks.acc_common import md_table, round_curve, set_threads
from benchmarks.common import (
    REPO_ROOT,
    current_command,
    machine_line,
    merge_runs,
    write_section,
)

METHODS = ("local", "fedavg", "fedper", "fedrep", "ditto-1", "fedbabu", "fedavg_ft")
PERSONALISED = ("fedper", "fedrep", "ditto-1", "fedbabu", "fedavg_ft")
MODELS: dict[str, dict[str, Any]] = {
    "mlp": {"family": "mlp", "hidden": (200, 200), "norm": "none"},
    "fedavgcnn": {"family": "fedavgcnn", "hidden": (32, 64, 512), "norm": "none"},
}
MODES: dict[str, dict[str, Any]] = {
    "default": {**acc_part1.PARAMS["default"], "eval_every": 20},  # part 1's 80 rounds
    "quick": {**acc_part1.PARAMS["quick"], "rounds": 3, "eval_every": 3},
}


def matched_test_sets(fed: Any, test_size: int, seed: int, data_dir: str | None = None) -> Any:
    """``fed`` with each client's test set replaced by ``test_size`` images of its domain's
    test split, drawn with the label mix of the client's training data."""
    import torch

    from fmtl_lightning.data import load_dataset
    from fmtl_lightning.partition import matched_sample
    from fmtl_lightning.tasks import get_task

    splits: dict[str, tuple[Any, Any]] = {}
    clients = []
    for i, c in enumerate(fed.clients):
        d = c.spec.domain
        if d not in splits:
            splits[d] = (load_dataset(d, "train", data_dir), load_dataset(d, "test", data_dir))
        train, test = splits[d]
        mix = np.bincount(train.labels[c.spec.train_idx], minlength=10)
        idx = matched_sample(test.labels, mix, test_size, seed * 1000 + i)
        x = (test.images[idx].astype(np.float32) / 255.0 - train.mean) / train.std
        y = {
            t: torch.from_numpy(np.asarray(get_task(t).target(test.labels[idx])).copy())
            for t in c.tasks
        }
        clients.append(dataclasses.replace(c, x_test=torch.from_numpy(x[:, None].copy()), y_test=y))
    return dataclasses.replace(fed, clients=clients)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One (model, seed, method) simulation with large matched test sets."""
    from fmtl_lightning.config import parse_config
    from fmtl_lightning.engine.metrics import client_scores
    from fmtl_lightning.fed_data import build_federation
    from fmtl_lightning.simulation import Simulation

    t0 = time.perf_counter()
    P = {**job["params"], **MODELS[job["model"]]}
    raw = acc_part1.base_config(P, "dirichlet", "w1", job["seed"])
    fed = build_federation(parse_config(raw))
    n_train = np.array([c.num_train for c in fed.clients])
    head_steps = int(round(np.ceil(n_train / P["batch_size"]).mean()))
    cfg = parse_config(acc_part1.method_config(raw, job["method"], P, head_steps))
    fed = matched_test_sets(fed, job["test_size"], job["seed"])
    tmp = tempfile.mkdtemp(prefix="fmtl-gain-")
    try:
        sim = Simulation(cfg, tmp, progress=False, federation=fed)
        sim.run()
        scores = client_scores(sim.history)
        curve = round_curve(sim.history)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    vals = np.array(list(scores.values()))
    return {
        **{k: job[k] for k in ("model", "seed", "method", "test_size")},
        "mean": float(vals.mean()),
        "worst": float(vals.min()),
        "clients": scores,
        "curve": curve,
        "wall": time.perf_counter() - t0,
    }


def paired(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Mean of the seed-by-seed differences ``a - b`` and its 95% t interval (lo, hi)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.size < 2:
        return float(d.mean()), math.nan, math.nan
    from scipy.stats import t  # scikit-learn's dependency, so here with [train]

    half = float(t.ppf(0.975, d.size - 1)) * d.std(ddof=1) / math.sqrt(d.size)
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def _by(results: Sequence[dict], model: str, method: str, key: str) -> list[float]:
    rs = sorted(
        (r for r in results if r["model"] == model and r["method"] == method),
        key=lambda r: r["seed"],
    )
    return [r[key] for r in rs]


def _on_bases_worst(results: Sequence[dict], model: str, method: str, base: str) -> list[float]:
    """Per seed, ``method``'s accuracy minus ``base``'s on the client ``base`` serves worst:
    the same client on both sides (the worst-client column's minimum may pick a different
    client for each method)."""
    out = []
    for m_run, b_run in zip(_by(results, model, method, "clients"),
                            _by(results, model, base, "clients"), strict=True):  # fmt: skip
        cid = min(b_run, key=b_run.get)
        out.append(m_run[cid] - b_run[cid])
    return out


def report(results: Sequence[dict], data: dict[str, Any]) -> str:
    """Per model: each method's mean/worst over seeds, then the paired verdicts."""
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    out = [
        f"{'**Quick mode: a smoke run, not a result.** ' if data['mode'] == 'quick' else ''}"
        f"Seeds {','.join(map(str, data['seeds']))}, {data['test_size']} test images per "
        f"client (its own label mix, from the test split), {data['rounds']} rounds; wall time "
        f"{data['wall'] / 60:.1f} min. Cells: mean ± std over seeds, in %."
    ]
    for model in MODELS:
        if not any(r["model"] == model for r in results):
            continue
        rows = []
        for m in METHODS:
            mean, worst = _by(results, model, m, "mean"), _by(results, model, m, "worst")
            if mean:
                sd = lambda v: f" ± {100 * np.std(v, ddof=1):.1f}" if len(v) > 1 else ""  # noqa: E731
                rows.append([m, str(len(mean)), pct(np.mean(mean)) + sd(mean),
                             pct(np.mean(worst)) + sd(worst)])  # fmt: skip
        seeds = sorted({r["seed"] for r in results if r["model"] == model})
        out += [
            f"**{model}** ({len(seeds)} seeds: {','.join(map(str, seeds))})",
            md_table(["method", "seeds", "mean", "worst client"], rows),
        ]
        have = [m for m in PERSONALISED if _by(results, model, m, "mean")]
        if not have:
            continue
        best = max(have, key=lambda m: np.mean(_by(results, model, m, "mean")))
        verdict_rows = []
        for m in [best, *(h for h in have if h != best)]:
            for base in ("local", "fedavg"):
                if _by(results, model, m, "seed") != _by(results, model, base, "seed"):
                    continue  # not run on the same seeds: no pairing
                cells = [f"{m} − {base}"]
                diffs = [
                    paired(_by(results, model, m, key), _by(results, model, base, key))
                    for key in ("mean", "worst")
                ]
                if all("clients" in r for r in results):
                    same = _on_bases_worst(results, model, m, base)
                    diffs.append(paired(same, [0.0] * len(same)))
                for d, lo, hi in diffs:
                    beyond = "yes" if lo > 0 else "no"
                    cells.append(f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] ({beyond})")
                verdict_rows.append(cells)
        if not verdict_rows:  # no local/FedAvg runs on the same seeds
            continue
        out += [
            f"Paired by seed, best personalised method = **{best}** (highest mean), then the "
            "others: difference and 95% CI, in points (beyond the CI: lower end > 0). "
            "*Worst client*: each method's own worst (the issue's metric; often a different "
            "client on each side). *Baseline's worst client*: the client the baseline serves "
            "worst, on both sides.",
            md_table(
                ["comparison", "mean", "worst client", "baseline's worst client"][
                    : len(verdict_rows[0])
                ],
                verdict_rows,
            ),
        ]
    return "\n\n".join(out)


def save(out: Any, data: dict[str, Any]) -> dict[str, Any]:
    """Write ``data`` to ``out`` with the runs of an earlier invocation with the same
    settings (mode, test size, rounds) that this one did not redo (:func:`merge_runs`);
    seeds and wall times add up. Returns what was written."""
    return merge_runs(
        out,
        data,
        key=lambda r: (r["model"], r["seed"], r["method"]),
        same=("mode", "test_size", "rounds"),
        combine=lambda old, new: {
            "seeds": sorted({*old["seeds"], *new["seeds"]}),
            "wall": old["wall"] + new["wall"],
        },
    )


def run_jobs(jobs: list[dict[str, Any]], workers: int) -> Iterator[dict[str, Any]]:
    if workers <= 1:
        set_threads(1)
        yield from map(run_job, jobs)
        return
    ctx = get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=set_threads, initargs=(1,)) as ex:
        yield from (f.result() for f in as_completed([ex.submit(run_job, j) for j in jobs]))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.acc_gain")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--render", action="store_true")
    a = p.parse_args(argv)
    mode = "quick" if a.quick else "default"
    models = [m for m in a.models.split(",") if m]
    methods = [m for m in a.methods.split(",") if m]
    if any(m not in MODELS for m in models) or any(m not in METHODS for m in methods):
        raise SystemExit(f"--models from {list(MODELS)}, --methods from {list(METHODS)}")
    if a.test_size < 1 or a.workers < 1:
        raise SystemExit("--test-size and --workers must be >= 1")
    out = REPO_ROOT / "runs" / "accuracy" / f"gain-{mode}.json"
    if a.render:
        data = json.loads(out.read_text())
    else:
        P = MODES[mode]
        seeds = [int(s) for s in a.seeds.split(",") if s]
        jobs = [
            {"params": P, "model": mo, "seed": s, "method": m, "test_size": a.test_size}
            for mo in reversed(models)  # the CNN runs first: the longest
            for s in seeds
            for m in methods
        ]
        t0, results = time.perf_counter(), []
        partial = out.with_suffix(".partial.json")  # survives an interrupted run
        partial.parent.mkdir(parents=True, exist_ok=True)
        for r in run_jobs(jobs, a.workers):
            results.append(r)
            partial.write_text(json.dumps({"mode": mode, "results": results}, indent=1))
            print(
                f"{time.strftime('%H:%M:%S')} {r['model']} s{r['seed']} {r['method']}: mean "
                f"{100 * r['mean']:.1f} worst {100 * r['worst']:.1f} ({r['wall']:.0f}s)",
                flush=True,
            )
        data = save(
            out,
            {
                "mode": mode,
                "seeds": seeds,
                "test_size": a.test_size,
                "rounds": P["rounds"],
                "results": results,
                "wall": time.perf_counter() - t0,
                "command": current_command(),
                "machine": machine_line(),
            },
        )
        partial.unlink()
    md = report(data["results"], data)
    if mode != "quick":  # a smoke run is printed, never written into BENCHMARKS.md
        command = " ; ".join(data.get("commands") or [data["command"]])
        write_section("accuracy-gain", md, command=command, machine=data["machine"])
    print(md)
    return data


if __name__ == "__main__":
    main()
