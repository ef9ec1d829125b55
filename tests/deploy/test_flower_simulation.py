"""The same YAML through Flower's simulation engine (Ray): virtual SuperNodes, our apps.

Skipped unless ``flwr[simulation]`` (Ray) is installed. A SuperLink started with
``--simulation`` runs one virtual node per client of the YAML; each maps its
``partition-id`` to client ``c{partition-id}`` and trains with Lightning. Two rounds
must equal two in-process rounds, and the run's report (every virtual node scoring the
aggregated model) the simulation's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

from fmtl_lightning.checkpoint import completed_rounds, read_round  # noqa: E402
from fmtl_lightning.config import load_config  # noqa: E402
from fmtl_lightning.deploy.local import LocalDeployment, alive  # noqa: E402
from fmtl_lightning.engine.metrics import summarize  # noqa: E402

APP = Path(__file__).resolve().parents[2] / "examples" / "flower"
pytestmark = pytest.mark.slow


def test_flower_simulation_engine_runs_the_yaml_like_the_simulator(tmp_path):
    from fmtl_lightning.simulation import Simulation

    cfg = load_config(APP / "fmtl.yaml")
    run_dir = tmp_path / "run"
    dep = LocalDeployment(tmp_path / "dep", tls=False, simulation=True)
    seen: set[int] = set()
    try:
        dep.start_superlink()
        res = dep.run(APP, {"run-dir": str(run_dir), "reply-timeout": 120.0},
                      timeout=300, num_supernodes=3)  # fmt: skip
        for p in dep.procs.values():
            p.refresh()
            seen |= p.pids_seen
    finally:
        left = dep.stop()
    assert left == [] and not [p for p in seen if alive(p)]
    assert res.returncode == 0 and completed_rounds(run_dir) == [2], res.stdout[-3000:]
    assert sorted((run_dir / "sim_nodes").iterdir()) == [run_dir / "sim_nodes" / c
                                                         for c in ("c00", "c01", "c02")]  # fmt: skip
    sim = Simulation(cfg, tmp_path / "sim", progress=False)
    for c in sim.fed.clients:
        c.edge = False  # virtual nodes train with Lightning
    sim.run_round()
    sim.run_round()
    g2, _, meta, _ = read_round(run_dir, 2)
    assert meta["clients_trained"] == ["c00", "c01", "c02"]
    for k, v in sim.global_state.items():
        np.testing.assert_allclose(g2[k], v, rtol=0, atol=1e-5, err_msg=k)
    # the deployed report means what the simulation's means: every virtual node scored
    # the aggregated model with its own heads, as the simulation scores its clients
    deployed = json.loads((run_dir / "summary.json").read_text())
    want = summarize(sim.history, cfg.algorithm.name, cfg.name)
    assert deployed["not_evaluated"] == {}
    assert {c: v["acc"] for c, v in deployed["clients"].items()} == {
        c: v["acc"] for c, v in want["clients"].items()
    }
