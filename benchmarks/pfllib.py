"""PFLlib's Fashion-MNIST leaderboard, reproduced: their federation, model, training, metric.

    python -m benchmarks.pfllib [--full] [--rounds N] [--minutes M] [--splits dir,pat]
                                [--methods fedavg,fedper,...] [--workers 2]
                                [--clients N --max-samples N]   # smoke settings only
                                [--render]                      # re-write from the JSON
                                [--fresh]                       # long runs start over

The protocol (TsingZ0/PFLlib, see :mod:`fmtl_lightning.data.pfllib` for the data):

* Fashion-MNIST train + test merged (70k), pixels / 255 normalised with mean 0.5, std 0.5;
  20 clients, PFLlib's Dirichlet(0.1) split ("dir", their "practical" label skew) or their
  pathological 2-classes-per-client split ("pat"), seed 1, each client 75/25 train/test;
* FedAvgCNN (``model.family: fedavgcnn``, ``norm: none``), the head = the last linear layer;
* every client every round, 1 local epoch, batch 10 with the short last batch dropped
  (``federation.drop_last``), plain SGD lr 0.005 (no momentum);
* metric: each round, correct predictions pooled over all clients' test sets (the
  sample-weighted mean); PFLlib reports the best round ("best"), we also report the last
  ("final").

Methods: FedAvg, FedPer, FedRep (1 head epoch, then 1 body epoch, as PFLlib's default
``plocal_epochs=1``), Ditto (lambda ``--ditto-lam``; scored with the personal models and,
every round too, the global copies, as PFLlib's list holds both), local-only, FedBABU
(heads frozen at init, scored every round with those heads as PFLlib does; after the last
round each client fine-tunes its whole model for 10 epochs, PFLlib's ``fine_tune()``, and
also, separately, its heads alone, our library's FedBABU evaluation), FedAvg+FT (1
fine-tune epoch before every evaluation). The extra evaluations: :mod:`benchmarks.pfllib_evals`.

``--full`` runs PFLlib's 2,000 rounds. The default runs :data:`DEFAULT_ROUNDS` rounds, sized
to fit about 60 minutes on 2 cores, and its table says so. Each (split, method) is one
:class:`~fmtl_lightning.simulation.Simulation` in a process pool (one torch thread per
worker). Raw results: ``runs/pfllib/<mode>.json``; BENCHMARKS.md section ``pfllib`` and
``docs/benchmarks/pfllib_curves.png`` (:mod:`benchmarks.pfllib_report`).

Any other ``--rounds`` is a *long* run, to test the goal where 5 rounds cannot: its results
go to ``runs/pfllib/long.json``, section ``pfllib-long`` and ``pfllib_long_curves.png``, and
each invocation adds its (split, method) runs to the ones already there, so methods can run
as separate invocations (``--render`` with any such ``--rounds`` re-writes that section).
``--minutes M`` stops each run after the first round that ends past M minutes of its wall
time (a run cut to a budget; the table shows the rounds it ran). A long run keeps its
checkpoints in ``runs/pfllib/long/<split>-<method>/``, and the next long invocation of
that pair goes on from its last round (``Simulation.resume(rounds=...)``: the same numbers
as one straight run), so PFLlib's hundreds of rounds can add up over several sessions;
``--fresh`` starts it over. A kept run of another config is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.acc_common import set_threads
from benchmarks.common import REPO_ROOT, current_command, machine_line, merge_runs
from mobile_client.fileio import atomic_write_text

TASK = "fashion/item"
DOMAIN = "fashion_mnist"
FULL_ROUNDS = 2000
DEFAULT_ROUNDS = 5  # ~18 core-min per round of all 14 runs (measured, see the README line)
SPLITS = ("dir", "pat")
DITTO_LAM = 0.1
FEDBABU_FINETUNE_EPOCHS = 10  # PFLlib's fine_tuning_epochs default
FEDAVG_FT_EPOCHS = 1
# method -> its algorithm config (beyond the name) and evaluation schedule
METHODS: dict[str, dict[str, Any]] = {
    "fedavg": {"algorithm": {"name": "fedavg"}},
    "fedper": {"algorithm": {"name": "fedper"}},
    "fedrep": {"algorithm": {"name": "fedrep", "rep_head_epochs": 1}},
    "ditto": {"algorithm": {"name": "ditto", "lam": DITTO_LAM}},
    "local": {"algorithm": {"name": "local"}},
    # per-round scores with the init heads; the 10-epoch fine-tunes run once, at the end
    "fedbabu": {"algorithm": {"name": "fedbabu", "finetune_epochs": 0}},
    "fedavg_ft": {"algorithm": {"name": "fedavg_ft", "finetune_epochs": FEDAVG_FT_EPOCHS}},
}
# relative cost of a round (epochs of work per client), to start the longest jobs first
COST = {"ditto": 2.0, "fedavg_ft": 2.0, "fedrep": 1.4, "fedbabu": 1.3}
END_COST = {"fedbabu": 13.0}  # its two 10-epoch fine-tunes, in rounds of FedAvg (measured)
LONG_RUNS = REPO_ROOT / "runs" / "pfllib" / "long"  # a long run's checkpoints, per split-method


def build_federation(
    kind: str,
    *,
    num_clients: int = 20,
    seed: int = 1,
    max_samples: int | None = None,
    data_dir: str | None = None,
) -> Any:
    """The :class:`~fmtl_lightning.fed_data.Federation` of PFLlib's ``kind`` split.

    Client indices point into the merged 70k dataset. ``max_samples`` (smoke runs and tests
    only, not PFLlib's protocol) first keeps a seeded random subset of that many samples.
    """
    import torch

    from fmtl_lightning.data import pfllib
    from fmtl_lightning.fed_data import ClientData, Federation
    from fmtl_lightning.federation import ClientSpec, federation_summary

    images, labels = pfllib.merged_dataset(DOMAIN, data_dir)
    if max_samples is not None and max_samples < labels.size:
        keep = np.sort(np.random.RandomState(seed).choice(labels.size, max_samples, replace=False))
        images, labels = images[keep], labels[keep]
    splits = pfllib.pfllib_split(labels, kind, num_clients=num_clients, seed=seed)  # type: ignore[arg-type]

    def x_of(idx: np.ndarray) -> torch.Tensor:  # (N, 1, 28, 28) float32
        x = (images[idx].astype(np.float32) / 255.0 - pfllib.MEAN) / pfllib.STD
        return torch.from_numpy(x[:, None])

    def y_of(idx: np.ndarray) -> dict[str, torch.Tensor]:
        return {TASK: torch.from_numpy(labels[idx].astype(np.int64))}

    clients, specs = [], []
    for i, s in enumerate(splits):
        spec = ClientSpec(f"c{i:02d}", (TASK,), 1.0, s.train, s.test, DOMAIN)
        held = torch.from_numpy(np.isin(np.arange(10), labels[s.train]))
        specs.append(spec)
        clients.append(
            ClientData(
                spec, None, x_of(s.train), y_of(s.train), x_of(s.test), y_of(s.test), {TASK: held}
            )
        )
    summary = federation_summary(specs, {DOMAIN: labels})
    return Federation(clients, 28, summary, {DOMAIN: (pfllib.MEAN, pfllib.STD)})


def run_config(
    method: str, rounds: int, num_clients: int, seed: int = 1, ditto_lam: float = DITTO_LAM
) -> dict[str, Any]:
    """The run's config: PFLlib's training recipe for ``method`` (a plain mapping)."""
    algorithm = dict(METHODS[method]["algorithm"])
    if method == "ditto":
        algorithm["lam"] = ditto_lam
    return {
        "name": f"pfllib-{method}",
        "seed": seed,
        "model": {"family": "fedavgcnn", "norm": "none"},
        "clients": [{"count": num_clients, "tasks": [TASK], "width": 1.0}],
        "algorithm": algorithm,
        "federation": {
            "rounds": rounds,
            "fraction": 1.0,
            "local_epochs": 1,
            "batch_size": 10,
            "drop_last": True,
            "eval_every": 1,
        },
        "optimizer": {"name": "sgd", "lr": 0.005, "momentum": 0.0, "weight_decay": 0.0},
        "compare_local": False,
        "checkpoints": {"keep_last": 1},
    }


def pooled_curve(rows: Sequence[dict[str, Any]], n_test: dict[str, int]) -> list[list[float]]:
    """[round, accuracy] per evaluated round: correct predictions pooled over every client's
    test set (each client's accuracy times its test size, summed, over the total)."""
    by_round: dict[int, list[float]] = {}
    for r in rows:
        acc = by_round.setdefault(int(r["round"]), [0.0, 0.0])
        n = n_test[r["client"]]
        acc[0] += round(float(r["acc"]) * n)  # this client's correct predictions
        acc[1] += n
    return [[rnd, c / n] for rnd, (c, n) in sorted(by_round.items())]


def headline(method: str, variants: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """PFLlib's figure ("best": the max over every evaluation its list holds, with its
    round) and the honest one ("final": the last evaluation of the model a client keeps:
    Ditto's personal model, FedBABU's whole-model fine-tune)."""
    points = [p for v in variants if v["in_best"] for p in v["curve"]]
    best = max(points, key=lambda p: p[1])
    final = next(v for v in variants if v["final"])["curve"][-1][1]
    return {"best": best[1], "best_round": int(best[0]), "final": final}


class _Budget(Exception):
    """Raised after the round that passed a run's ``--minutes`` budget."""


def budget_guard(
    t0: float, minutes: float | None, then: Callable[[int], None] | None
) -> Callable[[int], None] | None:
    """An ``on_round`` callback that calls ``then`` and, once ``minutes`` have passed since
    ``t0``, ends the run by raising :class:`_Budget` (``None``: no budget, ``then`` as is)."""
    if minutes is None:
        return then

    def on_round(round_no: int) -> None:
        if then is not None:
            then(round_no)
        if time.perf_counter() - t0 >= 60 * minutes:
            raise _Budget

    return on_round


def _read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


def _then_write(on_round: Callable[[int], None], path: Path, data: Any) -> Callable[[int], None]:
    def both(round_no: int) -> None:
        on_round(round_no)
        atomic_write_text(path, json.dumps(data))

    return both


def open_run(cfg: Any, run_dir: Path, fed: Any) -> Any:
    """The run's :class:`~fmtl_lightning.simulation.Simulation`: taken further from
    ``run_dir``'s last checkpoint when it holds rounds of the same config (whatever
    rounds total it was started for), else fresh. Rounds of another config are refused:
    ``--fresh`` starts over."""
    from fmtl_lightning.checkpoint import completed_rounds
    from fmtl_lightning.config import ConfigError, load_config
    from fmtl_lightning.simulation import Simulation

    done = completed_rounds(run_dir)
    if not done:
        return Simulation(cfg, run_dir, progress=False, federation=fed)
    saved = load_config(run_dir / "config.yaml")
    rounds = max(cfg.federation.rounds, done[-1])
    same = lambda c: c.replace(federation=replace(c.federation, rounds=rounds))  # noqa: E731
    if same(saved) != same(cfg):
        raise ConfigError(
            f"{run_dir} holds {done[-1]} rounds of another config ({run_dir / 'config.yaml'}); "
            "pass --fresh to start that run over"
        )
    return Simulation.resume(run_dir, rounds=rounds, progress=False, federation=fed)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One (split, method) simulation; returns its pooled-accuracy curves and timings."""
    from benchmarks import pfllib_evals
    from fmtl_lightning.config import parse_config

    t0 = time.perf_counter()
    fed = build_federation(
        job["split"], num_clients=job["clients"], max_samples=job.get("max_samples")
    )
    cfg = parse_config(
        run_config(job["method"], job["rounds"], job["clients"], ditto_lam=job["ditto_lam"])
    )
    n_test = {c.cid: int(c.x_test.shape[0]) for c in fed.clients}
    kept = job.get("run_dir")  # a long run's: kept, so the next invocation goes on from it
    tmp = kept or tempfile.mkdtemp(prefix="fmtl-pfllib-")
    try:
        sim = open_run(cfg, Path(tmp), fed)
        t_build = time.perf_counter() - t0
        method, glob = job["method"], []
        on_round = None
        if method == "ditto":  # the global copies' curve is not in the run's history
            glob_file = Path(tmp) / "global_model_curve.json"
            glob = [p for p in _read_json(glob_file, []) if p[0] <= sim.round_idx]
            on_round = pfllib_evals.global_model_curve(sim, glob)
            on_round = _then_write(on_round, glob_file, glob)
        rounds_before = sim.round_idx
        try:
            sim.run(budget_guard(t0, job.get("minutes"), on_round))
        except _Budget:
            pass  # the rounds run so far are in sim.history
        times = [t.as_dict() for t in sim.times]
        round_s = [sum(t.values()) for t in times]
        curve = pooled_curve(sim.history, n_test)
        variants = [{"label": "", "curve": curve, "in_best": True, "final": True}]
        t1 = time.perf_counter()
        if method == "ditto":
            variants[0]["label"] = "personal models"
            variants.append({"label": "global model", "curve": glob, "in_best": True,
                             "final": False})  # fmt: skip
        elif method == "fedbabu":
            last, ep = sim.round_idx, FEDBABU_FINETUNE_EPOCHS
            whole = pfllib_evals.finetuned_accuracy(sim, ep, whole_model=True)
            head = pfllib_evals.finetuned_accuracy(sim, ep, whole_model=False)
            variants = [
                {"label": "init heads, each round", "curve": curve, "in_best": True,
                 "final": False},
                {"label": f"{ep}-epoch whole-model fine-tune (PFLlib)",
                 "curve": [[last, whole]], "in_best": True, "final": True},
                {"label": f"{ep}-epoch head-only fine-tune (our FedBABU)",
                 "curve": [[last, head]], "in_best": False, "final": False},
            ]  # fmt: skip
        end_s = time.perf_counter() - t1
    finally:
        if not kept:
            shutil.rmtree(tmp, ignore_errors=True)
    return {
        "split": job["split"],
        "method": method,
        "rounds": len(round_s),
        "rounds_planned": job["rounds"],
        "minutes": job.get("minutes"),
        "resumed_from": rounds_before,
        "clients": job["clients"],
        "curve": curve,
        "variants": variants,
        **headline(method, variants),
        "n_train": sum(c.num_train for c in fed.clients),
        "n_test": sum(n_test.values()),
        "round_s": round_s,
        "times": times,
        "setup_s": t_build,
        "end_eval_s": end_s,
        "wall": time.perf_counter() - t0,
    }


def jobs_for(args: argparse.Namespace) -> list[dict[str, Any]]:
    jobs = [
        {
            "split": s,
            "method": m,
            "rounds": args.rounds,
            "clients": args.clients,
            "max_samples": args.max_samples,
            "ditto_lam": args.ditto_lam,
            "minutes": args.minutes,
            # a long run keeps its run dir: the next long invocation takes it further
            "run_dir": str(LONG_RUNS / f"{s}-{m}") if args.mode == "long" else None,
        }
        for s in args.splits
        for m in args.methods
    ]

    # split by split (a cut run still has whole splits), the longest jobs first
    def cost(j: dict[str, Any]) -> float:
        return COST.get(j["method"], 1.0) * j["rounds"] + END_COST.get(j["method"], 0.0)

    return sorted(jobs, key=lambda j: (SPLITS.index(j["split"]), -cost(j)))


def run_jobs(jobs: list[dict[str, Any]], workers: int) -> Iterator[dict[str, Any]]:
    """:func:`run_job` of each job as it finishes, from ``workers`` spawned processes with
    one torch thread each (in this process when ``workers`` is 1)."""
    if workers <= 1:
        set_threads(1)
        yield from map(run_job, jobs)
        return
    ctx = get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=set_threads, initargs=(1,)) as ex:
        futures = [ex.submit(run_job, j) for j in jobs]
        from concurrent.futures import as_completed

        for f in as_completed(futures):
            yield f.result()


def _csv(value: str, allowed: Sequence[str], flag: str) -> list[str]:
    items = [v for v in value.split(",") if v]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise SystemExit(f"{flag}: {bad or value!r} not in {list(allowed)}")
    return items


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.pfllib", description=__doc__.split("\n")[0]
    )
    p.add_argument("--full", action="store_true", help=f"PFLlib's {FULL_ROUNDS} rounds")
    p.add_argument("--rounds", type=int, default=None, help=f"default {DEFAULT_ROUNDS}")
    p.add_argument(
        "--minutes", type=float, default=None, help="stop each run after the round past this"
    )
    p.add_argument("--splits", default=",".join(SPLITS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ditto-lam", type=float, default=DITTO_LAM)
    p.add_argument("--clients", type=int, default=20, help="smoke runs only (PFLlib: 20)")
    p.add_argument("--max-samples", type=int, default=None, help="smoke runs only (PFLlib: all)")
    p.add_argument("--render", action="store_true", help="re-write the report from the JSON")
    p.add_argument(
        "--fresh",
        action="store_true",
        help=f"a long run starts over instead of going on from its checkpoint in {LONG_RUNS}",
    )
    args = p.parse_args(argv)
    args.splits = _csv(args.splits, SPLITS, "--splits")
    args.methods = _csv(args.methods, tuple(METHODS), "--methods")
    if args.rounds is None:
        args.rounds = FULL_ROUNDS if args.full else DEFAULT_ROUNDS
    if args.rounds < 1 or args.clients < 1 or args.workers < 1:
        raise SystemExit("--rounds, --clients and --workers must be >= 1")
    if args.minutes is not None and args.minutes <= 0:
        raise SystemExit("--minutes must be > 0")
    if args.fresh and args.render:
        raise SystemExit("--fresh starts runs over; --render only re-writes the report")
    protocol = args.clients == 20 and args.max_samples is None
    by_rounds = {FULL_ROUNDS: "full", DEFAULT_ROUNDS: "default"}
    args.mode = by_rounds.get(args.rounds, "long") if protocol else "smoke"
    return args


def save(out: Any, data: dict[str, Any]) -> dict[str, Any]:
    """Write ``data`` to ``out``; a long run first merges the runs already there (other
    (split, method) pairs kept, the same pair replaced: :func:`merge_runs`). Returns what
    was written."""
    if data["mode"] != "long":
        out.write_text(json.dumps(data, indent=1))
        return data
    return merge_runs(out, data, key=lambda r: (r["split"], r["method"]))


def main(argv: Sequence[str] | None = None, log: Callable[[str], None] | None = None) -> dict:
    from benchmarks import pfllib_report

    args = parse_args(argv)
    say = log or (lambda msg: print(time.strftime("%H:%M:%S"), msg, flush=True))
    out = REPO_ROOT / "runs" / "pfllib" / f"{args.mode}.json"
    if args.render:
        data = json.loads(out.read_text())
    else:
        t0 = time.perf_counter()
        jobs = jobs_for(args)
        for j in jobs:
            if args.fresh and j["run_dir"]:
                shutil.rmtree(j["run_dir"], ignore_errors=True)
        data = {
            "mode": args.mode,
            "rounds": args.rounds,
            "ditto_lam": args.ditto_lam,
            "workers": args.workers,
            "jobs": len(jobs),
            "results": [],
            "complete": False,
            "command": current_command(),
            "machine_start": machine_line(),
            "load": [],  # 1-minute load average at the start and as each run finishes
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        say(f"{len(jobs)} runs, {args.rounds} rounds each, {args.workers} workers ({args.mode})")
        data["load"].append(os.getloadavg()[0])
        for res in run_jobs(jobs, args.workers):
            data["results"].append(res)
            data["load"].append(os.getloadavg()[0])
            data["wall"] = time.perf_counter() - t0
            data["machine"] = machine_line()
            save(out, data)  # a cut run keeps what finished
            per = np.mean(res["round_s"])
            say(
                f"{res['split']}/{res['method']}: best {100 * res['best']:.2f} (round "
                f"{res['best_round']}), final {100 * res['final']:.2f}, {per:.1f} s/round, "
                f"{res['wall'] / 60:.1f} min"
            )
        data["complete"] = True
        data["wall"] = time.perf_counter() - t0
        data["machine"] = machine_line()
        data = save(out, data)
    pfllib_report.write(data)
    return data


if __name__ == "__main__":
    main()
