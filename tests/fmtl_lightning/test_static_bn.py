"""Static batch norm (HeteroFL's sBN): statistics pass, batch independence, resume, export."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fmtl_lightning.config import ConfigError, parse_config
from fmtl_lightning.models import BackboneConfig, MultiTaskModel, load_arrays, model_spec
from fmtl_lightning.roles import WidthSpec
from fmtl_lightning.simulation import Simulation

HIDDEN = [4, 6]


def _cfg(small_cfg: dict, **algorithm) -> dict:
    cfg = copy.deepcopy(small_cfg)
    cfg["model"] = {"family": "cnn", "hidden": HIDDEN, "norm": "static_batch", "scaler": True}
    cfg["algorithm"] = {"name": "fedper", **algorithm}
    return cfg


def _sim(cfg: dict, run_dir) -> Simulation:
    return Simulation(parse_config(cfg), run_dir, progress=False)


def _deployed(sim: Simulation, c) -> dict[str, np.ndarray]:
    """The state client ``c`` is evaluated and exported with after the last round."""
    return sim.client_state(c, WidthSpec(c.width, sim.cfg.algorithm.slicing, sim.round_idx - 1))


# ------------------------------------------------------------------ independent numpy reference
def _conv3x3(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, Cin, H, W) * (Cout, Cin, 3, 3) with padding 1, in float64 numpy."""
    n, _, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd))
    for i in range(3):
        for j in range(3):
            out += np.einsum("nchw,oc->nohw", xp[:, :, i : i + h, j : j + wd], w[:, :, i, j])
    return out + b[None, :, None, None]


