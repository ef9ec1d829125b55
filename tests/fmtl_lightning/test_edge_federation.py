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


def test_half_the_clients_on_the_edge_runtime_give_the_same_global_model(small_cfg, tmp_path):
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
        for k, v in lightning.stores[cid].local.items():
            np.testing.assert_allclose(edge.stores[cid].local[k], v, rtol=0, atol=1e-5)
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
        (lambda c: c["optimizer"].update(momentum=0.9), "plain SGD"),
    ],
)
def test_edge_client_config_limits_are_named(small_cfg, edit, words):
    cfg = _cfg(small_cfg, True)
    edit(cfg)
    with pytest.raises(ConfigError, match=r"clients\[1\]\.edge") as ei:
        parse_config(cfg)
    assert words in str(ei.value)
