"""The server engine on its own (no Lightning, no Flower): sampling, width plan, slices,
reply checks, aggregation, commit/resume, and that it is the only home of that logic."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import numpy as np
import pytest

from fmtl_lightning.aggregation import ClientUpdate, aggregate
from fmtl_lightning.checkpoint import completed_rounds, read_round
from fmtl_lightning.config import ConfigError, parse_config
from fmtl_lightning.engine import ReplyRejected, ServerEngine, server_plan
from fmtl_lightning.engine.seeds import sample_rng, width_rng
from fmtl_lightning.roles import WidthSpec
from fmtl_lightning.slicing import slice_state
from tests.fmtl_lightning.conftest import BASE

ROOT = Path(__file__).resolve().parents[2]


def _cfg(**over):
    raw = copy.deepcopy(BASE)
    raw["clients"] = [{"count": 4, "tasks": ["digits/digit"], "width": 1.0},
                      {"count": 4, "tasks": ["digits/parity"], "width": 0.5},
                      {"count": 2, "tasks": ["digits/digit"], "width": 0.25}]  # fmt: skip
    for k, v in over.items():
        raw.setdefault(k, {}).update(v)
    return parse_config(raw)


@pytest.fixture(scope="module")
def plan():
    return server_plan(_cfg(federation={"fraction": 0.3}))


def _plus(state, d=1.0):
    return {k: v + np.asarray(d, v.dtype) if v.dtype.kind == "f" else v for k, v in state.items()}


def test_sample_is_the_seeded_fraction_of_whoever_is_available(plan, tmp_path):
    eng = ServerEngine(plan, tmp_path)
    for r in range(6):
        got = eng.sample(r)
        want = sorted(int(i) for i in sample_rng(3, r).choice(10, size=3, replace=False))
        assert got == want  # ceil(0.3 * 10) clients, by (seed, round, stream 17)
    # of 7 available nodes: ceil(0.3 * 7) = 3, drawn over the available list
    avail = [0, 2, 3, 5, 6, 8, 9]
    pick = sample_rng(3, 4).choice(7, size=3, replace=False)
    assert eng.sample(4, avail) == sorted(avail[int(i)] for i in pick)
    assert eng.sample(4, []) == []


def test_dynamic_widths_draw_a_level_not_above_the_declared_one(tmp_path):
    cfg = _cfg(algorithm={"width_assignment": "dynamic"})
    eng = ServerEngine(server_plan(cfg), tmp_path)
    levels = [0.25, 0.5, 1.0]
    for idx in range(10):
        for r in range(4):
            cap = eng.plan.clients[idx].width
            allowed = [w for w in levels if w <= cap]
            want = allowed[int(width_rng(3, r, idx).integers(len(allowed)))]
            assert eng.width_of(idx, r) == WidthSpec(want, "heterofl", r)
    # a node declaring a narrower width than planned draws below its declaration
    assert {eng.width_of(0, r, declared=0.25).width for r in range(8)} == {0.25}


def test_assign_slices_the_global_state_to_each_width(plan, tmp_path):
    eng = ServerEngine(plan, tmp_path)
    got = eng.assign(2)
    assert [a.idx for a in got] == eng.sample(2)
    for a in got:
        assert a.ws == WidthSpec(plan.clients[a.idx].width, "heterofl", 2)
        want = slice_state(eng.global_state, plan.spec, a.ws)
        assert set(a.received) == set(plan.shared_keys)
        for k in want:
            np.testing.assert_array_equal(a.received[k], want[k])
    declared = {i: 0.25 for i in range(10)}
    assert {a.ws.width for a in eng.assign(2, None, declared)} == {0.25}


def test_check_update_refuses_wrong_shapes_and_claims_naming_the_client(plan, tmp_path):
    eng = ServerEngine(plan, tmp_path, max_examples=100)
    a = next(a for a in eng.assign(0, [4]))  # a width-0.5 client
    ok = eng.check_update(a, _plus(a.received), 100)
    assert ok.client_id == "c04" and ok.width == a.ws and ok.num_examples == 100
    full = slice_state(eng.global_state, plan.spec, WidthSpec(1.0))
    with pytest.raises(ReplyRejected, match="client 'c04'.*key"):
        eng.check_update(a, full, 10)  # full width from a half-width client
    for n in (0, 101, 3.0, True, "7"):
        with pytest.raises(
            ReplyRejected, match=r"client 'c04': num-examples must be an int in \[1, 100\]"
        ):
            eng.check_update(a, a.received, n)
    bad = dict(a.received)
    k = next(iter(bad))
    bad[k] = np.full_like(bad[k], np.nan)
    with pytest.raises(ReplyRejected, match=f"client 'c04', key '{k}'"):
        eng.check_update(a, bad, 10)
    with pytest.raises(ConfigError, match="max-examples"):
        ServerEngine(plan, tmp_path, max_examples=-1)


def test_aggregate_folds_in_client_order_whatever_the_arrival_order(plan, tmp_path):
    eng = ServerEngine(plan, tmp_path)
    start = copy.deepcopy(eng.global_state)
    ups = [eng.check_update(a, _plus(a.received, 0.1 * (a.idx + 1)), 10 + a.idx)
           for a in eng.assign(0, [0, 4, 8])]  # fmt: skip
    want = aggregate(start, ups, plan.spec, weighting=plan.cfg.algorithm.weighting)
    assert eng.aggregate(list(reversed(ups))) is None
    for k in want:
        np.testing.assert_array_equal(eng.global_state[k], want[k], err_msg=k)
    before = copy.deepcopy(eng.global_state)
    assert eng.aggregate([]) is None  # nobody replied: nothing changes
    for k in before:
        np.testing.assert_array_equal(eng.global_state[k], before[k])


def test_a_non_finite_aggregate_is_reported_and_never_adopted(plan, tmp_path):
    def broken(g, ups, spec, **kw):
        return {k: np.full_like(v, np.nan) for k, v in g.items()}

    broken.needs_label_masks = False  # type: ignore[attr-defined]
    eng = ServerEngine(plan, tmp_path, aggregator=broken)  # type: ignore[arg-type]
    before = copy.deepcopy(eng.global_state)
    a = eng.assign(0, [0])[0]
    why = eng.aggregate([eng.check_update(a, a.received, 5)])
    assert why is not None and "non-finite" in why and "kept" in why
    for k in before:
        np.testing.assert_array_equal(eng.global_state[k], before[k])


def test_commit_then_restore_is_the_same_server(plan, tmp_path):
    eng = ServerEngine(plan, tmp_path / "run")
    eng.write_run_files()
    rows = []
    for r in range(3):
        ups = [eng.check_update(a, _plus(a.received, 0.01), 7) for a in eng.assign(r)]
        assert eng.aggregate(ups) is None
        rows = [{"round": r + 1, "client": "c00", "width": 1.0, "task": "t", "loss": 0.5,
                 "acc": 0.25 * r, "f1": ""}]  # fmt: skip
        eng.commit_round(r + 1, rows, {"note": r}, record={"extra": r})
    assert completed_rounds(tmp_path / "run") == [3]  # the config's retention: keep_last 1
    g, clients, meta, csv = read_round(tmp_path / "run", 3)
    assert meta["round"] == 3 and meta["algorithm"] == "fedper" and meta["note"] == 2
    assert clients == {} and csv.splitlines()[1] == "3,c00,1.0,t,0.5,0.5,"
    again = ServerEngine(plan, tmp_path / "run")
    again.check_same_config()
    assert again.restore() == {} and again.round_idx == 3
    assert [rec["extra"] for rec in again.records] == [0, 1, 2]
    assert [r["acc"] for r in again.history] == [0.0, 0.25, 0.5]
    for k in eng.global_state:
        np.testing.assert_array_equal(again.global_state[k], eng.global_state[k])
    other = ServerEngine(server_plan(_cfg(optimizer={"lr": 0.2})), tmp_path / "run")
    with pytest.raises(ConfigError, match="holds rounds of another config"):
        other.check_same_config()


def test_the_engine_is_the_only_home_of_the_round_logic():
    """Seeded sampling / width draws and checkpoint writes happen only in the engine:
    no transport (simulation, deploy, benchmarks) calls them itself."""
    owners = {"fmtl_lightning/engine", "fmtl_lightning/checkpoint.py"}
    banned = {"sample_rng", "width_rng", "write_round", "append_history", "rounds_to_keep"}
    offenders = []
    for top in ("fmtl_lightning", "export", "mobile_client", "benchmarks"):
        for p in sorted((ROOT / top).rglob("*.py")):
            rel = p.relative_to(ROOT).as_posix()
            if any(rel.startswith(o) for o in owners):
                continue
            for node in ast.walk(ast.parse(p.read_text())):
                name = getattr(node, "id", None) or getattr(node, "attr", None)
                if name in banned:
                    offenders.append(f"{rel}:{node.lineno} {name}")
                # the old magic streams: default_rng([seed, round, ..., 17 / 29])
                if isinstance(node, ast.List) and node.elts and isinstance(node.elts[-1], ast.Constant) \
                        and node.elts[-1].value in (17, 29) and len(node.elts) >= 3:  # fmt: skip
                    offenders.append(f"{rel}:{node.lineno} a [.., {node.elts[-1].value}] seed list")
    assert offenders == []


def test_aggregate_equals_the_pure_function_with_updates_from_replies(plan, tmp_path):
    """What a transport hands the engine (checked replies) aggregates like the pure rule."""
    eng = ServerEngine(plan, tmp_path)
    assigned = eng.assign(1, [1, 5, 9])
    ups = [ClientUpdate(a.client.client_id, _plus(a.received, 0.5), 3, a.ws) for a in assigned]
    want = aggregate(eng.global_state, ups, plan.spec, weighting=plan.cfg.algorithm.weighting)
    checked = [eng.check_update(a, u.state, 3) for a, u in zip(assigned, ups, strict=True)]
    eng.aggregate(checked)
    for k in want:
        np.testing.assert_array_equal(eng.global_state[k], want[k], err_msg=k)
