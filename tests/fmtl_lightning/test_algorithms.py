"""Client algorithms as objects: the registry, config validation derived from it, and the
two algorithms added as one file each (FedBABU, FedAvg+FT), checked against independent
computations."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fmtl_lightning.aggregators.mean as aggregators_mean
from fmtl_lightning.algorithms import (
    ALGORITHMS,
    UNION_HEAD,
    Algorithm,
    AlgorithmError,
    ClientResult,
    ClientRound,
    Phase,
    get_algorithm,
    register,
    unregister,
)
from fmtl_lightning.algorithms.base import head_keys, train_jointly
from fmtl_lightning.clients import ClientPool
from fmtl_lightning.config import ConfigError, parse_config
from fmtl_lightning.engine.seeds import phase_seed
from fmtl_lightning.models import MultiTaskModel, load_arrays, state_arrays
from fmtl_lightning.roles import WidthSpec
from fmtl_lightning.simulation import Simulation
from fmtl_lightning.tasks import get_task
from mobile_client.batching import batch_order

BUILT_IN = ["ditto", "fedavg", "fedavg_ft", "fedbabu", "fedper", "fedrep", "local"]


def _sim(cfg: dict, tmp_path, name: str = "run") -> Simulation:
    return Simulation(parse_config(cfg), tmp_path / name, progress=False)


def _init(sim: Simulation) -> dict[str, np.ndarray]:
    """The run's initial full-width model, rebuilt independently (same seed, same tasks)."""
    torch.manual_seed(sim.cfg.seed)
    return state_arrays(
        MultiTaskModel(sim.engine.plan.model.cfg, sim.engine.plan.layout.model_tasks, 1.0)
    )


def _rows(sim: Simulation, round_no: int) -> dict[tuple[str, str], dict]:
    return {(r["client"], r["task"]): r for r in sim.history if r["round"] == round_no}


def _stored(sim: Simulation) -> tuple[dict, dict]:
    g = {k: v.copy() for k, v in sim.global_state.items()}
    st = {
        c: {k: v.copy() for k, v in {**s.local, **s.personal}.items()}
        for c, s in sim.pool.stores.items()
    }
    return g, st


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---------------------------------------------------------------------- registry
def test_registry_holds_every_algorithm_and_the_config_choices_come_from_it():
    assert sorted(ALGORITHMS) == BUILT_IN
    for name, alg in ALGORITHMS.items():
        assert get_algorithm(name) is alg and alg.name == name
    # derived properties, declared once per algorithm
    assert [n for n, a in ALGORITHMS.items() if a.union_head] == ["fedavg", "fedavg_ft"]
    assert [n for n, a in ALGORITHMS.items() if a.evaluates_personal] == ["local", "ditto"]
    assert [n for n, a in ALGORITHMS.items() if a.edge_clients] == ["fedper"]


def test_unknown_algorithm_errors_name_the_field_and_list_the_registered(small_cfg):
    small_cfg["algorithm"] = {"name": "fedbabuu"}
    with pytest.raises(ConfigError, match=r"^algorithm\.name: 'fedbabuu' is not one of") as e:
        parse_config(small_cfg)
    assert all(repr(n) in str(e.value) for n in BUILT_IN)
    with pytest.raises(AlgorithmError, match=r"^algorithm\.name: 'x' is not a registered") as e2:
        get_algorithm("x")
    assert str(sorted(ALGORITHMS)) in str(e2.value)
    with pytest.raises(AlgorithmError, match="'fedavg' is already registered"):
        register(get_algorithm("fedavg"))


@pytest.mark.parametrize(
    ("alg", "match"),
    [
        ({"name": "fedbabu", "finetune_epochs": -1}, r"^algorithm\.finetune_epochs: must be in"),
        (
            {"name": "fedavg_ft", "finetune_epochs": 1.5},
            r"^config\.algorithm\.finetune_epochs: expected an int",
        ),
    ],
)
def test_finetune_epochs_is_checked_and_named(small_cfg, alg, match):
    small_cfg["algorithm"] = alg
    with pytest.raises(ConfigError, match=match):
        parse_config(small_cfg)


def test_edge_and_label_split_limits_come_from_the_registry(small_cfg):
    edge = dict(small_cfg, algorithm={"name": "fedbabu"})
    edge["clients"] = [dict(small_cfg["clients"][0], edge=True)]
    with pytest.raises(ConfigError, match=r"^clients\[0\]\.edge: edge clients run FedPer "):
        parse_config(edge)
    split = dict(small_cfg, algorithm={"name": "fedbabu", "aggregator": "label_split",
                                       "masked_ce": True})  # fmt: skip
    with pytest.raises(ConfigError, match="algorithm.name fedavg or fedavg_ft"):
        parse_config(split)
    split["algorithm"] = dict(split["algorithm"], name="fedavg_ft")
    assert parse_config(split).algorithm.aggregator.needs_label_masks  # a union head: ok


@dataclasses.dataclass(frozen=True)
class HeadsOnly(Algorithm):
    """A throw-away algorithm: trains the heads only, sends the (untouched) body."""

    name: ClassVar[str] = "test_heads_only"
    title: ClassVar[str] = "HeadsOnly"

    def train(self, cr: ClientRound) -> ClientResult:
        return train_jointly(cr, Phase("head", head_keys(cr)))


