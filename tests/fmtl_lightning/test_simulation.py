"""Each algorithm's defining property, on small real data (sklearn digits / MNIST)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import fmtl_lightning.aggregators.mean as aggregators_mean
from fmtl_lightning.config import parse_config
from fmtl_lightning.engine.seeds import phase_seed
from fmtl_lightning.local_fit import FitPlan, batch_indices, fit
from fmtl_lightning.models import MultiTaskModel, load_arrays
from fmtl_lightning.module import TrainSpec
from fmtl_lightning.simulation import Simulation
from fmtl_lightning.slicing import slice_state


def _sim(cfg: dict, tmp_path, name="run") -> Simulation:
    return Simulation(parse_config(cfg), tmp_path / name, progress=False)


def test_fedper_heads_never_leave_the_client(small_cfg, tmp_path, monkeypatch):
    seen: list[set[str]] = []
    real = aggregators_mean.aggregate  # what the default aggregator (mean) calls

    def spy(global_state, updates, spec, **kw):
        seen.extend(set(u.state) for u in updates)
        return real(global_state, updates, spec, **kw)

    monkeypatch.setattr(aggregators_mean, "aggregate", spy)
    sim = _sim(small_cfg, tmp_path)
    heads_before = {c: dict(s.local) for c, s in sim.pool.stores.items()}
    sim.run()
    assert len(seen) == 2 * 3  # 2 rounds x 3 clients
    backbone = {k for k in sim.spec.keys if k.startswith("backbone.")}
    for keys in seen:
        assert keys == backbone
    assert not any(k.startswith("heads.") for k in sim.global_state)
    # the heads did train, on the client
    for cid, st in sim.pool.stores.items():
        assert st.local and all(k.startswith("heads.") for k in st.local)
        assert any(not np.array_equal(st.local[k], heads_before[cid][k]) for k in st.local)
    # and the server checkpoint holds no head either
    from safetensors.numpy import load_file

    ck = load_file(str(tmp_path / "run/checkpoints/round_0002/global.safetensors"))
    assert set(ck) == backbone


def test_fedrep_trains_head_then_body(small_cfg, tmp_path):
    small_cfg["algorithm"] = {"name": "fedrep", "rep_head_epochs": 2}
    sim = _sim(small_cfg, tmp_path)
    sim.pool.phase_log = {}
    sim.run()
    assert sim.pool.phase_log == {
        c: ["head", "body", "head", "body"] for c in ("c00", "c01", "c02")
    }


def test_train_keys_move_exactly_the_named_parameters(small_cfg, tmp_path):
    sim = _sim(small_cfg, tmp_path)
    c = sim.fed.clients[0]
    local = [k for k in sim.pool.client_keys(c) if sim.spec.role(k) == "local"]
    for moved in (local, list(sim.shared_keys)):
        m = sim.pool.module_for(c, 1.0)
        before = {k: v.detach().clone() for k, v in m.model.state_dict().items()}
        fit(
            sim.pool.fabric, m, c.x_train, c.y_train, FitPlan(16, 1), 0, TrainSpec(frozenset(moved))
        )
        after = m.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before if k not in moved)
        assert all(not torch.equal(before[k], after[k]) for k in moved)


def _personal(sim: Simulation) -> dict[str, dict[str, np.ndarray]]:
    return {c: dict(s.personal) for c, s in sim.pool.stores.items()}


def test_ditto_lambda_zero_equals_local_only(small_cfg, tmp_path):
    local_cfg = copy.deepcopy(small_cfg)
    local_cfg["algorithm"] = {"name": "local"}
    small_cfg["algorithm"] = {"name": "ditto", "lam": 0.0}
    ditto, local = _sim(small_cfg, tmp_path, "d"), _sim(local_cfg, tmp_path, "l")
    sd, sl = ditto.run(), local.run()
    pd, pl = _personal(ditto), _personal(local)
    assert pd.keys() == pl.keys()
    for cid in pd:
        for k in pd[cid]:
            np.testing.assert_allclose(pd[cid][k], pl[cid][k], rtol=0, atol=1e-6, err_msg=k)
    assert sd["clients"] == sl["clients"]
    # and Ditto's global copy did move, so lambda=0 equality is not vacuous
    init = Simulation(parse_config(small_cfg), tmp_path / "x", progress=False).global_state
    assert any(not np.allclose(ditto.global_state[k], init[k]) for k in init)


def test_ditto_large_lambda_approaches_the_global_model(small_cfg, tmp_path):
    dists = {}
    for lam in (0.0, 1.0, 8.0):
        cfg = copy.deepcopy(small_cfg)
        cfg["algorithm"] = {"name": "ditto", "lam": lam}
        cfg["optimizer"]["lr"] = 0.1  # lr * lam <= 0.8 keeps the pull stable
        sim = _sim(cfg, tmp_path, f"lam{lam}")
        sim.run_round()
        anchor = {k: v.copy() for k, v in sim.global_state.items()}  # w_t of the last round
        sim.run_round()
        # distance of each personal model's shared part to the w_t it was pulled toward
        d = 0.0
        for i, c in enumerate(sim.fed.clients):
            ws = sim.engine.width_of(i, 1)
            g = slice_state(anchor, sim.spec, ws)
            p = slice_state(sim.pool.stores[c.cid].personal, sim.spec, ws)
            d += sum(float(np.sum((p[k] - g[k]) ** 2)) for k in sim.shared_keys)
        dists[lam] = d
    assert dists[8.0] < dists[1.0] < dists[0.0]
    # v -> w_t - grad/lambda: the residual shrinks like 1/lambda^2
    assert dists[8.0] < 0.2 * dists[0.0]


def test_per_client_lambda_overrides_config(small_cfg):
    small_cfg["algorithm"] = {"name": "ditto", "lam": 0.5}
    small_cfg["clients"][1]["lam"] = 3.0
    cfg = parse_config(small_cfg)
    assert [g.lam for g in cfg.clients] == [None, 3.0]


def test_one_fedavg_round_matches_hand_rolled_pytorch(small_cfg, tmp_path):
    small_cfg["algorithm"] = {"name": "fedavg", "weighting": "examples"}
    small_cfg["clients"] = [
        {"count": 2, "tasks": ["digits/digit"], "width": 1.0},
        {"count": 1, "tasks": ["digits/parity"], "width": 1.0},
    ]
    small_cfg["federation"]["rounds"] = 1
    sim = _sim(small_cfg, tmp_path)
    g0 = {k: v.copy() for k, v in sim.global_state.items()}
    sim.run()

    # hand-rolled: same init, same batches, plain torch SGD, example-weighted mean
    lr = small_cfg["optimizer"]["lr"]
    sums = {k: np.zeros_like(v, dtype=np.float64) for k, v in g0.items()}
    total = 0
    for i, c in enumerate(sim.fed.clients):
        model = MultiTaskModel(sim.engine.plan.model.cfg, sim.engine.plan.layout.model_tasks, 1.0)
        load_arrays(model, g0)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        seed = phase_seed(sim.cfg.seed, 0, i, "global")
        for idx in batch_indices(c.num_train, FitPlan(16, 1), seed):
            opt.zero_grad()
            union = model(c.x_train[idx])["union"]
            loss = 0
            for t in c.tasks:
                a, b = sim.engine.plan.layout.union_slices[t]
                loss = loss + torch.nn.functional.cross_entropy(union[:, a:b], c.y_train[t][idx])
            loss.backward()
            opt.step()
        for k, v in model.state_dict().items():
            sums[k] += c.num_train * v.detach().numpy().astype(np.float64)
        total += c.num_train
    for k in g0:
        np.testing.assert_allclose(sim.global_state[k], sums[k] / total, rtol=0, atol=1e-5)
    assert any(not np.allclose(sim.global_state[k], g0[k]) for k in g0)


def test_client_sampling_fraction_is_seeded(small_cfg, tmp_path):
    small_cfg["clients"] = [{"count": 10, "tasks": ["digits/digit"], "width": 1.0}]
    small_cfg["data"]["samples_per_client"] = 40
    small_cfg["federation"]["fraction"] = 0.3
    a, b = _sim(small_cfg, tmp_path, "a"), _sim(small_cfg, tmp_path, "b")
    picks = [a.engine.sample(r) for r in range(5)]
    assert picks == [b.engine.sample(r) for r in range(5)]
    assert all(len(p) == 3 for p in picks) and len({tuple(p) for p in picks}) > 1


def test_width_mix_with_fedrolex_and_dynamic_assignment(small_cfg, tmp_path):
    small_cfg["algorithm"] = {
        "name": "fedper",
        "slicing": "fedrolex",
        "width_assignment": "dynamic",
        "dynamic_widths": [1.0, 0.5, 0.25],
    }
    small_cfg["federation"]["rounds"] = 3
    sim = _sim(small_cfg, tmp_path)
    widths = {(i, r): sim.engine.width_of(i, r).width for i in range(3) for r in range(6)}
    assert all(widths[(2, r)] <= 0.5 for r in range(6))  # a width-1/2 client never runs 1
    assert len({widths[(0, r)] for r in range(6)}) > 1  # the draw changes across rounds
    out = sim.run()
    assert set(out["clients"]) == {"c00", "c01", "c02"}
    assert all(0.0 <= c["acc"] <= 1.0 for c in out["clients"].values())


def test_masked_cross_entropy_ignores_absent_classes(small_cfg, tmp_path):
    small_cfg["algorithm"] = {"name": "fedper", "masked_ce": True}
    small_cfg["data"]["partition"] = {"kind": "shards", "classes_per_client": 2}
    small_cfg["clients"] = [{"count": 5, "tasks": ["digits/digit"], "width": 1.0}]
    sim = _sim(small_cfg, tmp_path)
    c = sim.fed.clients[0]
    m = sim.pool.module_for(c, 1.0)
    masks = sim.pool.label_masks(c)
    mask = masks["digits/digit"]
    assert int(mask.sum()) == len(np.unique(c.y_train["digits/digit"].numpy())) <= 2
    z = torch.randn(4, 10)
    y = c.y_train["digits/digit"][:4]
    masked = m.task_losses({"digits/digit": z}, {"digits/digit": y}, masks)["digits/digit"]
    want = torch.nn.functional.cross_entropy(
        z[:, mask], torch.searchsorted(torch.where(mask)[0], y)
    )
    assert torch.allclose(masked, want, atol=1e-5)


def test_eval_every_evaluates_on_schedule_and_after_the_last_round(small_cfg, tmp_path):
    small_cfg["federation"].update(rounds=3, eval_every=2)
    sim = _sim(small_cfg, tmp_path)
    out = sim.run()
    assert sorted({r["round"] for r in sim.history}) == [2, 3]
    assert out["rounds"] == 3 and len(sim.history) == 2 * 4  # 4 (client, task) pairs


def test_a_passed_aggregator_replaces_the_configured_one(small_cfg, tmp_path):
    from fmtl_lightning.aggregators import Median

    small_cfg["algorithm"]["weighting"] = "uniform"
    cfg = parse_config(small_cfg)
    default = Simulation(cfg, tmp_path / "default", progress=False)
    assert default.engine.aggregator is cfg.algorithm.aggregator

    class Recording:
        name, weighted, needs_label_masks = "recording", False, False

        def __init__(self) -> None:
            self.calls: list[tuple[list[str], dict]] = []

        def __call__(self, global_state, updates, spec, *, weighting, row_masks):
            assert (weighting, row_masks) == ("uniform", None)
            out = Median()(global_state, updates, spec)
            self.calls.append(([u.client_id for u in updates], out))
            return out

    rule = Recording()
    sim = Simulation(cfg, tmp_path / "run", progress=False, aggregator=rule)
    sim.run()
    assert [ids for ids, _ in rule.calls] == [["c00", "c01", "c02"]] * 2  # once per round
    assert sim.global_state is rule.calls[-1][1]  # its result is the new global state
    assert type(cfg.algorithm.aggregator).__name__ == "Mean"  # the config is unchanged


def test_set_lr_changes_the_next_fits_step_size_and_refuses_bad_values(small_cfg, tmp_path):
    from fmtl_lightning.config import ConfigError

    small_cfg["federation"]["rounds"] = 1
    sim = Simulation(parse_config(small_cfg), tmp_path / "r", progress=False)
    c = sim.fed.clients[0]
    m = sim.pool.module_for(c, c.width)
    sim.set_lr(0.0125)
    assert sim.cfg.optimizer.lr == 0.0125 and m.lr == 0.0125
    (group,) = m.configure_optimizers().param_groups  # the optimiser the next fit builds
    assert group["lr"] == 0.0125
    assert sim.pool.module_for(sim.fed.clients[2], 0.5).lr == 0.0125  # modules built later too
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="optimizer.lr"):
            sim.set_lr(bad)
    assert sim.cfg.optimizer.lr == 0.0125
