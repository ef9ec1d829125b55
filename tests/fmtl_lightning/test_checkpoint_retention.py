"""Checkpoint retention: which rounds a run keeps, the disk it takes, and exact resume
after a crash at every step of writing a round (history, checkpoint, prune)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

import fmtl_lightning.checkpoint as checkpoint
import fmtl_lightning.engine.core as engine_core
from fmtl_lightning.checkpoint import (
    HISTORY_FILE,
    CheckpointError,
    append_history,
    completed_rounds,
    prune_rounds,
    read_history,
    rounds_to_keep,
)
from fmtl_lightning.config import parse_config
from fmtl_lightning.simulation import Simulation, run_config

ROUNDS = 4


class Killed(BaseException):
    """Stands in for kill -9: nothing after the raise point runs (no cleanup is relied on)."""


def _dir_bytes(d) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def _final_arrays(run_dir) -> dict[str, np.ndarray]:
    ck = checkpoint.round_dir(run_dir, completed_rounds(run_dir)[-1])
    out = {f"global/{k}": v for k, v in load_file(str(ck / "global.safetensors")).items()}
    for f in sorted((ck / "clients").glob("*.safetensors")):
        out.update({f"{f.stem}/{k}": v for k, v in load_file(str(f)).items()})
    return out


def _no_times(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "times"}


@pytest.mark.parametrize(
    "current,keep_last,keep_every,want",
    [
        (10, 1, 0, {10}),
        (10, 3, 0, {8, 9, 10}),
        (10, 1, 4, {4, 8, 10}),
        (10, 2, 3, {3, 6, 9, 10}),
        (5, 1, 1, {1, 2, 3, 4, 5}),
        (2, 5, 0, {1, 2}),
        (0, 1, 0, set()),
    ],
)
def test_rounds_to_keep(current, keep_last, keep_every, want):
    assert rounds_to_keep(current, keep_last, keep_every) == want


def test_prune_removes_unkept_rounds_and_leftovers_only(tmp_path):
    ck = tmp_path / "checkpoints"
    for r in (1, 2, 3, 7):
        (ck / f"round_{r:04d}").mkdir(parents=True)
        (ck / f"round_{r:04d}" / "global.safetensors").write_bytes(b"x")
    (ck / ".round_0004.abc").mkdir()  # a write killed before its rename
    (ck / ".trash.round_0001.xyz" / "round_0001").mkdir(parents=True)  # a killed prune
    (ck / HISTORY_FILE).write_text("{}\n")
    (ck / ".keepme").mkdir()  # not ours: untouched
    assert prune_rounds(ck, {2, 3}) == [1, 7]
    assert sorted(p.name for p in ck.iterdir()) == [
        ".keepme",
        HISTORY_FILE,
        "round_0002",
        "round_0003",
    ]
    assert completed_rounds(tmp_path) == [2, 3]


def test_history_journal_drops_a_torn_line_and_rejects_corruption(tmp_path):
    for r in (1, 2):
        append_history(tmp_path, {"round": r, "rows": [{"acc": 0.5 * r}]}, fresh=r == 1)
    path = tmp_path / "checkpoints" / HISTORY_FILE
    with open(path, "a") as fh:
        fh.write('{"round":3,"ro')  # a kill in the middle of round 3's append
    assert [r["rows"][0]["acc"] for r in read_history(tmp_path, 2)] == [0.5, 1.0]
    with pytest.raises(CheckpointError, match=r"no record of round\(s\) \[3\]"):
        read_history(tmp_path, 3)
    append_history(tmp_path, {"round": 3, "rows": []})  # repairs the torn tail first
    assert path.read_text().count("\n") == 3 and len(read_history(tmp_path, 3)) == 3
    # a record of a round redone after a resume: the newest one wins
    append_history(tmp_path, {"round": 2, "rows": [{"acc": 9.0}]})
    assert read_history(tmp_path, 3)[1]["rows"] == [{"acc": 9.0}]
    path.write_text(path.read_text().replace('{"round":1', "{oops", 1))
    with pytest.raises(CheckpointError, match=f"{HISTORY_FILE}' line 1 is corrupt"):
        read_history(tmp_path, 3)
    append_history(tmp_path, {"round": 1, "rows": []}, fresh=True)  # a new run starts over
    assert path.read_text().count("\n") == 1


@pytest.mark.parametrize(
    "ck,kept",
    [
        ({}, [5]),
        ({"keep_last": 2}, [4, 5]),
        ({"keep_every": 2}, [2, 4, 5]),
        ({"keep_last": 2, "keep_every": 3}, [3, 4, 5]),
        ({"keep_every": 1}, [1, 2, 3, 4, 5]),
    ],
)
def test_run_keeps_the_configured_rounds(small_cfg, tmp_path, ck, kept):
    small_cfg["federation"]["rounds"] = 5
    small_cfg["checkpoints"] = ck
    sim = Simulation(parse_config(small_cfg), tmp_path / "r", progress=False)
    sim.run()
    assert completed_rounds(tmp_path / "r") == kept
    # the history of every round survives pruning: a resume rebuilds all of it
    again = Simulation.resume(tmp_path / "r", progress=False)
    assert again.round_idx == 5 and again.history == sim.history
    assert sorted({r["round"] for r in again.history}) == [1, 2, 3, 4, 5]


def test_run_dir_size_is_bounded_by_the_kept_rounds(small_cfg, tmp_path):
    """Six rounds with the local-only baseline: the checkpoints of one round, not six."""
    small_cfg["federation"]["rounds"] = 6
    small_cfg["model"]["hidden"] = [256, 128]  # about 0.2 MB per model
    small_cfg["compare_local"] = True
    run = tmp_path / "r"
    run_config(small_cfg, run, progress=False)
    assert completed_rounds(run) == [6] and completed_rounds(run / "local_baseline") == [6]
    one_round = _dir_bytes(checkpoint.round_dir(run, 6)) + _dir_bytes(
        checkpoint.round_dir(run / "local_baseline", 6)
    )
    assert one_round > 1_000_000  # 3 baseline clients hold a whole model each
    # everything else (plots, metrics, history, logs, config) is small
    assert _dir_bytes(run) < one_round + 400_000, _dir_bytes(run)


def _crash_after_history(mp, run_dir):
    def write_round(*a, **k):
        raise Killed

    mp.setattr(engine_core, "write_round", write_round)


def _crash_mid_history(mp, run_dir):
    def write_round(*a, **k):  # round 2's history line was only half written
        path = run_dir / "checkpoints" / HISTORY_FILE
        text = path.read_text()
        path.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])
        raise Killed

    mp.setattr(engine_core, "write_round", write_round)


def _crash_before_rename(mp, run_dir):
    real = checkpoint.write_round

    def write_round(run, r, *a, **k):  # every file written, the final rename never happened
        final = real(run, r, *a, **k)
        final.rename(final.with_name(f".{final.name}.tmpabc"))
        raise Killed

    mp.setattr(engine_core, "write_round", write_round)


def _crash_before_prune(mp, run_dir):
    def prune(parent, keep):
        if 2 in keep:
            raise Killed
        return checkpoint.prune_rounds(parent, keep)

    mp.setattr(engine_core, "prune_rounds", prune)


def _crash_mid_prune(mp, run_dir):
    real = shutil.rmtree

    def rmtree(path, *a, **k):  # round 1 renamed to its trash name, then the kill
        if ".trash.round_0001" in str(path):
            raise Killed
        return real(path, *a, **k)

    mp.setattr(checkpoint.shutil, "rmtree", rmtree)


@pytest.mark.parametrize(
    "crash,resumes_after",
    [
        (_crash_after_history, 1),
        (_crash_mid_history, 1),
        (_crash_before_rename, 1),
        (_crash_before_prune, 2),
        (_crash_mid_prune, 2),
    ],
)
def test_crash_while_writing_round_2_resumes_exactly(
    small_cfg, tmp_path, monkeypatch, crash, resumes_after
):
    small_cfg["federation"].update(rounds=ROUNDS, fraction=0.67)  # sampling replays too
    small_cfg["algorithm"] = {"name": "ditto", "lam": 0.5}  # global + personal state resume
    cfg = parse_config(small_cfg)
    straight = Simulation(cfg, tmp_path / "straight", progress=False)
    want = straight.run()

    run = tmp_path / "killed"
    sim = Simulation(cfg, run, progress=False)
    with monkeypatch.context() as mp, pytest.raises(Killed):
        sim.run(on_round=lambda r: crash(mp, run) if r == 1 else None)  # round 2 is killed
    assert completed_rounds(run)[-1] == resumes_after

    again = Simulation.resume(run, progress=False)
    assert again.round_idx == resumes_after
    got = again.run()
    assert _no_times(got) == _no_times(want)
    assert (run / "metrics.csv").read_text() == (tmp_path / "straight" / "metrics.csv").read_text()
    a, b = _final_arrays(run), _final_arrays(tmp_path / "straight")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # nothing left over: the last round and the history, as in the straight run
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        HISTORY_FILE,
        f"round_{ROUNDS:04d}",
    ]
    lines = (run / "checkpoints" / HISTORY_FILE).read_text().splitlines()
    assert sorted({json.loads(x)["round"] for x in lines}) == list(range(1, ROUNDS + 1))


def test_unchanged_clients_files_carry_over_as_links(small_cfg, tmp_path):
    """With a fraction of the clients training each round, a round's checkpoint writes
    only the clients whose state changed; the others' files are the previous round's
    (same inode), and every round still reads back as each client's full state."""
    import os

    from fmtl_lightning.checkpoint import read_round, round_dir
    from fmtl_lightning.config import parse_config
    from fmtl_lightning.simulation import Simulation

    small_cfg["clients"] = [{"count": 4, "tasks": ["digits/digit"], "width": 1.0}]
    small_cfg["federation"].update(rounds=3, fraction=0.5)
    small_cfg["checkpoints"] = {"keep_last": 3}
    sim = Simulation(parse_config(small_cfg), tmp_path / "run", progress=False)
    trained, states = [], []
    for _ in range(3):
        trained.append(set(sim.run_round()["clients"]))
        states.append({cid: st.to_arrays() for cid, st in sim.pool.stores.items()})
    assert all(len(t) == 2 for t in trained)
    for r in (2, 3):
        for cid in sim.pool.stores:
            prev = round_dir(tmp_path / "run", r - 1) / "clients" / f"{cid}.safetensors"
            now = round_dir(tmp_path / "run", r) / "clients" / f"{cid}.safetensors"
            assert (os.stat(now).st_ino == os.stat(prev).st_ino) == (cid not in trained[r - 1])
        _, clients, _, _ = read_round(tmp_path / "run", r)
        assert clients.keys() == states[r - 1].keys()
        for cid, arrays in states[r - 1].items():
            for k, v in arrays.items():
                np.testing.assert_array_equal(clients[cid][k], v, err_msg=f"{r} {cid} {k}")
