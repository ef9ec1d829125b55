"""The simulation validates an edge client's update file like any input from outside.

Found by the hostile sweep: ``EdgeBridge`` read the update (``read_update`` checks only
finiteness) and passed it to ``aggregate``, which checks values on the averages, so a
value past the magnitude bound was accepted whenever other clients diluted it.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from fmtl_lightning.config import parse_config
from fmtl_lightning.edge_bridge import EdgeBridge
from fmtl_lightning.errors import StateValidationError
from fmtl_lightning.simulation import Simulation
from fmtl_lightning.slicing import slice_state
from fmtl_lightning.validation import max_abs


def _sim(small_cfg: dict, tmp_path, monkeypatch, value: float) -> Simulation:
    import mobile_client.runtime as runtime
    from mobile_client.runtime import TrainResult

    cfg = copy.deepcopy(small_cfg)
    cfg["clients"] = [
        {"count": 2, "tasks": ["digits/digit"], "width": 1.0},
        {"count": 1, "tasks": ["digits/digit"], "width": 0.5, "edge": True},
    ]
    sim = Simulation(parse_config(cfg), tmp_path / "run", progress=False)
    key = next(k for k in sim.shared_keys if sim.spec[k].is_float)

    class Device:  # the device's runtime: its update holds one ``value`` (finite)
        def __init__(self, bundle, client_id) -> None:
            pass

        def train(self, x, targets, *, start_from, **kw) -> TrainResult:
            shared = {k: np.array(start_from[k], copy=True) for k in sim.shared_keys}
            shared[key].flat[0] = value
            return TrainResult({**start_from, **shared}, shared, len(x), {"loss": 1.0})

    monkeypatch.setattr(runtime, "EdgeClient", Device)
    monkeypatch.setattr(EdgeBridge, "bundle_for", lambda self, job: tmp_path)
    return sim


def test_an_edge_update_past_the_magnitude_bound_is_refused_naming_the_client(
    small_cfg, tmp_path, monkeypatch
):
    past = max_abs(np.float32) * 1.01  # finite, past sqrt(float32 max)
    sim = _sim(small_cfg, tmp_path, monkeypatch, past)
    with pytest.raises(StateValidationError, match=r"client 'c02', key .*\|x\| > 1.84e\+19"):
        ws = sim.engine.width_of(2, 0)
        sim.pool.train(2, ws, 0, slice_state(sim.global_state, sim.spec, ws))


def test_an_edge_update_within_the_bound_is_taken_as_sent(small_cfg, tmp_path, monkeypatch):
    sim = _sim(small_cfg, tmp_path, monkeypatch, 1e19)
    ws = sim.engine.width_of(2, 0)
    sent = slice_state(sim.global_state, sim.spec, ws)
    res = sim.pool.train(2, ws, 0, sent)
    assert set(res.shared) == set(sim.shared_keys) and res.num_examples > 0
    changed = [k for k in sent if not np.array_equal(res.shared[k], sent[k])]
    assert len(changed) == 1 and float(np.abs(res.shared[changed[0]]).max()) == np.float32(1e19)
