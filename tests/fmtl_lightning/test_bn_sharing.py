"""BatchNorm under sharing: 0-d integer buffers (``num_batches_tracked``) stay 0-d arrays.

Aggregation must return, for every entry, an ndarray of exactly the declared shape and
dtype, so the next round's validation and the checkpoint writer accept it (issue 16,
defect 1: the integer fold returned a numpy scalar).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fmtl_lightning.aggregation import Aggregator, ClientUpdate, aggregate
from fmtl_lightning.checkpoint import read_round
from fmtl_lightning.config import parse_config
from fmtl_lightning.models import BackboneConfig, MultiTaskModel, model_spec, state_arrays
from fmtl_lightning.roles import ModelSpec, ParamSpec, WidthSpec
from fmtl_lightning.simulation import Simulation
from fmtl_lightning.slicing import slice_state
from fmtl_lightning.validation import validate_state

BN_CFG = BackboneConfig("cnn", 1, 8, (4, 8), "batch", False)


def _assert_declared(state: dict[str, np.ndarray], spec: ModelSpec, keys) -> None:
    for k in keys:
        v = state[k]
        assert type(v) is np.ndarray, (k, type(v))
        assert v.shape == spec.shape_at(k, 1.0) and v.dtype == np.dtype(spec[k].dtype), k


def _bn_updates(spec: ModelSpec, g: dict[str, np.ndarray], counters: tuple[int, int]):
    """Two clients (widths 1 and 0.5) whose float entries are g + 1 and whose counters differ."""
    ups = []
    for cid, width, n in (("a", 1.0, counters[0]), ("b", 0.5, counters[1])):
        ws = WidthSpec(width)
        st = {k: (v + 1).astype(v.dtype) for k, v in slice_state(g, spec, ws).items()}
        for k in spec.keys_of_kind("counter"):
            st[k] = np.array(n, dtype=np.int64)
        ups.append(ClientUpdate(cid, st, 10, ws))
    return ups


def test_bn_model_state_aggregates_twice_with_declared_shapes():
    spec = model_spec(BN_CFG, {"digits/digit": 10}, "fedper")
    counters = spec.keys_of_kind("counter")
    assert counters and all(spec[k].shape == () for k in counters)
    init = state_arrays(MultiTaskModel(BN_CFG, {"digits/digit": 10}))
    g0 = {k: init[k] for k in spec.shared_keys()}

    g1 = aggregate(g0, _bn_updates(spec, g0, (3, 5)), spec)
    _assert_declared(g1, spec, spec.shared_keys())
    assert all(int(g1[k]) == 5 for k in counters)  # max rule
    # round 2 starts from round 1's result: validation accepts it, and so does aggregate
    validate_state(g1, spec, 1.0, spec.shared_keys(), client="<global>")
    g2 = aggregate(g1, _bn_updates(spec, g1, (9, 4)), spec)
    _assert_declared(g2, spec, spec.shared_keys())
    assert all(int(g2[k]) == 9 for k in counters)
    # the float entries: (g+1) averaged over holders is g + 1 everywhere, twice
    for k in spec.shared_keys():
        if k not in counters:
            np.testing.assert_allclose(g2[k], g0[k] + 2, rtol=0, atol=1e-6, err_msg=k)

    agg = Aggregator(g1, spec)  # the streaming path gives the same arrays
    for u in _bn_updates(spec, g1, (9, 4)):
        agg.add(u)
    res = agg.result()
    _assert_declared(res, spec, spec.shared_keys())
    for k in spec.shared_keys():
        np.testing.assert_array_equal(res[k], g2[k], err_msg=k)


@pytest.mark.parametrize("rule,want", [("max", 7), ("sum", 12), ("keep", 2)])
def test_zero_d_integer_rules_return_zero_d_arrays(rule, want):
    spec = ModelSpec(
        groups={},
        params=(
            ParamSpec("n", "counter", (), (), dtype="int64", int_rule=rule),
            ParamSpec("t", "backbone", (), ()),  # a 0-d float entry
        ),
    )
    g = {"n": np.array(2, dtype=np.int64), "t": np.array(1.0, dtype=np.float32)}
    ups = [
        ClientUpdate("a", {"n": np.array(5), "t": np.array(2.0, dtype=np.float32)}, 1),
        ClientUpdate("b", {"n": np.array(7), "t": np.array(4.0, dtype=np.float32)}, 1),
    ]
    for new in (aggregate(g, ups, spec), aggregate(aggregate(g, ups, spec), ups, spec)):
        _assert_declared(new, spec, ("n", "t"))
        assert float(new["t"]) == 3.0
    assert int(aggregate(g, ups, spec)["n"]) == want


@pytest.mark.parametrize("algorithm", ["fedper", "fedavg"])
def test_batchnorm_federation_two_rounds_checkpoint_reads_back(small_cfg, tmp_path, algorithm):
    small_cfg["model"] = {"family": "cnn", "hidden": [4, 8], "norm": "batch"}
    small_cfg["algorithm"] = {"name": algorithm}
    sim = Simulation(parse_config(small_cfg), tmp_path / "run", progress=False)
    counters = sim.spec.keys_of_kind("counter")
    assert counters and set(counters) <= set(sim.shared_keys)
    sim.run()

    # each client starts a round from the global counter and adds one per batch; the
    # server keeps the max: after r rounds, r * max over clients of ceil(n / batch_size)
    bs = small_cfg["federation"]["batch_size"]
    steps = max(math.ceil(c.num_train / bs) for c in sim.fed.clients)
    g, _, meta, _ = read_round(tmp_path / "run", 2)
    assert meta["round"] == 2
    _assert_declared(g, sim.spec, sim.shared_keys)
    assert all(int(g[k]) == 2 * steps for k in counters)
    for k in sim.shared_keys:
        np.testing.assert_array_equal(g[k], sim.global_state[k], err_msg=k)
        if g[k].dtype.kind == "f":
            assert np.isfinite(g[k]).all(), k

    back = Simulation.resume(tmp_path / "run", progress=False)  # validates the checkpoint
    assert back.round_idx == 2
    for k in sim.shared_keys:
        np.testing.assert_array_equal(back.global_state[k], sim.global_state[k], err_msg=k)