@pytest.fixture
def heads_only():
    alg = register(HeadsOnly())
    yield alg
    unregister(alg.name)


def test_an_algorithm_is_its_file_plus_its_registration(small_cfg, tmp_path, heads_only):
    small_cfg["algorithm"] = {"name": "test_heads_only"}
    small_cfg["federation"]["rounds"] = 1
    sim = _sim(small_cfg, tmp_path)
    assert sim.pool.algorithm is heads_only
    init = _init(sim)
    sim.pool.phase_log = {}
    sim.run()
    assert sim.pool.phase_log == {c.cid: ["head"] for c in sim.fed.clients}
    assert set(sim.global_state) == set(sim.shared_keys)
    for k in sim.shared_keys:  # the body did not train: the mean of three copies of init
        np.testing.assert_allclose(sim.global_state[k], init[k], rtol=1e-6, atol=1e-7)
    for cid, st in sim.pool.stores.items():  # every head trained
        assert st.local and all(not np.array_equal(v, init[k]) for k, v in st.local.items()), cid
    unregister(heads_only.name)
    with pytest.raises(ConfigError, match="algorithm.name: 'test_heads_only' is not one of"):
        parse_config(small_cfg)


# ---------------------------------------------------------------------- FedBABU
def test_fedbabu_heads_stay_at_init_only_the_body_trains_and_is_sent(
    small_cfg, tmp_path, monkeypatch
):
    seen: list[set[str]] = []
    real = aggregators_mean.aggregate

    def spy(global_state, updates, spec, **kw):
        seen.extend(set(u.state) for u in updates)
        return real(global_state, updates, spec, **kw)

    monkeypatch.setattr(aggregators_mean, "aggregate", spy)
    small_cfg["algorithm"] = {"name": "fedbabu", "finetune_epochs": 2}
    small_cfg["federation"]["rounds"] = 3
    sim = _sim(small_cfg, tmp_path)
    init = _init(sim)
    heads = set(sim.spec.keys_of_kind("head"))
    sim.pool.phase_log = {}
    sim.run()
    # training: one body phase per round; evaluation: one head fine-tune per round
    assert sim.pool.phase_log == {c.cid: ["body", "finetune"] * 3 for c in sim.fed.clients}
    assert len(seen) == 3 * 3
    for keys in seen:  # only body keys are aggregated (what the spec shares), no head
        assert keys == set(sim.shared_keys) and not keys & heads
    for k in sim.shared_keys:  # the body changed
        assert not np.array_equal(sim.global_state[k], init[k]), k
    for cid, st in sim.pool.stores.items():  # every stored head is still its initialisation
        assert set(st.local) and set(st.local) <= heads
        for k, v in st.local.items():
            np.testing.assert_array_equal(v, init[k], err_msg=f"{cid} {k}")

    # evaluation fine-tuned the heads: the rows differ from the stored model's metrics
    before = _stored(sim)
    rows = _rows(sim, 3)
    for i, c in enumerate(sim.fed.clients):
        m = sim.pool.module_for(c, c.width)
        load_arrays(m.model, sim.client_state(c, sim.engine.eval_width(i, 3)))
        plain = m.evaluate(c.x_test, c.y_test)
        for t, vals in plain.items():
            assert rows[(c.cid, t)]["loss"] != round(vals["loss"], 6), (c.cid, t)
    # re-evaluating gives the same rows (seeded fine-tune) and changes no stored state
    again = sim.evaluate(3)
    assert {(r["client"], r["task"]): r for r in again} == rows
    _assert_same(before[0], sim.global_state)
    for cid, st in sim.pool.stores.items():
        _assert_same(before[1][cid], {**st.local, **st.personal})


def test_fedbabu_finetune_moves_only_the_heads(small_cfg, tmp_path):
    from fmtl_lightning.algorithms import load_for_eval

    small_cfg["algorithm"] = {"name": "fedbabu", "finetune_epochs": 1}
    sim = _sim(small_cfg, tmp_path)
    c = sim.fed.clients[2]
    state = sim.client_state(c, sim.engine.eval_width(2, 1))
    ctx = sim.pool.fit_context(2, c.width, 0)
    assert load_for_eval(sim.pool.algorithm, ctx, state) == Phase("finetune", head_keys(ctx), 1)
    after = state_arrays(ctx.module.model)
    heads = set(sim.spec.keys_of_kind("head"))
    for k, v in state.items():  # the heads moved, nothing else did
        assert np.array_equal(after[k], v) == (k not in heads), k
    assert set(state) & heads


