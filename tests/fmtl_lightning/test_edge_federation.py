"""Edge clients inside the federation: same round, half the clients on ONNX Runtime."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from fmtl_lightning.config import ConfigError, parse_config
from fmtl_lightning.simulation import Simulation


def _cfg(small_cfg: dict, edge: bool) -> dict:
    cfg = copy.deepcopy(small_cfg)
    cfg["clients"] = [
        {"count": 1, "tasks": ["digits/digit"], "width": 1.0},
        {"count": 1, "tasks": ["digits/digit"], "width": 1.0, "edge": edge},
        {"count": 1, "tasks": ["digits/parity", "digits/attrs"], "width": 0.5},
        {"count": 1, "tasks": ["digits/parity", "digits/attrs"], "width": 0.5, "edge": edge},
    ]
    cfg["federation"].update(rounds=2, batch_size=8)
    return cfg


@pytest.mark.parametrize(
    "optimizer", [{"lr": 0.1}, {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}]
)
def test_half_the_clients_on_the_edge_runtime_give_the_same_global_model(
    small_cfg, tmp_path, optimizer
):
    """Plain SGD, and SGD with momentum and weight decay (the step graphs carry the
    momentum buffers through a fit, fresh each round like Lightning's optimiser)."""
    small_cfg = {**small_cfg, "optimizer": optimizer}
    lightning = Simulation(parse_config(_cfg(small_cfg, False)), tmp_path / "l", progress=False)
    edge = Simulation(parse_config(_cfg(small_cfg, True)), tmp_path / "e", progress=False)
    assert [c.edge for c in edge.fed.clients] == [False, True, False, True]
    for k in lightning.global_state:  # same start
        np.testing.assert_array_equal(lightning.global_state[k], edge.global_state[k])
    start = {k: v.copy() for k, v in edge.global_state.items()}
    lightning.run()
    edge.run()
    for k in lightning.global_state:
        np.testing.assert_allclose(
            edge.global_state[k], lightning.global_state[k], rtol=0, atol=1e-5, err_msg=k
        )
    assert any(not np.allclose(edge.global_state[k], start[k], atol=1e-3) for k in start)
    # the heads of edge clients trained on the device and match too
    for cid in ("c01", "c03"):
        for k, v in lightning.pool.stores[cid].local.items():
            np.testing.assert_allclose(edge.pool.stores[cid].local[k], v, rtol=0, atol=1e-5)
    # the real data path: files exchanged, heads never in the update
    from mobile_client.safetensors_np import load_file

    for cid in ("c01", "c03"):
        box = tmp_path / "e" / "edge" / "exchange" / cid / "round_0002"
        arrays, meta = load_file(box / "update.safetensors")
        assert set(arrays) == set(edge.shared_keys) and meta["client_id"] == cid
        assert not any(k.startswith("heads.") for k in arrays)
    assert not (tmp_path / "e" / "edge" / "exchange" / "c00").exists()


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda c: c["algorithm"].update(name="ditto"), "edge clients run FedPer"),
    ],
)
def test_edge_client_config_limits_are_named(small_cfg, edit, words):
    cfg = _cfg(small_cfg, True)
    edit(cfg)
    with pytest.raises(ConfigError, match=r"clients\[1\]\.edge") as ei:
        parse_config(cfg)
    assert words in str(ei.value)


def _fedbn_cfg(small_cfg: dict, edge: bool) -> dict:
    cfg = copy.deepcopy(small_cfg)
    cfg["model"] = {"family": "cnn", "hidden": [4], "norm": "batch"}  # one conv: fast export
    cfg["algorithm"] = {"name": "fedper", "policy": "fedbn"}
    cfg["data"]["samples_per_client"] = 40
    cfg["clients"] = [
        {"count": 1, "tasks": ["digits/digit"], "width": 1.0},
        {"count": 1, "tasks": ["digits/parity"], "width": 0.5, "edge": edge},
    ]
    cfg["federation"].update(rounds=2, batch_size=8)
    cfg["compare_local"] = True
    return cfg


