"""The scale benchmark's second engine: the same federation on Flower's simulation engine.

A SuperLink started with ``--simulation`` (Ray, ``flwr[simulation]``) runs N virtual
SuperNodes, each client ``c{partition-id}`` of the YAML, through our ServerApp and
ClientApp (:mod:`fmtl_lightning.deploy`), on ``cpus`` Ray CPUs with one CPU per virtual
node (so ``cpus`` Ray workers train side by side). The YAML is the caller's
(``benchmarks.bench_scale``'s);
the run is stopped once ``rounds`` training rounds are checkpointed, before the evaluation
the ServerApp runs after its last round (``rounds + 1``): a Lightning node is rebuilt per
message, so scoring 1,000 virtual nodes would take as long as 100 training rounds; the
in-process table times its evaluation apart. Measured from outside: the peak of the summed RSS of every
process under the SuperLink (itself, the simulation process that runs the ServerApp, Ray's
GCS/raylet/agents, and the Ray workers that run the ClientApps), with the share of the
``ray::`` processes (ClientApp actors, idle workers, Ray's agents), sampled every 0.2 s; seconds per round from when each round's checkpoint appears.
"""

from __future__ import annotations

import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from fmtl_lightning.checkpoint import completed_rounds

PAGE_KB = 4


def _rss_kb(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB
    except (OSError, IndexError, ValueError):
        return 0


def _cmd(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def _is_ray_worker(cmd: str) -> bool:
    return "default_worker.py" in cmd or cmd.startswith("ray::")


class TreeSampler(threading.Thread):
    """Samples the summed RSS of a process tree (and of its Ray workers) until stopped,
    and when each round of ``run_dir`` completes."""

    def __init__(self, root_pid: int, run_dir: Path, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.run_dir, self.every = root_pid, run_dir, every
        self.peak_kb = self.peak_workers_kb = self.max_workers = 0
        self.round_done: dict[int, float] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        from fmtl_lightning.deploy.local import descendants

        while not self._halt.is_set():
            total = workers = n = 0
            for pid in descendants(self.root_pid):
                kb = _rss_kb(pid)
                total += kb
                if _is_ray_worker(_cmd(pid)):
                    workers, n = workers + kb, n + 1
            self.peak_kb = max(self.peak_kb, total)
            self.peak_workers_kb = max(self.peak_workers_kb, workers)
            self.max_workers = max(self.max_workers, n)
            now = time.perf_counter()
            for r in completed_rounds(self.run_dir):
                self.round_done.setdefault(r, now)
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def measure_flower(
    cfg: dict[str, Any], rounds: int, cpus: int = 2, timeout: float = 1800.0
) -> dict[str, Any]:
    """The run config ``cfg`` (a YAML dict of one client group; more rounds than
    ``rounds`` and no evaluation due before them) on Flower's simulation engine (see the
    module doc)."""
    from fmtl_lightning.deploy.local import BIN, LocalDeployment, kv_string

    n = sum(int(g["count"]) for g in cfg["clients"])
    root = Path(tempfile.mkdtemp(prefix=f"scale-flwr{n}-"))
    yml = root / "scale.yaml"
    yml.write_text(yaml.safe_dump(cfg))
    run_dir = root / "run"
    app = Path(__file__).resolve().parents[1] / "examples" / "flower"
    dep = LocalDeployment(root / "dep", tls=False, simulation=True)
    rc = {"config": str(yml), "run-dir": str(run_dir), "num-rounds": rounds + 1,
          "reply-timeout": 600.0, "node-auth": False}  # fmt: skip
    fed = (f"num-supernodes={n} client-resources-num-cpus=1 init-args-num-cpus={cpus} "
           "init-args-logging-level='ERROR'")  # fmt: skip
    argv = [str(BIN / "flwr"), "run", str(app), "local", "--stream", "--run-config",
            kv_string(rc), "--federation-config", fed]  # fmt: skip
    sampler = flwr = None
    log = root / "flwr-run.log"
    try:
        link = dep.start_superlink()
        sampler = TreeSampler(link.popen.pid, run_dir)
        sampler.start()
        t0 = time.perf_counter()
        with log.open("wb") as fh:
            flwr = subprocess.Popen(argv, env=dep.env, cwd=dep.root, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        while rounds not in sampler.round_done and flwr.poll() is None:
            if time.perf_counter() - t0 > timeout:
                break
            time.sleep(0.2)
        wall = time.perf_counter() - t0
    finally:
        if sampler is not None:
            sampler.stop()
        left = dep.stop()
        if flwr is not None and flwr.poll() is None:
            flwr.terminate()
            flwr.wait(timeout=30)
    done = completed_rounds(run_dir)
    if rounds not in done:
        raise RuntimeError(f"flower simulation of {n} clients stopped after rounds {done}:\n"
                           + log.read_text(errors="replace")[-3000:])  # fmt: skip
    at = sampler.round_done
    gaps = [at[r] - at[r - 1] for r in range(3, rounds + 1) if r in at and r - 1 in at]
    return {
        "clients": n,
        "engine": "flower-sim",
        "first_round_s": round(at[1] - t0, 2) if 1 in at else None,
        "round_s": round(sum(gaps) / len(gaps), 2) if gaps else None,
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(sampler.peak_kb / 1024, 1),
        "ray_workers_peak_mb": round(sampler.peak_workers_kb / 1024, 1),
        "ray_workers": sampler.max_workers,
        "leftover_pids": len(left),
    }
