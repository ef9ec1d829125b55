"""Deployed rounds survive failures: real processes on 127.0.0.1 (TLS, node authentication).

Six edge nodes (ONNX Runtime) train a tiny FedPer config for two rounds. When the
first node starts training, two other nodes are slowed 5x from outside (a
SIGSTOP/SIGCONT duty cycle, :class:`benchmarks.bench_failures.Throttle`) and two
(about 30%) are SIGKILLed with their children at random moments of the run.

Checked: every round completes and its record accounts for every client sent work
(accepted, or failed: dead or past the deadline); a dead node's client is never
accepted after it died and is named as missing at the evaluation; late replies are
recorded and never aggregated; the rounds' global states are recomputed from the
previous round's checkpoint and the round's record (each accepted client's training
replayed in-process on the same bundle and data, aggregated by the server engine) to
1e-7 (round 1 always; a later round unless it accepts a client whose earlier training
the record cannot tell: see ``_recompute``), and resuming the run dir picks up the
final state; the edge nodes' test accuracy
equals the in-process score of the same weights, and the deploy report prints it. No
timed assertion: whether a slowed node makes a deadline is left free.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from benchmarks.bench_failures import (  # noqa: E402
    Faults,
    export_edge_files,
    failure_config,
    pick_faults,
    start_fleet,
)
from fmtl_lightning.checkpoint import read_history, read_round  # noqa: E402

pytestmark = pytest.mark.slow
REPLY_TIMEOUT = 30.0  # a loaded 2-core machine starts 6 ClientApp processes at once
SEED = 1


def _late_replies(fleet, rounds: int) -> set[tuple[str, int]]:
    """(client, round) of every reply that came after its round's deadline."""
    summary = json.loads((fleet.run_dir / "summary.json").read_text())
    keys = [k for rec in read_history(fleet.run_dir, rounds) for k, v in rec["report"]["late"].items()
            if "a reply" in v]  # fmt: skip
    keys += [k for k, v in summary["late_after_last_round"].items() if "a reply" in v]
    return {(k.split(" (round ")[0], int(k.split(" (round ")[1].rstrip(")"))) for k in keys}


def _recompute(fleet, rounds: int) -> list[dict[str, np.ndarray] | None]:
    """Every round's global state from the previous round's checkpoint (the initial
    state for round 1) and the round's record: each accepted client's training replayed
    on its bundle, aggregated by a fresh server engine. A device's heads (FedPer: local)
    change in every round it trains; once a client was sent work and not accepted (late,
    or its reply never came), whether and when it trained is not in the record, so a
    round that accepts it is not recomputed (None). Round 1 always is: every device
    starts from its bundle's heads."""
    from fmtl_lightning.aggregation.update import ClientUpdate
    from fmtl_lightning.engine import ServerEngine, server_plan
    from fmtl_lightning.engine.seeds import phase_seed
    from fmtl_lightning.slicing import slice_state
    from mobile_client.inputs import read_client_data
    from mobile_client.runtime import EdgeClient

    cfg = fleet.cfg
    plan = server_plan(cfg)
    f = cfg.federation
    heads: dict[str, Path] = {}
    unknown: set[str] = set()  # clients whose heads the record cannot tell
    out: list[dict[str, np.ndarray] | None] = []
    for r, rec in enumerate(read_history(fleet.run_dir, rounds), 1):
        rep = rec["report"]
        if set(rep["accepted"]) & unknown:
            out.append(None)
            unknown |= set(rep["sent"])
            continue
        engine = ServerEngine(plan, fleet.run_dir.parent / "recompute")
        if r > 1:
            engine.global_state = read_round(fleet.run_dir, r - 1)[0]
        start = dict(engine.global_state)
        updates = []
        for cid in sorted(rep["accepted"]):
            idx = plan.client(cid).idx
            ws = engine.width_of(idx, r - 1)
            ec = EdgeClient(fleet.bundle, cid)
            if cid in heads:
                ec.load_local(heads[cid])
            x, ys = read_client_data(fleet.data[cid], plan.client(cid).tasks)
            res = ec.train(x, ys, width=ws.width, epochs=f.local_epochs, batch_size=f.batch_size,
                           lr=cfg.optimizer.lr, steps=f.local_steps,
                           seed=phase_seed(cfg.seed, r - 1, idx, "global"),
                           start_from=slice_state(start, plan.spec, ws))  # fmt: skip
            heads[cid] = ec.save_local(fleet.run_dir.parent / f"replay_{cid}_{r}.safetensors")
            assert res.num_examples == rep["accepted"][cid]["num_examples"]
            updates.append(ClientUpdate(cid, res.shared, res.num_examples, ws))
        unknown |= set(rep["sent"]) - set(rep["accepted"])
        assert engine.aggregate(updates) is None
        out.append(engine.global_state)
    return out


