"""Run every ``benchmarks/bench_*.py`` module's ``main()``, in file-name order.

Modules are found by glob, so a new benchmark only has to follow the naming
convention. One failing benchmark does not stop the others; the exit status is
non-zero if any failed.
"""

from __future__ import annotations

import importlib
import time
import traceback
from pathlib import Path


def bench_modules() -> list[str]:
    """Dotted names of all benchmark modules, sorted by file name."""
    here = Path(__file__).resolve().parent
    return [f"{__package__ or 'benchmarks'}.{p.stem}" for p in sorted(here.glob("bench_*.py"))]


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
