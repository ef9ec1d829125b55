"""kill -9 at random moments: a resumed run equals a straight one, and nothing is left over.

``python -m tests.hostile.kill_sweep N`` runs N kills (seeded) and prints one line per
kill and the counts; the test in this folder runs a few of them in ``make test``.

Each trial starts ``fmtl simulate`` as a real process, SIGKILLs it at a uniformly random
moment of its run (import, setup, training, checkpoint writes, the local-only baseline,
the report), then does what a user would: ``--resume RUN_DIR`` when the run left a
config, else the same command again with ``--overwrite``. The outcome is one of:

* ``identical``: every final array and metrics.csv equal the straight run's;
* ``different``: it finished but differs (a bug);
* ``error``: a command failed (its last stderr line is kept);
* ``leftover``: it finished identically but left temporary files behind.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from safetensors.numpy import load_file

from tests.fmtl_lightning.conftest import BASE

# the tests' small digits federation, with what resume must replay: Ditto's personal
# models, sampled clients, the local-only baseline, several rounds
CONFIG = copy.deepcopy(BASE)
CONFIG.update(name="kill", compare_local=True, algorithm={"name": "ditto", "lam": 0.5})
CONFIG["federation"].update(rounds=8, fraction=0.67)


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fmtl_lightning.cli", "simulate", "--no-progress", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def final_arrays(run_dir: Path) -> dict[str, np.ndarray]:
    """Last checkpoint's arrays (run and baseline), keyed by where they came from."""
    out: dict[str, np.ndarray] = {}
    for part, sub in (("run", run_dir), ("baseline", run_dir / "local_baseline")):
        rounds = sorted((sub / "checkpoints").glob("round_*"))
        ck = rounds[-1]
        for f in [ck / "global.safetensors", *sorted((ck / "clients").glob("*.safetensors"))]:
            out.update({f"{part}/{ck.name}/{f.stem}/{k}": v for k, v in load_file(str(f)).items()})
    return out


def leftovers(run_dir: Path) -> list[str]:
    """Temporary files a finished run must not keep (dot-prefixed staging names, *.tmp)."""
    return sorted(
        str(p.relative_to(run_dir))
        for p in run_dir.rglob("*")
        if (p.name.startswith(".") or p.name.endswith(".tmp")) and "lightning_logs" not in p.parts
    )


def straight_run(work: Path) -> tuple[Path, Path, float]:
    cfg = work / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    ref = work / "straight"
    t0 = time.perf_counter()
    subprocess.run(_cmd("--config", str(cfg), "--run-dir", str(ref)), check=True,
                   capture_output=True, env=_env())  # fmt: skip
    return cfg, ref, time.perf_counter() - t0


def trial(cfg: Path, ref: Path, run_dir: Path, kill_at: float) -> tuple[str, str]:
    """One kill at ``kill_at`` seconds after start; returns (outcome, detail)."""
    proc = subprocess.Popen(_cmd("--config", str(cfg), "--run-dir", str(run_dir)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())  # fmt: skip
    try:
        proc.wait(timeout=kill_at)
        return "error", "finished before the kill"
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    if (run_dir / "config.yaml").exists():
        again = _cmd("--resume", str(run_dir))
    else:
        again = _cmd("--config", str(cfg), "--run-dir", str(run_dir), "--overwrite")
    r = subprocess.run(again, capture_output=True, text=True, env=_env())
    if r.returncode != 0:
        return "error", (r.stderr.strip().splitlines() or ["(no stderr)"])[-1]
    a, b = final_arrays(run_dir), final_arrays(ref)
    if a.keys() != b.keys() or any(not np.array_equal(a[k], b[k]) for k in a):
        return "different", "final arrays differ"
    if (run_dir / "metrics.csv").read_text() != (ref / "metrics.csv").read_text():
        return "different", "metrics.csv differs"
    left = leftovers(run_dir)
    if left:
        return "leftover", ", ".join(left[:3])
    return "identical", ""


def sweep(n: int, seed: int = 0, work: Path | None = None) -> dict[str, list[tuple[float, str]]]:
    """``n`` kills at seeded uniform moments of a straight run's duration."""
    work = Path(tempfile.mkdtemp(prefix="kill_sweep_")) if work is None else work
    cfg, ref, duration = straight_run(work)
    rng = np.random.default_rng(seed)
    out: dict[str, list[tuple[float, str]]] = {}
    for i, t in enumerate(rng.uniform(0.2, duration, size=n)):
        outcome, detail = trial(cfg, ref, work / f"k{i}", float(t))
        out.setdefault(outcome, []).append((float(t), detail))
        print(f"kill {i} at {t:5.2f}/{duration:.2f} s: {outcome} {detail}", flush=True)
    return out


if __name__ == "__main__":
    res = sweep(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
    print({k: len(v) for k, v in res.items()})
