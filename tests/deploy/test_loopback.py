"""A real Flower deployment on 127.0.0.1: SuperLink + 3 SuperNodes as processes, over TLS.

Two Lightning nodes (widths 1 and 1/2) and one edge node (width 1/4, ONNX Runtime)
train ``examples/flower/fmtl.yaml`` (sklearn digits) for two rounds. Then the server
is started again for a third round (it resumes from its checkpoint), one SuperNode is
killed while it trains, and the round completes without it, recording the failure.
Every process tree is killed in a ``finally``; the test checks none is left.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from fmtl_lightning.checkpoint import completed_rounds, read_history, read_round  # noqa: E402
from fmtl_lightning.config import load_config  # noqa: E402
from fmtl_lightning.deploy.local import LocalDeployment, NodeSpec, alive  # noqa: E402
from fmtl_lightning.deploy.prepare import prepare_edge  # noqa: E402
from fmtl_lightning.engine.plan import server_plan  # noqa: E402

APP = Path(__file__).resolve().parents[2] / "examples" / "flower"
pytestmark = pytest.mark.slow


def _report(run_dir: Path, r: int) -> dict:
    """Round ``r``'s server report, from the run's journal (it outlives pruned rounds)."""
    return read_history(run_dir, r)[r - 1]["report"]


def _wait_for(pred, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def test_loopback_tls_rounds_resume_and_a_node_killed_mid_round(tmp_path):
    t_start = time.monotonic()
    cfg = load_config(APP / "fmtl.yaml")
    plan = server_plan(cfg)
    run_dir = tmp_path / "server_run"
    nodes = {
        "c00": NodeSpec("c00", 1.0, ("digits/digit",), tmp_path / "n_c00"),
        "c01": NodeSpec("c01", 0.5, ("digits/digit",), tmp_path / "n_c01"),
        "c02": NodeSpec("c02", 0.25, ("digits/parity", "digits/ge5"), tmp_path / "n_c02",
                        runtime="edge"),
    }  # fmt: skip
    dep = LocalDeployment(tmp_path / "dep", tls=True)
    seen: set[int] = set()
    out: dict = {}

    def run_in_background(run_config: dict) -> threading.Thread:
        t = threading.Thread(target=lambda: out.update(res=dep.run(APP, run_config, timeout=400)))
        t.start()
        return t

    try:
        link = dep.start_superlink()
        assert "Uvicorn running on https://" in link.log.read_text()  # TLS, not plain HTTP
        dep.start_nodes([nodes["c00"], nodes["c01"]])
        dep.register("c02")  # its key, bound before the run starts; the node joins later
        # the server waits for all three clients; export the edge bundle meanwhile
        runner = run_in_background({"run-dir": str(run_dir), "reply-timeout": 150.0})
        bundle, data = prepare_edge(cfg, "c02", tmp_path / "edge_c02")
        nodes["c02"].bundle, nodes["c02"].data = bundle, data
        dep.start_node(nodes["c02"])
        runner.join(timeout=400)
        assert not runner.is_alive()

        # ---- phase A: two rounds, every node replies
        res = out.pop("res")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert completed_rounds(run_dir) == [2]  # the YAML's retention: the last round
        for r in (1, 2):
            rep = _report(run_dir, r)
            assert sorted(rep["accepted"]) == ["c00", "c01", "c02"], rep
            assert rep["rejected"] == {} and rep["failed"] == {}
            assert [rep["sent"][c]["width"] for c in ("c00", "c01", "c02")] == [1.0, 0.5, 0.25]
            for cid in ("c00", "c01"):  # Lightning nodes score the aggregated model
                assert 0.0 <= rep["evaluated"][cid]["acc/digits/digit"] <= 1.0
            assert rep["not_evaluated"] == {}  # the edge node scores it too (ONNX Runtime)
            assert 0.0 <= rep["evaluated"]["c02"]["acc/digits/parity"] <= 1.0
            assert rep["accepted"]["c02"]["steps"] == 10.0  # edge: 150 examples / 16
            assert np.isfinite(rep["accepted"]["c02"]["loss"])
            down = {c: rep["sent"][c]["bytes_down"] for c in rep["sent"]}
            assert down["c00"] > down["c01"] > down["c02"]  # bytes scale with width
        g2, _, _, _ = read_round(run_dir, 2)
        moved = [k for k in g2 if not np.allclose(g2[k], plan.initial_state[k], atol=1e-4)]
        assert moved, "the global model did not change"

        # heads stay on the nodes, on disk
        assert (nodes["c00"].state_dir / "client.safetensors").is_file()
        assert (nodes["c02"].state_dir / "local.safetensors").is_file()

        # ---- phase B: resume for a third round; c01 hangs in training and is killed
        for p in dep.procs.values():
            p.refresh()
            seen |= p.pids_seen
        dep.kill("node-c01", signal.SIGTERM)
        slow = NodeSpec("c01", 0.5, ("digits/digit",), nodes["c01"].state_dir, delay_s=120.0)
        dep.start_node(slow)
        runner = run_in_background(
            {"run-dir": str(run_dir), "num-rounds": 3, "reply-timeout": 30.0}
        )
        status = slow.state_dir / "status.json"

        def c01_training_round_3() -> bool:
            try:
                s = json.loads(status.read_text())
            except (OSError, ValueError):
                return False
            return s["round"] == 3 and s["phase"] == "training"

        _wait_for(c01_training_round_3, 120, "c01 to start training round 3")
        dep.procs["node-c01"].refresh()
        victim = set(dep.procs["node-c01"].pids_seen)
        assert dep.kill("node-c01", signal.SIGKILL) == []
        assert not any(alive(p) for p in victim)
        # while the server waits out c01: the deployed rounds are the in-process simulator's rounds (edge ~ Lightning, 1e-5)
        from fmtl_lightning.simulation import Simulation

        sim = Simulation(cfg, tmp_path / "sim", progress=False)
        for c in sim.fed.clients:
            c.edge = False
        sim.run_round()
        sim.run_round()
        for k, v in sim.global_state.items():
            np.testing.assert_allclose(g2[k], v, rtol=0, atol=1e-5, err_msg=k)
        runner.join(timeout=300)
        assert not runner.is_alive()
        res = out["res"]
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert completed_rounds(run_dir) == [3]
        rep = _report(run_dir, 3)
        assert sorted(rep["accepted"]) == ["c00", "c02"], rep
        assert list(rep["failed"]) == ["c01"], rep
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["resumed_after"] == 2
        assert summary["per_round"][2]["failed"] == rep["failed"]
        g3, _, _, _ = read_round(run_dir, 3)
        assert any(not np.array_equal(g3[k], g2[k]) for k in g3)
    finally:
        for p in dep.procs.values():
            p.refresh()
            seen |= p.pids_seen
        left = dep.stop()
    assert left == []
    assert not [p for p in seen if alive(p)], "processes left running"
    print(f"loopback deployment test: {time.monotonic() - t_start:.0f} s")


def _two_client_yaml(path: Path, rounds: int = 1) -> Path:
    """examples/flower/fmtl.yaml without its edge client (no export: a fast trial)."""
    import yaml

    raw = yaml.safe_load((APP / "fmtl.yaml").read_text())
    raw["clients"] = raw["clients"][:2]
    raw["federation"]["rounds"] = rounds
    path.write_text(yaml.safe_dump(raw))
    return path


def test_deploy_local_reports_what_fmtl_simulate_reports(tmp_path):
    """``fmtl deploy local`` (real processes, TLS, output to a pipe) prints the table
    ``fmtl simulate`` prints for the same YAML, number for number, and no ANSI codes."""
    import os
    import subprocess
    import sys

    from fmtl_lightning.report import format_table
    from fmtl_lightning.simulation import run_config

    t0 = time.monotonic()
    cfg_path = _two_client_yaml(tmp_path / "two.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "fmtl_lightning.deploy", "local", "--config", str(cfg_path),
         "--out", str(tmp_path / "dl"), "--reply-timeout", "120", "--timeout", "300"],
        capture_output=True, text=True, env=env, timeout=400,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "\x1b" not in res.stdout
    summary = run_config(load_config(cfg_path), tmp_path / "sim", progress=False)
    table = format_table(summary)
    assert table in res.stdout, f"{table}\n---\n{res.stdout[-2000:]}"
    assert "no test accuracy" not in res.stdout
    deployed = json.loads((tmp_path / "dl" / "run" / "summary.json").read_text())
    assert {c: v["acc"] for c, v in deployed["clients"].items()} == {
        c: v["acc"] for c, v in summary["clients"].items()
    }
    print(f"deploy local vs simulate: {time.monotonic() - t0:.0f} s")


def test_node_authentication_binds_each_client_to_its_registered_key(tmp_path):
    """SuperLink with ``--enable-supernode-auth`` over TLS: a node with an unregistered
    key is refused by Flower; c00's registered node trains; a node on c01's registered
    key declaring width 1 (the YAML's 0.5) and a node on another registered key claiming
    c00 are refused by the server, by name."""
    from fmtl_lightning.deploy.cli import write_app
    from fmtl_lightning.deploy.tls import write_node_key

    t0 = time.monotonic()
    app = write_app(_two_client_yaml(tmp_path / "two.yaml"), tmp_path / "app")
    run_dir = tmp_path / "run"
    dep = LocalDeployment(tmp_path / "dep")  # TLS: node authentication on by default
    assert dep.node_auth
    digit = ("digits/digit",)
    seen: set[int] = set()
    try:
        link = dep.start_superlink()
        assert "--enable-supernode-auth" in link.log.read_text().splitlines()[0]
        stranger = write_node_key(tmp_path / "stranger", "s")
        [s] = dep.start_nodes([NodeSpec("c00", 1.0, digit, tmp_path / "n_s", key=stranger.private)],
                              wait=False)  # fmt: skip

        s.refresh()
        thief_key, thief_id = dep.register("c00", bind=False)  # registered, bound to no client
        dep.start_nodes([
            NodeSpec("c00", 1.0, digit, tmp_path / "n_c00"),
            NodeSpec("c01", 1.0, digit, tmp_path / "n_c01"),  # c01's own key, too wide
            NodeSpec("c00", 1.0, digit, tmp_path / "n_thief", key=thief_key),
        ])  # fmt: skip

        def stranger_gone() -> bool:
            s.refresh()
            return s.popen.poll() is not None

        _wait_for(stranger_gone, 60, "the unregistered node to give up")
        assert s.popen.returncode != 0
        assert "Failed to activate SuperNode" in s.log.read_text()
        assert "SuperNode ID" not in s.log.read_text()
        seen |= s.pids_seen
        res = dep.run(app, {"run-dir": str(run_dir), "min-nodes": 1, "node-wait-timeout": 5.0,
                            "reply-timeout": 120.0}, timeout=300)  # fmt: skip
        for p in dep.procs.values():
            p.refresh()
            seen |= p.pids_seen
    finally:
        left = dep.stop()
    assert left == [] and not [p for p in seen if alive(p)]
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    ids = dep.node_ids
    assert summary["nodes"] == {"c00": {"node": ids["c00"], "width": 1.0, "runtime": "lightning"}}
    refused = summary["refused_nodes"]
    assert sorted(refused) == sorted([str(ids["c01"]), str(thief_id)])
    assert "width 1 is wider than the 0.5" in refused[str(ids["c01"])]
    assert (
        f"claims client 'c00', which is bound to the key of node {ids['c00']}"
        in refused[str(thief_id)]
    )
    rep = _report(run_dir, 1)
    assert sorted(rep["accepted"]) == ["c00"] and sorted(rep["evaluated"]) == ["c00"]
    print(f"node authentication loopback: {time.monotonic() - t0:.0f} s")
