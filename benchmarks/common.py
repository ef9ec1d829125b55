"""What every benchmark shares: a machine description, timing, and BENCHMARKS.md sections.

``BENCHMARKS.md`` is written by several benchmarks; each owns one section
delimited by ``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->`` and replaces
only that section, so re-running one benchmark leaves the others' numbers alone.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import gc
import json
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"

_HEADER = (
    "# Benchmarks\n\n"
    "Written by `make bench` (`python -m benchmarks.run_all`) or by one benchmark "
    "module alone; each section below is owned and rewritten by one `benchmarks/bench_*.py` "
    "and says the command, machine and date that produced it.\n"
)
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (plus family/model when the name is terse)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            key = key.strip()
            if sep and key not in fields:
                fields[key] = value.strip()
            if not line.strip() and fields:
                break  # the first processor is enough
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name", platform.processor() or platform.machine())
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)  # no import: torch stays out of pure-numpy benches
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, str]:
    """CPU, cores usable by this process, memory, Python/numpy/torch versions, date (UTC)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "cpu": cpu_model(),
        "cores": f"{usable} usable of {os.cpu_count()}",
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "torch": _version("torch"),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if hasattr(os, "getloadavg"):  # other work on the machine skews timings: say so
        info["load avg (1/5/15 min)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        kb = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        )
        info["memory"] = f"{kb / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return info


def machine_line(info: dict[str, str] | None = None) -> str:
    """One markdown line describing the machine."""
    m = machine_info() if info is None else info
    return " · ".join(f"{k}: {v}" for k, v in m.items())


def current_command() -> str:
    """The exact command line this process was started with, paths relative to the repo."""
    argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    out = []
    for a in argv:
        p = Path(a)
        if p.is_absolute() and p.is_relative_to(REPO_ROOT):
            a = str(p.relative_to(REPO_ROOT))
        out.append(a)
    return shlex.join(out)


def best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    """Best wall time (s) of ``repeats`` calls; the result of each call is dropped."""
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
        del out
    return best


def best_of_interleaved(
    fns: Mapping[str, Callable[[], object]], repeats: int = 3
) -> dict[str, float]:
    """Best wall time (s) of each function, calling them in turn in every repeat.

    Interleaving spreads load from other processes over all candidates alike, so
    ratios between them are fairer than timing each candidate's repeats in a row.
    """
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], best_of(fn, 1))
    return best


def _markers(name: str) -> tuple[str, str]:
    if not _NAME.fullmatch(name):
        raise ValueError(f"section name must match {_NAME.pattern}, got {name!r}")
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def write_section(
    name: str,
    markdown: str,
    *,
    command: str | None = None,
    path: Path | str | None = None,
    machine: str | None = None,
) -> Path:
    """Replace (or append) section ``name`` of BENCHMARKS.md with ``markdown``.

    The section gets a provenance line with the exact ``command`` (default: this
    process's command line), the machine and the date. Everything outside the
    section's markers is left byte for byte as it was. Returns the file written.
    """
    start, end = _markers(name)
    target = Path(path) if path is not None else BENCHMARKS_MD
    cmd = current_command() if command is None else command
    body = (
        f"{start}\n"
        f"Command: `{cmd}`\n\n"
        f"Machine: {machine_line() if machine is None else machine}\n\n"
        f"{markdown.strip()}\n"
        f"{end}"
    )
    text = target.read_text() if target.exists() else _HEADER
    i, j = text.find(start), text.find(end)
    if i >= 0 and j > i:
        text = text[:i] + body + text[j + len(end) :]
    elif i >= 0 or j >= 0:
        raise ValueError(f"{target}: section {name!r} has only one of its two markers")
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, target)  # readers never see a half-written file
    return target


def merge_runs(
    out: Path,
    data: dict[str, Any],
    key: Callable[[dict[str, Any]], Hashable],
    *,
    same: Sequence[str] = (),
    combine: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write an invocation's ``data`` to the JSON ``out``, merged with the runs earlier
    invocations left there: a run ``data`` redoes (the same ``key``) is replaced, the
    others are kept, and ``commands`` lists every invocation once, in order (a repeated
    command moves to the end). A file whose settings ``same`` differ from ``data``'s is
    replaced whole. ``combine(old, data)`` gives the fields that add up across
    invocations (seeds, wall time). Under a file lock, as invocations may overlap.
    Returns what was written."""
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(out.read_text()) if out.exists() else None
        if old is None or any(old.get(k) != data[k] for k in same):
            merged = {**data, "commands": [data["command"]]}
        else:
            mine = {key(r) for r in data["results"]}
            kept = [r for r in old["results"] if key(r) not in mine]
            earlier = old.get("commands") or [old["command"]]
            merged = {
                **data,
                **(combine(old, data) if combine else {}),
                "results": kept + data["results"],
                "commands": [*(c for c in earlier if c != data["command"]), data["command"]],
            }
        out.write_text(json.dumps(merged, indent=1))
    return merged