def _numpy_stats(state: dict[str, np.ndarray], x: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel mean / population variance at each static BN input of the
    ``cnn`` backbone with the scaler (conv -> scaler (identity in eval) -> sBN -> ReLU
    -> 2x2 max-pool), every earlier sBN normalising with its own statistics."""
    out = {}
    a = x.astype(np.float64)
    n_blocks = len(HIDDEN)
    for i in range(n_blocks):
        conv, bn = f"backbone.layers.{5 * i}", f"backbone.layers.{5 * i + 2}"
        a = _conv3x3(a, state[f"{conv}.weight"], state[f"{conv}.bias"])
        mean, var = a.mean(axis=(0, 2, 3)), a.var(axis=(0, 2, 3))
        out[f"{bn}.running_mean"], out[f"{bn}.running_var"] = mean, var
        a = (a - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5)
        a = (
            a * state[f"{bn}.weight"][None, :, None, None]
            + state[f"{bn}.bias"][None, :, None, None]
        )
        a = np.maximum(a, 0)
        if i < n_blocks - 1:
            n, c, h, w = a.shape
            a = a[:, :, : h // 2 * 2, : w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2).max((3, 5))
    return out


# ------------------------------------------------------------------ (b) statistics
def test_stats_pass_equals_numpy_mean_and_variance_over_the_data():
    from fmtl_lightning.static_bn import compute_static_stats

    cfg = BackboneConfig("cnn", image_size=8, hidden=tuple(HIDDEN), norm="static_batch",
                         scaler=True)  # fmt: skip
    torch.manual_seed(0)
    model = MultiTaskModel(cfg, {"t": 3}, 1.0)
    with torch.no_grad():  # non-trivial affine parameters
        for v in model.parameters():
            v.add_(0.3 * torch.randn_like(v))
    x = torch.randn(37, 1, 8, 8) * 2 + 0.5
    got = compute_static_stats(model, x, chunk=10)  # 4 chunks, the last one short
    state = {k: v.double().numpy() for k, v in model.state_dict().items()}
    want = _numpy_stats(state, x.numpy())
    spec = model_spec(cfg, {"t": 3})
    assert set(got) == set(want) == set(spec.keys_of_kind("static_stat"))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(model.state_dict()[k].numpy(), got[k])  # loaded
    one = compute_static_stats(model, x, chunk=1000)
    for k in want:
        np.testing.assert_allclose(one[k], got[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert model.training  # mode restored


def test_stats_pass_needs_data():
    from fmtl_lightning.static_bn import StaticStatsError, compute_static_stats

    model = MultiTaskModel(BackboneConfig("cnn", image_size=8, hidden=(4,), norm="static_batch"),
                           {"t": 2})  # fmt: skip
    with pytest.raises(StaticStatsError, match="at least one sample"):
        compute_static_stats(model, torch.zeros(0, 1, 8, 8))


def test_static_stats_are_declared_local_and_never_aggregated():
    cfg = BackboneConfig("cnn", hidden=tuple(HIDDEN), norm="static_batch")
    for policy in ("fedper", "fedbn", "fedavg"):
        spec = model_spec(cfg, {"t": 2}, policy)
        stats = spec.keys_of_kind("static_stat")
        assert len(stats) == 2 * len(HIDDEN)
        assert set(stats) <= set(spec.local_keys()), policy
        assert not set(stats) & set(spec.shared_keys()), policy
    assert all(spec[k].axes == (f"h{i // 2}",) for i, k in enumerate(stats))


@pytest.mark.parametrize(
    "algorithm",
    [{}, {"policy": "fedbn"}, {"name": "fedavg"}, {"name": "ditto", "lam": 0.5}],
    ids=["fedper", "fedbn", "fedavg", "ditto"],
)
def test_simulation_client_stats_are_those_of_its_model_over_its_training_data(
    small_cfg, tmp_path, algorithm
):
    sim = _sim(_cfg(small_cfg, **algorithm), tmp_path / "run")
    sim.run()
    for c in sim.fed.clients:
        state = {k: v.astype(np.float64) for k, v in _deployed(sim, c).items()}
        want = _numpy_stats(state, c.x_train.numpy())
        for k, v in want.items():
            np.testing.assert_allclose(state[k], v, rtol=2e-5, atol=1e-6, err_msg=f"{c.cid} {k}")


# ------------------------------------------------------------------ (a) batch independence
@pytest.mark.slow  # exports a training-step graph (~15 s)
def test_a_prediction_does_not_depend_on_the_rest_of_its_batch(small_cfg, tmp_path):
    from export.run_export import export_run
    from mobile_client.batching import batch_order
    from mobile_client.runtime import EdgeClient

    run_dir = tmp_path / "run"
    small_cfg["federation"]["rounds"] = 1
    sim = _sim(_cfg(small_cfg), run_dir)
    sim.run()
    torch_logits = {}
    for c in sim.fed.clients:  # widths 1, 1, 0.5: torch evaluation
        x6 = c.x_test[:6]
        m = sim.pool.module_for(c, c.width)
        load_arrays(m.model, _deployed(sim, c))
        m.eval()
        with torch.no_grad():
            six, one = m(x6), m(x6[:1])
        for t in c.tasks:
            np.testing.assert_allclose(one[t][0].numpy(), six[t][0].numpy(), atol=1e-5)
        torch_logits[c.cid] = six
    # ONNX Runtime on the exported graphs: the width-1 backbone (c00's statistics) and
    # c01's own backbone (its statistics differ), each followed by c01's head
    bundle = export_run(run_dir, tmp_path / "bundle", widths=[1.0], clients=["c01"])
    edge = EdgeClient(bundle, "c01")
    x6 = sim.fed.clients[1].x_test[:6].numpy()
    assert edge.entry.backbone is not None  # its own statistics, baked into its own graph
    np.testing.assert_allclose(edge.predict("digits/digit", x6),
                               torch_logits["c01"]["digits/digit"].numpy(), atol=1e-4)  # fmt: skip
    head = edge.head("digits/digit").file
    for bb in (edge.entry.backbone, edge.manifest.width(1.0).backbone):
        feats6 = edge.session(bb).run(None, {"x": x6})[0]
        feats1 = edge.session(bb).run(None, {"x": x6[:1]})[0]
        np.testing.assert_allclose(feats1[0], feats6[0], atol=1e-5, err_msg=bb.path)
        z6 = edge.session(head).run(None, {"features": feats6})[0]
        z1 = edge.session(head).run(None, {"features": feats1})[0]
        np.testing.assert_allclose(z1[0], z6[0], atol=1e-5, err_msg=bb.path)
    c00 = torch_logits["c00"]["digits/digit"]  # the width backbone is c00's model
    feats = edge.session(edge.manifest.width(1.0).backbone).run(
        None, {"x": sim.fed.clients[0].x_test[:6].numpy()}
    )[0]
    m = sim.pool.module_for(sim.fed.clients[0], 1.0)
    load_arrays(m.model, _deployed(sim, sim.fed.clients[0]))
    m.eval()
    with torch.no_grad():
        want = m.model.backbone(sim.fed.clients[0].x_test[:6])
    np.testing.assert_allclose(feats, want.numpy(), atol=1e-4)
    assert c00.shape == (6, 10)
    # the exported training step still trains with batch statistics (torch SGD parity)
    # and passes the computed statistics through unchanged
    c01 = sim.fed.clients[1]
    x, y = c01.x_train[:24], {t: v[:24] for t, v in c01.y_train.items()}
    res = edge.train(x.numpy(), {t: v.numpy() for t, v in y.items()}, batch_size=8, steps=2,
                     lr=0.1, seed=1)  # fmt: skip
    m = sim.pool.module_for(c01, 1.0)
    load_arrays(m.model, _deployed(sim, c01))
    m.train()
    opt = torch.optim.SGD(m.model.parameters(), lr=0.1)
    for idx in batch_order(24, 8, 1, 2, 1):
        i = torch.from_numpy(idx)
        opt.zero_grad()
        m.task_losses(m(x[i]), {t: v[i] for t, v in y.items()})["digits/digit"].backward()
        opt.step()
    want_state = {k: v.detach().numpy() for k, v in m.model.state_dict().items()}
    assert set(res.state) == set(want_state)
    for k, v in want_state.items():
        np.testing.assert_allclose(res.state[k], v, atol=1e-5, err_msg=k)
    for k in sim.spec.keys_of_kind("static_stat"):
        np.testing.assert_array_equal(res.state[k], edge.base_state()[k], err_msg=k)


# ------------------------------------------------------------------ (c) resume
def _checkpoint(run_dir, round_no: int) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    ck = run_dir / "checkpoints" / f"round_{round_no:04d}"
    out = {f"global/{k}": v for k, v in load_file(str(ck / "global.safetensors")).items()}
    for f in sorted((ck / "clients").glob("*.safetensors")):
        out.update({f"{f.stem}/{k}": v for k, v in load_file(str(f)).items()})
    return out


def test_checkpoint_resume_gives_the_uninterrupted_state(small_cfg, tmp_path):
    cfg = _cfg(small_cfg, width_assignment="dynamic", slicing="fedrolex")
    cfg["federation"].update(rounds=4, eval_every=2)  # evaluated after rounds 2 and 4
    cfg["checkpoints"] = {"keep_every": 1}  # rounds 3 and 4 are compared below
    straight = _sim(cfg, tmp_path / "a")
    straight.run()

    class Killed(Exception):
        pass

    def kill_after_round_3(r: int) -> None:
        if r == 3:
            raise Killed

    with pytest.raises(Killed):
        _sim(cfg, tmp_path / "b").run(on_round=kill_after_round_3)
    resumed = Simulation.resume(tmp_path / "b", progress=False)
    assert resumed.round_idx == 3
    stat_keys = straight.spec.keys_of_kind("static_stat")
    assert len(stat_keys) == 2 * len(HIDDEN)
    # the statistics of round 3's pass came back from the round-3 checkpoint
    ck3 = _checkpoint(tmp_path / "a", 3)
    for cid, st in resumed.pool.stores.items():
        for k in stat_keys:
            np.testing.assert_array_equal(st.local[k], ck3[f"{cid}/local/{k}"], err_msg=k)
            assert not np.all(st.local[k] == (0.0 if "mean" in k else 1.0)), k  # computed
    resumed.run()
    for r in (3, 4):
        a, b = _checkpoint(tmp_path / "a", r), _checkpoint(tmp_path / "b", r)
        assert a.keys() == b.keys()
        assert {f"c00/local/{k}" for k in stat_keys} <= set(a)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"round {r} {k}")
    assert straight.history == resumed.history


# ------------------------------------------------------------------ (d) edge
def test_validator_refuses_static_batch_norm_for_edge_clients(small_cfg):
    cfg = _cfg(small_cfg)
    cfg["model"]["scaler"] = False
    cfg["optimizer"] = {"name": "sgd", "lr": 0.1}
    cfg["clients"][0]["edge"] = True
    with pytest.raises(ConfigError, match=r"clients\[0\]\.edge.*model\.norm static_batch"):
        parse_config(cfg)
    cfg["model"]["norm"] = "batch"
    parse_config(cfg)  # the same config with tracking batch norm is accepted


def test_deployed_lightning_node_evaluates_with_the_statistics_of_its_training_data(
    small_cfg, tmp_path
):
    import yaml

    from fmtl_lightning.config import config_to_dict
    from fmtl_lightning.deploy.lightning_client import LightningNode
    from mobile_client.flower_app import NodeSettings, TrainInstructions

    cfg = parse_config(_cfg(small_cfg))
    settings = NodeSettings("c02", 0.5, ("digits/parity", "digits/attrs"), state_dir=tmp_path)
    node = LightningNode(settings, yaml.safe_dump(config_to_dict(cfg)))
    c = node.client
    state = {k: v + 0.1 * np.random.default_rng(0).standard_normal(v.shape).astype(v.dtype)
             for k, v in node.pool.client_state(c, WidthSpec(0.5), node.pool.plan.initial_state).items()}  # fmt: skip
    received = {k: v for k, v in state.items() if k in node.pool.shared_keys}
    ins = TrainInstructions(1, 0, "c02", 2, 0.5, "heterofl", "", 1, 16, 0.1, -1, 0)
    got = node.evaluate(received, ins)  # the aggregated shared state, its own heads at home
    ref = {**node.pool.client_state(c, WidthSpec(0.5), node.pool.plan.initial_state), **received}
    assert ref.keys() == state.keys() and set(received) < set(ref)
    for k, v in _numpy_stats({k: v.astype(np.float64) for k, v in state.items()},
                             c.x_train.numpy()).items():  # fmt: skip
        ref[k] = v.astype(np.float32)
    m = node.pool.module_for(c, 0.5)
    load_arrays(m.model, ref)
    want = m.evaluate(c.x_test, c.y_test)
    for t, vals in want.items():
        assert got[f"loss/{t}"] == pytest.approx(vals["loss"], rel=1e-4), t
        assert got[f"acc/{t}"] == pytest.approx(vals["acc"]), t


def test_export_refuses_a_width_no_client_holds_statistics_for(small_cfg, tmp_path):
    from export.bundle import RunExportError
    from export.run_export import export_run

    cfg = _cfg(small_cfg, width_assignment="dynamic", dynamic_widths=[1.0, 0.5, 0.25])
    cfg["federation"]["rounds"] = 1
    _sim(cfg, tmp_path / "run").run()
    with pytest.raises(RunExportError, match=r"width 0.25: no client .*running_mean.* 1, 0.5$"):
        export_run(tmp_path / "run", tmp_path / "bundle", widths=[0.25])
    assert not (tmp_path / "bundle").exists()