# ---------------------------------------------------------------------- FedAvg+FT
def _hand_finetune_eval(pool: ClientPool, idx: int, state: dict, width: float, round_idx: int):
    """FedAvg+FT by hand: plain torch SGD over the whole union-head model on the client's
    training split (batches of the phase seed), then its test metrics."""
    c = pool.fed.clients[idx]
    model = MultiTaskModel(pool.plan.model.cfg, pool.plan.layout.model_tasks, width)
    with torch.no_grad():
        for k, t in model.state_dict().items():
            t.copy_(torch.from_numpy(np.array(state[k])))
    opt = torch.optim.SGD(model.parameters(), lr=pool.cfg.optimizer.lr)

    def losses(x, ys):
        z = model(x)[UNION_HEAD]
        out = {}
        for t in c.tasks:
            a, b = pool.plan.layout.union_slices[t]
            if get_task(t).kind == "multiclass":
                out[t] = F.cross_entropy(z[:, a:b], ys[t])
            else:
                out[t] = F.binary_cross_entropy_with_logits(z[:, a:b], ys[t])
        return z, out

    f = pool.cfg.federation
    seed = phase_seed(pool.cfg.seed, round_idx, idx, "finetune")
    model.train()
    for bi in batch_order(c.x_train.shape[0], f.batch_size, pool.cfg.algorithm.finetune_epochs,
                          None, seed):  # fmt: skip
        b = torch.from_numpy(bi)
        opt.zero_grad()
        _, ls = losses(c.x_train[b], {t: y[b] for t, y in c.y_train.items()})
        sum(ls.values()).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        z, ls = losses(c.x_test, c.y_test)
    want = {}
    for t in c.tasks:
        a, b = pool.plan.layout.union_slices[t]
        y = c.y_test[t]
        if get_task(t).kind == "multiclass":
            acc = (z[:, a:b].argmax(1) == y).float().mean().item()
        else:
            acc = ((z[:, a:b] > 0).float() == y).float().mean().item()
        want[t] = (float(ls[t]), acc)
    return want


def test_fedavg_ft_evaluation_equals_a_hand_run_finetune_of_the_global_model(small_cfg, tmp_path):
    small_cfg["algorithm"] = {"name": "fedavg_ft", "finetune_epochs": 2}
    sim = _sim(small_cfg, tmp_path)
    sim.run()
    assert sim.shared_keys == tuple(sim.global_state)  # everything is sent (FedAvg)
    rows = _rows(sim, 2)
    for idx, c in enumerate(sim.fed.clients):
        state = sim.client_state(c, sim.engine.eval_width(idx, 2))
        want = _hand_finetune_eval(sim.pool, idx, state, c.width, round_idx=1)
        for t, (loss, acc) in want.items():
            assert rows[(c.cid, t)]["loss"] == pytest.approx(loss, abs=2e-5), (c.cid, t)
            assert rows[(c.cid, t)]["acc"] == pytest.approx(acc, abs=1e-6), (c.cid, t)
    # and it is a fine-tune: without it (plain FedAvg, same run) the numbers differ
    plain = _sim(dict(small_cfg, algorithm={"name": "fedavg"}), tmp_path, "plain")
    plain.run()
    _assert_same(plain.global_state, sim.global_state)  # same training, same server state
    assert _rows(plain, 2) != rows


def test_the_lightning_node_evaluates_fedavg_ft_with_the_same_finetune(small_cfg, tmp_path):
    import yaml

    from fmtl_lightning.config import config_to_dict
    from fmtl_lightning.deploy.lightning_client import LightningNode
    from mobile_client.flower_app import NodeSettings, TrainInstructions

    small_cfg["algorithm"] = {"name": "fedavg_ft", "finetune_epochs": 1}
    cfg = parse_config(small_cfg)
    settings = NodeSettings("c02", 0.5, ("digits/parity", "digits/attrs"), state_dir=tmp_path)
    node = LightningNode(settings, yaml.safe_dump(config_to_dict(cfg)))
    state = node.pool.client_state(node.client, WidthSpec(0.5), node.pool.plan.initial_state)
    assert set(state) == set(node.pool.shared_keys)  # FedAvg-FT shares every key
    ins = TrainInstructions(5, 4, "c02", 2, 0.5, "heterofl", "", 1, 16, 0.1, -1, 0)
    got = node.evaluate(state, ins)  # the aggregated model the server sends to evaluate
    want = _hand_finetune_eval(node.pool, 2, state, 0.5, round_idx=4)
    for t, (loss, acc) in want.items():
        assert got[f"loss/{t}"] == pytest.approx(loss, abs=2e-5), t
        assert got[f"acc/{t}"] == pytest.approx(acc, abs=1e-6), t


@pytest.mark.parametrize("name", ["fedbabu", "fedavg_ft"])
def test_finetuned_metrics_resume_exactly(small_cfg, tmp_path, name):
    from fmtl_lightning.simulation import resume_run, run_config

    small_cfg["algorithm"] = {"name": name, "finetune_epochs": 1}
    cfg = parse_config(small_cfg)
    run_config(cfg, tmp_path / "straight", progress=False)

    def kill(round_no: int) -> None:
        if round_no == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Simulation(cfg, tmp_path / "killed", progress=False).run(on_round=kill)
    resume_run(tmp_path / "killed", progress=False)
    a, b = (tmp_path / d / "metrics.csv" for d in ("straight", "killed"))
    assert a.read_text() == b.read_text() and a.read_text().count("\n") == 1 + 2 * 4