def test_fedbn_edge_client_and_its_local_baseline_match_lightning(small_cfg, tmp_path):
    """Issue 16 #3 and #4: FedBN with an edge client runs 2 rounds (its norms stay on the
    device), and its local-only baseline is the same client trained alone, in-process."""
    from fmtl_lightning.checkpoint import read_round
    from fmtl_lightning.config import load_config
    from fmtl_lightning.roles import ModelSpec
    from fmtl_lightning.simulation import resume_run, run_config
    from mobile_client.manifest import load_manifest
    from mobile_client.safetensors_np import load_file

    ref = run_config(_fedbn_cfg(small_cfg, False), tmp_path / "l", progress=False)
    out = run_config(_fedbn_cfg(small_cfg, True), tmp_path / "e", progress=False)
    g_ref, c_ref, _, _ = read_round(tmp_path / "l", 2)
    g, clients, _, _ = read_round(tmp_path / "e", 2)
    spec = ModelSpec.from_json((tmp_path / "e" / "spec.json").read_text())
    shared, norms = spec.shared_keys(), spec.keys_of_kind("norm", "norm_stat", "counter")
    assert norms and not set(norms) & set(shared) and set(g) == set(shared)
    for k in shared:  # the edge client trained on ONNX Runtime, the server saw the same update
        np.testing.assert_allclose(g[k], g_ref[k], rtol=0, atol=1e-5, err_msg=k)
    local = clients["c01"]  # its norms and head, kept at home, trained as in Lightning
    assert {k.removeprefix("local/") for k in local} >= set(norms)
    for k, v in c_ref["c01"].items():
        np.testing.assert_allclose(local[k], v, rtol=0, atol=1e-5, err_msg=k)

    # the device was told, by the manifest, which keys travel; its update held only those
    edge = tmp_path / "e" / "edge"
    (bundle,) = (edge / "bundles").iterdir()
    assert load_manifest(bundle).client("c01").shared_keys == shared
    arrays, _ = load_file(edge / "exchange" / "c01" / "round_0002" / "update.safetensors")
    assert set(arrays) == set(shared)

    # the local-only baseline: no server, so no edge exchange; same numbers as Lightning's
    base = tmp_path / "e" / "local_baseline"
    assert not (base / "edge").exists()
    assert out["local_baseline"] == ref["local_baseline"]
    _, b_ref, _, _ = read_round(tmp_path / "l" / "local_baseline", 2)
    _, b_edge, _, _ = read_round(base, 2)
    for cid in ("c00", "c01"):
        assert set(b_edge[cid]) == set(b_ref[cid])
        for k, v in b_ref[cid].items():
            np.testing.assert_array_equal(b_edge[cid][k], v, err_msg=f"{cid} {k}")
    assert not load_config(base / "config.yaml").clients[1].edge  # a config the validator takes
    # --resume of the finished run reloads both configs and changes nothing
    assert resume_run(tmp_path / "e", progress=False)["local_baseline"] == out["local_baseline"]


def _own_cfg(small_cfg: dict, edge: bool) -> dict:
    cfg = copy.deepcopy(small_cfg)
    cfg["model"] = {"factory": "tests.fmtl_lightning.own_factories:tabular"}
    cfg["data"] = {"factory": "tests.fmtl_lightning.own_factories:digits_tabular"}
    cfg["clients"] = [
        {"count": 1, "tasks": ["digits/digit"], "width": 1.0},
        {"count": 1, "tasks": ["digits/digit"], "width": 0.5, "edge": edge},
    ]
    cfg["federation"].update(rounds=2, batch_size=8)
    return cfg


def test_a_users_own_tabular_model_trains_on_the_edge_like_in_lightning(small_cfg, tmp_path):
    """model.factory + data.factory (64 tabular features, not an image) with a width-1/2
    edge client: the device trains the user's model in ONNX Runtime, and the run equals
    the same config trained in-process, to float rounding."""
    import onnx

    from fmtl_lightning.checkpoint import read_round
    from fmtl_lightning.simulation import run_config
    from mobile_client.manifest import load_manifest

    run_config(_own_cfg(small_cfg, False), tmp_path / "l", progress=False)
    run_config(_own_cfg(small_cfg, True), tmp_path / "e", progress=False)
    g_ref, c_ref, _, _ = read_round(tmp_path / "l", 2)
    g, clients, _, _ = read_round(tmp_path / "e", 2)
    assert set(g) == set(g_ref) and len(g) == 4  # fc1, fc2 weights and biases
    for k in g_ref:
        np.testing.assert_allclose(g[k], g_ref[k], rtol=0, atol=1e-5, err_msg=k)
    for k, v in c_ref["c01"].items():  # the head trained on the device
        np.testing.assert_allclose(clients["c01"][k], v, rtol=0, atol=1e-5, err_msg=k)
    (bundle,) = (tmp_path / "e" / "edge" / "bundles").iterdir()
    m = load_manifest(bundle)
    assert m.clients[0].normalisation.input_shape == (64,)
    assert [w.width for w in m.widths] == [0.5]
    props = {p.key: p.value for p in onnx.load(bundle / m.widths[0].backbone.path).metadata_props}
    assert props["fmtl.model_family"] == "own:TabularNet"
