"""RunArtifacts reads what the simulation wrote: clients, normalisation, deployable states,
and each round's static batch-norm statistics (computed after every aggregation)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from fmtl_lightning.config import parse_config
from fmtl_lightning.run_artifacts import RunArtifacts
from fmtl_lightning.simulation import Simulation


def _simulate(cfg: dict, run_dir):
    sim = Simulation(parse_config(cfg), run_dir, progress=False)
    sim.run()
    return sim


@pytest.mark.parametrize("algorithm", ["fedper", "ditto", "fedavg"])
def test_run_artifacts_equal_the_simulation(small_cfg, tmp_path, algorithm) -> None:
    """The reader gives what the finished simulation holds: clients, normalisation, and
    each client's deployable state (one implementation: ``deployed_state``)."""
    small_cfg["algorithm"] = {"name": algorithm, **({"lam": 0.5} if algorithm == "ditto" else {})}
    small_cfg["federation"]["rounds"] = 1
    sim = _simulate(small_cfg, tmp_path / "run")
    art = RunArtifacts(tmp_path / "run")
    assert art.round == art.last_round == sim.round_idx == 1
    assert [(c.client_id, c.tasks, c.width) for c in art.clients] == [
        (c.cid, c.tasks, c.width) for c in sim.fed.clients
    ]
    assert art.normalisation == sim.fed.normalisation
    assert art.image_size == sim.fed.image_size
    assert art.layout.union_slices == sim.engine.plan.layout.union_slices
    assert art.spec == sim.spec
    for i, c in enumerate(sim.fed.clients):
        ws = sim.engine.eval_width(i, sim.round_idx)
        assert art.eval_width(c.cid) == ws
        want, got = sim.client_state(c, ws), art.client_state(c.cid, ws)
        assert sorted(got) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{c.cid} {k}")
        model = art.model(c.cid, c.width)
        assert set(model.state_dict()) == set(want)


def test_every_round_checkpoint_holds_the_statistics_of_its_weights(small_cfg, tmp_path):
    """Static BN: a round that is not evaluated still checkpoints its own statistics, so a
    reader (export) of any round never needs training data."""
    from test_static_bn import _numpy_stats

    cfg = copy.deepcopy(small_cfg)
    cfg["model"] = {"family": "cnn", "hidden": [4, 6], "norm": "static_batch", "scaler": True}
    cfg["algorithm"] = {"name": "fedper", "slicing": "fedrolex"}
    cfg["federation"].update(rounds=2, eval_every=2)  # round 1 is not evaluated
    cfg["checkpoints"] = {"keep_every": 1}
    sim = _simulate(cfg, tmp_path / "run")
    art = RunArtifacts(tmp_path / "run", round_idx=1)
    keys = art.spec.keys_of_kind("static_stat")
    assert len(keys) == 4
    for c in sim.fed.clients:
        state = art.client_state(c.cid, art.eval_width(c.cid))
        want = _numpy_stats({k: v.astype(np.float64) for k, v in state.items()},
                            c.x_train.numpy())  # fmt: skip
        for k in keys:
            np.testing.assert_allclose(state[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)


def test_reader_errors_name_the_file(small_cfg, tmp_path):
    from fmtl_lightning.run_artifacts import RunArtifactsError

    with pytest.raises(RunArtifactsError, match=r"config\.yaml is missing"):
        RunArtifacts(tmp_path)