def test_rounds_complete_and_reproduce_with_nodes_killed_and_slowed(tmp_path):
    from fmtl_lightning.config import load_config
    from fmtl_lightning.deploy.cli import deploy_report
    from fmtl_lightning.deploy.local import alive
    from fmtl_lightning.deploy.server_app import DeployedRun
    from fmtl_lightning.engine import server_plan
    from fmtl_lightning.roles import WidthSpec
    from fmtl_lightning.slicing import slice_state
    from mobile_client.edge_scoring import EdgeScorer
    from mobile_client.inputs import read_npz
    from mobile_client.runtime import EdgeClient

    t_start = time.monotonic()
    rounds = 2
    raw = failure_config(rounds=rounds, eval_every=rounds)
    files = export_edge_files(raw, tmp_path / "files")
    fleet = start_fleet(raw, tmp_path / "fleet", files)
    clients = sorted(fleet.nodes)
    rng = random.Random(SEED)
    victims, slowed = pick_faults(clients, rng)
    alive_ids = [c for c in clients if c not in victims]
    seen: set[int] = set()
    faults = Faults(fleet, victims, slowed, 1.5 * REPLY_TIMEOUT, rng)
    try:
        for p in fleet.dep.procs.values():
            p.refresh()
            seen |= p.pids_seen
        faults.start()
        fleet.run(**{"reply-timeout": REPLY_TIMEOUT})
        faults.join(timeout=60)
        for p in fleet.dep.procs.values():
            p.refresh()
            seen |= p.pids_seen
    finally:
        faults.stop()
        left = fleet.stop()
    assert left == [] and not [p for p in seen if alive(p)], "processes left running"
    assert [k.left for k in faults.kills] == [[], []]
    assert len(fleet.throttles) == 2

    recs = read_history(fleet.run_dir, rounds)
    assert [r["round"] for r in recs] == list(range(1, rounds + 1))  # every round completed
    died = {k.client: k.at_status for k in faults.kills}
    summary = json.loads((fleet.run_dir / "summary.json").read_text())
    for rec in recs:
        rep, r = rec["report"], rec["round"]
        assert rep["rejected"] == {} and rep["not_aggregated"] == ""
        assert set(rep["sent"]) == set(rep["accepted"]) | set(rep["failed"]), rep
        for cid, st in died.items():
            # killed in round k (its status then): never accepted after it, nor in round
            # k if it was still training; named failed while the server still sent to it
            k = st.get("round", 0)
            if r > k or (r == k and st.get("phase") == "training"):
                assert cid not in rep["accepted"], (r, cid, st, rep)
                assert cid in rep["failed"] or cid not in rep["sent"], (r, cid, rep)
    for cid, q in _late_replies(fleet, rounds):  # recorded, never aggregated
        assert (
            cid in recs[q - 1]["report"]["failed"] and cid not in recs[q - 1]["report"]["accepted"]
        )

    # ---- every round's state from the saved round files; resuming picks up the last
    again = _recompute(fleet, rounds)
    assert again[0] is not None
    for r, g in enumerate(again, 1):
        if g is None:
            continue
        saved = read_round(fleet.run_dir, r)[0]
        assert saved.keys() == g.keys()
        for k in saved:
            np.testing.assert_allclose(g[k], saved[k], rtol=0, atol=1e-7, err_msg=f"round {r} {k}")
    resumed = DeployedRun(load_config(fleet.app / "fmtl.yaml"), fleet.run_dir, reply_timeout=1.0)
    assert resumed.start_round == rounds
    final = read_round(fleet.run_dir, rounds)[0]
    for k, v in final.items():
        np.testing.assert_array_equal(resumed.engine.global_state[k], v)

    # ---- the edge nodes' accuracy: the in-process score of the same weights
    last = recs[-1]["report"]
    spec = server_plan(fleet.cfg).spec
    assert set(last["evaluated"]) | set(last["not_evaluated"]) <= set(clients)
    healthy = [c for c in alive_ids if c not in slowed]
    assert set(healthy) <= set(last["evaluated"]), last["not_evaluated"]
    for cid in sorted(last["evaluated"]):
        ec = EdgeClient(fleet.bundle, cid)
        ec.load_local(fleet.nodes[cid].state_dir / "local.safetensors")
        sent = slice_state(final, spec, WidthSpec(1.0, fleet.cfg.algorithm.slicing, rounds - 1))
        arrays = read_npz(fleet.data[cid], ["x_test", "y_test__digits__digit"])
        ref = EdgeScorer(ec).score(ec.start_state(sent), arrays["x_test"],
                                   {"digits/digit": arrays["y_test__digits__digit"]})  # fmt: skip
        got = last["evaluated"][cid]["acc/digits/digit"]
        assert got == pytest.approx(ref["acc/digits/digit"], abs=1e-6), cid
        assert summary["clients"][cid]["acc"] == pytest.approx(got, abs=1e-6)
    for cid in victims:  # dead: missing at the evaluation, with the reason
        assert cid not in summary["clients"] and cid in summary["not_evaluated"]
    text = deploy_report(summary)
    for cid in sorted(last["evaluated"]):
        assert f"{cid}" in text
    for cid in victims:
        assert f"{cid}: no test accuracy" in text
    checked = [r for r, g in enumerate(again, 1) if g is not None]
    print(f"failure test: {time.monotonic() - t_start:.0f} s; killed {died}, slowed {slowed}, "
          f"rounds recomputed {checked}")  # fmt: skip
