"""Learning quality on real data: does federated multi-task learning earn its keep?

    python -m benchmarks.accuracy [--quick] [--part 1|2|3] [--full] [--seeds 0,1,2]
                                  [--budget-min N] [--part3-budget-min N] [--workers 2]

* Part 1: a multi-task federation of 20 MNIST + Fashion-MNIST clients (digit, parity,
  ge5, attrs; item, group), ~100 samples each, non-IID; local-only, FedAvg, FedPer,
  FedRep, Ditto (lambda 0.1/1/2) at the same local compute, 3 seeds, widths mixed vs 1;
  then a data sweep (samples per client) for where federation pays.
* Part 2: Flower's HeteroFL MNIST reproduction (100 clients x 600 images, dynamic widths
  1..1/16 or all width 1, IID and 2-class non-IID). ``--full``: the published schedule
  (every client every round, 5 local epochs, 200/400 rounds). Default mode: 10 clients
  sampled per round, 1 local epoch, as many rounds as fit in ``--budget-min`` per setting.
* Part 3: the global model of a width-mix federation vs one that drops every client that
  cannot run width 1, every width's sub-model on the MNIST test set.

Each part writes its own section of BENCHMARKS.md (``accuracy-part1`` .. ``-part3``) and
its plots under docs/benchmarks/, as soon as it finishes. Raw results go to
``runs/accuracy/part{N}-{mode}.json``. Default mode fits about 60 minutes on 2 cores;
``--quick`` is a few-minute smoke version with tiny settings (its sections say so).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from benchmarks.common import REPO_ROOT, machine_line, write_section


def _log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def _save(name: str, data: Any) -> None:
    d = REPO_ROOT / "runs" / "accuracy"
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(json.dumps(data, indent=1, default=str))


def _header(mode: str, seeds: list[int], wall: float) -> str:
    note = (
        "**Quick mode: a smoke run with tiny settings, not a result.** " if mode == "quick" else ""
    )
    return f"{note}Mode: `{mode}` · seeds: {','.join(map(str, seeds))} · wall time: {wall / 60:.1f} min\n\n"


def part1(mode: str, seeds: list[int], workers: int) -> dict[str, Any]:
    from benchmarks import acc_part1
    from benchmarks.common import current_command

    t0 = time.perf_counter()
    results, P = acc_part1.run_part1(
        "quick" if mode == "quick" else "default",
        seeds,
        workers,
        log=_log,
        save=lambda rs: _save(f"part1-{mode}.partial.json", rs),  # survives an interruption
    )
    wall = time.perf_counter() - t0
    data = {
        "params": P,
        "results": results,
        "wall": wall,
        "seeds": seeds,
        "command": current_command(),
        "machine": machine_line(),  # kept, so --render does not restamp it
    }
    _save(f"part1-{mode}.json", data)
    write_part1(data, mode)
    _log(f"part 1 done in {wall / 60:.1f} min; data sweep next")
    t1 = time.perf_counter()
    sweep, P = acc_part1.run_sweep(
        "quick" if mode == "quick" else "default", seeds, workers, log=_log
    )
    swall = time.perf_counter() - t1
    sdata = {
        "params": P,
        "results": sweep,
        "wall": swall,
        "command": current_command(),
        "machine": machine_line(),
    }
    _save(f"part1-sweep-{mode}.json", sdata)
    write_sweep(sdata, mode, seeds)
    _log(f"part 1 data sweep done in {swall / 60:.1f} min")
    return {"wall": wall + swall}


def write_sweep(data: dict[str, Any], mode: str, seeds: list[int]) -> None:
    from benchmarks import acc_part1_report

    acc_part1_report.plot_sweep(data["results"])
    md = _header(mode, seeds, data["wall"]) + acc_part1_report.report_sweep(
        data["results"], data["params"], data["wall"]
    )
    write_section(
        "accuracy-part1-sweep", md, command=data.get("command"), machine=data.get("machine")
    )


def write_part1(data: dict[str, Any], mode: str) -> None:
    from benchmarks import acc_part1_report

    results, P, wall, seeds = data["results"], data["params"], data["wall"], data["seeds"]
    acc_part1_report.plot(results)
    md = _header(mode, seeds, wall) + acc_part1_report.report(results, P, seeds, wall, mode)
    write_section("accuracy-part1", md, command=data.get("command"), machine=data.get("machine"))


PART2_ORDER = ("iid-mix", "shards-mix", "iid-w1", "shards-w1")


def _load(name: str) -> Any:
    f = REPO_ROOT / "runs" / "accuracy" / name
    return json.loads(f.read_text()) if f.exists() else None


def part2(
    mode: str, seeds: list[int], budget_min: float | None, settings: list[str] | None = None
) -> dict[str, Any]:
    """Part 2 settings one after another; the section is rewritten after each one.

    Results of settings not run in this invocation (same mode, from an earlier run's
    ``runs/accuracy/part2-<mode>.json``) stay in the table, with their own command.
    """
    from benchmarks import acc_heterofl as H
    from benchmarks import acc_part2_report as R2
    from benchmarks.common import current_command

    seed = seeds[0]
    if mode == "quick":
        kw = dict(n_clients=10, train_per_client=600, local_epochs=1)
        settings = settings or ["iid-mix", "shards-mix"]
        budget_s, sched = None, {"iid": (2, ()), "shards": (2, ())}
    elif mode == "full":  # Flower's HeteroFL baseline as published
        kw = dict(n_clients=100, train_per_client=600, local_epochs=5)
        settings = settings or ["iid-mix", "shards-mix", "iid-w1"]
        budget_s, sched = None, H.FULL_SCHEDULE
    else:  # same federation, 10 of the 100 clients per round and 1 local epoch
        kw = dict(n_clients=100, train_per_client=600, local_epochs=1, fraction=0.1)
        settings = settings or ["iid-mix", "shards-mix", "iid-w1"]
        budget_s, sched = budget_min * 60, H.FULL_SCHEDULE
    t0 = time.perf_counter()
    for name in settings:
        p, w = name.split("-")
        rounds, milestones = sched[p]
        if mode == "default":  # width-1 rounds cost ~4x a mix round: evaluate more often
            kw["eval_every"] = 5 if w == "mix" else 3
        res = H.run_setting(
            p,
            w,
            mode=mode,
            budget_s=budget_s,
            max_rounds=rounds,
            milestones=milestones if mode == "full" else (),
            seed=seed,
            log=_log,
            **kw,
        )
        res["command"] = current_command()
        res["machine"] = machine_line()
        res["budget_min"] = budget_min if mode == "default" else None
        # read back just before merging: another process may have finished another setting
        saved = {f"{r['partition']}-{r['widths']}": r for r in (_load(f"part2-{mode}.json") or [])}
        saved[name] = res
        results = [saved[k] for k in PART2_ORDER if k in saved]
        _save(f"part2-{mode}.json", results)
        R2.plot_part2(results)
        wall = sum(r["wall"] for r in results)
        md = _header(mode, [seed], wall) + R2.report_part2(
            results, mode, None if mode != "default" else budget_min
        )
        if mode == "quick":
            md += (
                "\n\nQuick mode: 10 clients, 1 local epoch, 2 rounds: far from the published "
                "protocol; only checks the pipeline end to end."
            )
        cmds = sorted({r.get("command", "") for r in results} - {""})
        write_section(
            "accuracy-part2",
            md,
            command=" ; ".join(f"{c}" for c in cmds) or None,
            machine=results[-1].get("machine"),
        )
    _log(f"part 2 done in {(time.perf_counter() - t0) / 60:.1f} min")
    return {}


def part3(mode: str, seeds: list[int], budget_min: float | None) -> dict[str, Any]:
    from benchmarks import acc_part3
    from benchmarks.common import current_command

    seed = seeds[0]
    if mode == "quick":
        kw = dict(per_level=2, train_per_client=300, local_epochs=1, max_rounds=2, budget_s=None)
    elif mode == "full":
        kw = dict(per_level=20, train_per_client=600, local_epochs=5, max_rounds=200, budget_s=None)
    else:
        kw = dict(
            per_level=10,
            train_per_client=300,
            local_epochs=1,
            max_rounds=100,
            budget_s=budget_min * 60,
        )
    res = acc_part3.run_part3(seed=seed, log=_log, **kw)
    res["command"] = current_command()
    res["machine"] = machine_line()
    _save(f"part3-{mode}.json", res)
    write_part3(res, mode)
    _log(f"part 3 done in {res['wall'] / 60:.1f} min")
    return {"wall": res["wall"]}


def write_part3(res: dict[str, Any], mode: str) -> None:
    from benchmarks import acc_part3

    # JSON turns the float width keys into strings
    res["table"] = {a: {float(w): v for w, v in t.items()} for a, t in res["table"].items()}
    acc_part3.plot_part3(res)
    md = _header(mode, [res["seed"]], res["wall"]) + acc_part3.report_part3(res, mode)
    t = res["table"]
    quarter = t["mix"][0.25]
    md += (
        f"\n\nWidth-1/4 sub-model of the mix federation: {100 * quarter:.1f}% "
        f"({'far above' if quarter > 0.1 + 0.5 * 0.9 else 'NOT far above'} the 10% chance "
        f"level; floor used: chance + half the way to 100% = 55%); the same width cut from "
        f"the width-1-only federation: {100 * t['drop'][0.25]:.1f}%."
    )
    write_section("accuracy-part3", md, command=res.get("command"), machine=res.get("machine"))


def render(mode: str, parts: list[int]) -> None:
    """Rewrite the sections (and plots) from saved results, without training."""
    from benchmarks import acc_part2_report as R2

    for p in parts:
        data = _load(f"part{p}-{mode}.json")
        if data is None:
            _log(f"no saved results for part {p} ({mode})")
            continue
        if p == 1:
            write_part1(data, mode)
            sweep = _load(f"part1-sweep-{mode}.json")
            if sweep is not None:
                write_sweep(sweep, mode, data["seeds"])
        elif p == 3:
            write_part3(data, mode)
        else:
            R2.plot_part2(data)
            wall = sum(r["wall"] for r in data)
            md = _header(mode, [data[0]["seed"]], wall) + R2.report_part2(
                data, mode, data[0].get("budget_min")
            )
            cmds = sorted({r.get("command", "") for r in data} - {""})
            write_section(
                "accuracy-part2",
                md,
                command=" ; ".join(cmds) or None,
                machine=data[-1].get("machine"),
            )
        _log(f"part {p} section rewritten from saved results")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="tiny smoke settings (a few minutes)")
    ap.add_argument("--full", action="store_true", help="published HeteroFL schedule (hours)")
    ap.add_argument(
        "--part",
        type=int,
        choices=(1, 2, 3),
        action="append",
        help="run only this part (repeatable); default: all",
    )
    ap.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds (default 0,1,2; quick: 0); parts 2 and 3 use the first",
    )
    ap.add_argument(
        "--budget-min",
        type=float,
        default=9.0,
        help="part 2: wall-time budget per setting in minutes (default 9)",
    )
    ap.add_argument(
        "--part3-budget-min",
        type=float,
        default=7.0,
        help="part 3: wall-time budget in minutes (default 7)",
    )
    ap.add_argument(
        "--settings",
        default=None,
        help="part 2: comma-separated subset of iid-mix,shards-mix,iid-w1,shards-w1 "
        "(default: iid-mix,shards-mix,iid-w1; quick: the two mixes)",
    )
    ap.add_argument(
        "--render",
        action="store_true",
        help="only rewrite the sections and plots from runs/accuracy/*.json",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads for parts 2 and 3")
    ap.add_argument("--workers", type=int, default=2, help="part 1 worker processes")
    args = ap.parse_args(argv)
    if args.quick and args.full:
        ap.error("--quick and --full exclude each other")
    mode = "quick" if args.quick else "full" if args.full else "default"
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    parts = sorted(set(args.part or [1, 2, 3]))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.render:
        render(mode, parts)
        return 0
    t0 = time.perf_counter()
    for p in parts:
        _log(f"part {p} ({mode})")
        if p == 1:
            part1(mode, seeds, args.workers)
        elif p == 2:
            settings = args.settings.split(",") if args.settings else None
            part2(mode, seeds, args.budget_min, settings)
        else:
            part3(mode, seeds, args.part3_budget_min)
    _log(f"all done in {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
