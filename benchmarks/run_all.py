"""Run every ``benchmarks/bench_*.py`` module's ``main()``, in file-name order, then
the modules of :data:`EXTRA` (benchmarks that measure more than time).

Modules are found by glob, so a new benchmark only has to follow the naming
convention. One failing benchmark does not stop the others; the exit status is
non-zero if any failed.
"""

from __future__ import annotations

import importlib
import time
import traceback
from pathlib import Path

# not timings: robustness of the aggregators under attack (about 4 minutes on 1 core)
EXTRA = ("robustness",)


def bench_modules() -> list[str]:
    """Dotted names of all benchmark modules: ``bench_*`` sorted by file name, then EXTRA."""
    here = Path(__file__).resolve().parent
    pkg = __package__ or "benchmarks"
    return [f"{pkg}.{p.stem}" for p in sorted(here.glob("bench_*.py"))] + [
        f"{pkg}.{m}" for m in EXTRA
    ]


def main() -> int:
    failed: list[str] = []
    for name in bench_modules():
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            importlib.import_module(name).main()
        except Exception:  # report and go on with the next benchmark
            traceback.print_exc()
            failed.append(name)
        print(f"== {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
