"""The hostile sweep: seeded mutations of valid inputs, fed to the real entry points.

``python -m tests.hostile.sweep [--n N] [--seed S] [--surface NAME ...] [--kill K]``
generates N hostile inputs per surface, classifies each (:mod:`tests.hostile.core`:
ok, refused, accepted_wrongly, traceback, silently_wrong, valid_refused), prints a
table of counts per surface and outcome and then every case that is neither ok nor
refused, and exits 1 if there is any. ``--kill K`` adds K kill -9 trials
(:mod:`tests.hostile.kill_sweep`: identical -> ok, different -> silently_wrong,
error -> traceback, leftover -> silently_wrong).

Surfaces (one module each): update files (:mod:`~tests.hostile.surface_updates`),
Flower replies (:mod:`~tests.hostile.surface_replies`), fmtl-edge inputs and bundles
(:mod:`~tests.hostile.surface_edge`), configs (:mod:`~tests.hostile.surface_configs`).
Mutations are visited in a seeded order, each kind once before any twice, so a small
N still covers a random subset of kinds and N >= the number of kinds covers all.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tests.hostile.core import BAD, OUTCOMES, Case, judge_exception, names_something

SURFACES = ("updates", "replies", "edge", "configs")


def surface_class(name: str) -> type:
    if name == "updates":
        from tests.hostile.surface_updates import UpdateSurface

        return UpdateSurface
    if name == "replies":
        from tests.hostile.surface_replies import ReplySurface

        return ReplySurface
    if name == "edge":
        from tests.hostile.surface_edge import EdgeSurface

        return EdgeSurface
    if name == "configs":
        from tests.hostile.surface_configs import ConfigSurface

        return ConfigSurface
    raise ValueError(f"unknown surface {name!r}; surfaces: {', '.join(SURFACES)}")


def order(n: int, kinds: int, seed: int, si: int) -> list[int]:
    """Mutation indices for ``n`` cases: seeded permutations, one after another."""
    out: list[int] = []
    cycle = 0
    while len(out) < n:
        out += [int(i) for i in np.random.default_rng([seed, si, 10**6 + cycle]).permutation(kinds)]
        cycle += 1
    return out[:n]


def run_surface(
    name: str, n: int, seed: int, work: Path, log: Callable[[str], None] = print, **kw: object
) -> list[Case]:
    si = SURFACES.index(name)
    t0 = time.perf_counter()
    surface = surface_class(name)(work / name, **kw)
    log(f"[{surface.name}] set up in {time.perf_counter() - t0:.1f} s")
    cases = []
    muts = surface.mutations
    for i, m in enumerate(order(n, len(muts), seed, si)):
        mut = muts[m]
        rng = np.random.default_rng([seed, si, i])
        try:
            case = surface.run(mut, rng, i)
        except Exception as exc:  # noqa: BLE001 - a harness bug is reported, not hidden
            _, detail = judge_exception(exc)
            case = Case(surface.name, mut.name, "traceback", f"sweep harness: {detail}")
        cases.append(case)
        if case.outcome in BAD:
            log(f"  {case.outcome}: {case.mutation}: {case.detail}")
    finish = getattr(surface, "finish", None)
    if finish is not None:
        cases += finish(log)
    log(f"[{surface.name}] {n} inputs in {time.perf_counter() - t0:.1f} s")
    return cases


def kill_cases(k: int, seed: int, work: Path, log: Callable[[str], None] = print) -> list[Case]:
    from tests.hostile.kill_sweep import sweep

    to = {
        "identical": "ok",
        "different": "silently_wrong",
        "error": "traceback",
        "leftover": "silently_wrong",
    }
    work.mkdir(parents=True, exist_ok=True)
    res = sweep(k, seed=seed, work=work)
    out = []
    for o, v in res.items():
        for t, d in v:
            # a run that finished before its kill moment (timing varies) was not killed
            outcome = "ok" if d == "finished before the kill" else to[o]
            out.append(Case("kill -9", f"kill at {t:.2f} s", outcome, d))
    return out


def sweep(
    n: int,
    seed: int = 0,
    surfaces: Sequence[str] = SURFACES,
    work: Path | None = None,
    kill: int = 0,
    log: Callable[[str], None] = print,
    **kw: object,
) -> dict[str, list[Case]]:
    """Run every surface; returns cases per surface name."""
    work = Path(tempfile.mkdtemp(prefix="hostile_sweep_")) if work is None else work
    out: dict[str, list[Case]] = {}
    quiet = logging.getLogger("flwr")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # the strategy logs each rejection: counted here instead
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in surfaces:
                cases = run_surface(name, n, seed, work, log, **kw)
                out[cases[0].surface if cases else name] = cases
            if kill:
                out["kill -9"] = kill_cases(kill, seed, work / "kill", log)
    finally:
        quiet.setLevel(level)
    return out


def counts(cases: list[Case]) -> dict[str, int]:
    return {o: sum(c.outcome == o for c in cases) for o in OUTCOMES}


def table(results: dict[str, list[Case]]) -> str:
    w = max(len(s) for s in [*results, "surface"]) + 2
    lines = ["surface".ljust(w) + "".join(f"{o:>18}" for o in ("total", *OUTCOMES))]
    for s, cases in results.items():
        c = counts(cases)
        lines.append(s.ljust(w) + f"{len(cases):>18}" + "".join(f"{c[o]:>18}" for o in OUTCOMES))
    return "\n".join(lines)


def failures(results: dict[str, list[Case]]) -> list[Case]:
    return [c for cases in results.values() for c in cases if c.outcome in BAD]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.hostile.sweep", description=__doc__.split("\n")[0]
    )
    p.add_argument("--n", type=int, default=200, help="hostile inputs per surface (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--surface", action="append", choices=SURFACES, help="only these surfaces")
    p.add_argument("--kill", type=int, default=0, help="also this many kill -9 trials")
    p.add_argument(
        "--runs",
        type=int,
        default=5,
        help="accepted mutated configs actually run for one round (default 5)",
    )
    p.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    res = sweep(args.n, args.seed, args.surface or SURFACES, args.work, args.kill, runs=args.runs)
    bad = failures(res)
    print(
        f"\nhostile sweep: seed {args.seed}, n {args.n} per surface, "
        f"{time.perf_counter() - t0:.0f} s\n"
    )
    print(table(res))
    vague = [c for cs in res.values() for c in cs if c.outcome == "refused"
             and not names_something(c.detail)]  # fmt: skip
    if vague:
        print(f"\n{len(vague)} refusal(s) whose message names no key, field, option or file:")
        for c in vague:
            print(f"  [{c.surface}] {c.mutation}: {c.detail}")
    if bad:
        print(f"\n{len(bad)} case(s) neither ok nor refused, grouped by what went wrong:")
        for (surface, outcome, _), group in grouped(bad).items():
            muts = sorted({c.mutation.split(" [")[0] for c in group})
            print(f"\n  [{surface}] {outcome} x{len(group)}: {group[0].detail}")
            print(
                f"    mutations ({len(muts)}): {'; '.join(muts[:8])}{' ...' if len(muts) > 8 else ''}"
            )
            print(f"    e.g. {group[0].mutation}")
    return 1 if bad else 0


def grouped(cases: list[Case]) -> dict[tuple[str, str, str], list[Case]]:
    """Cases with the same surface, outcome and detail up to paths, numbers and client ids."""
    out: dict[tuple[str, str, str], list[Case]] = {}
    for c in cases:
        sig = re.sub(r"/\S+|'c\d\d'|-?\d+(\.\d+)?(e[-+]?\d+)?", "#", c.detail)
        out.setdefault((c.surface, c.outcome, sig), []).append(c)
    return out


if __name__ == "__main__":
    sys.exit(main())
