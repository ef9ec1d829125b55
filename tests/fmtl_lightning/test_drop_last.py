"""``federation.drop_last``: each epoch skips its short last batch (PyTorch's
``DataLoader(drop_last=True)``, as PFLlib trains), the batches otherwise the same; the
validator refuses it where it cannot run (with ``local_steps``, on edge clients)."""

from __future__ import annotations

import copy

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fmtl_lightning.config import ConfigError, parse_config
from fmtl_lightning.local_fit import FitPlan, batch_indices, fit
from fmtl_lightning.models import BackboneConfig, MultiTaskModel
from fmtl_lightning.module import MultiTaskModule
from fmtl_lightning.tasks import Task


def test_drop_last_batches_are_the_full_slices_of_each_pass() -> None:
    plan = FitPlan(batch_size=10, epochs=2, drop_last=True)
    got = [b.numpy() for b in batch_indices(23, plan, seed=5)]
    rng = np.random.default_rng(5)  # one generator, a new permutation per pass
    want = []
    for _ in range(2):
        perm = rng.permutation(23)
        want += [perm[0:10], perm[10:20]]  # perm[20:23] dropped
    assert len(got) == 4 == plan.num_batches(23)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    # without drop_last the same permutations, plus the short batches
    full = [b.numpy() for b in batch_indices(23, FitPlan(batch_size=10, epochs=2), seed=5)]
    assert [len(b) for b in full] == [10, 10, 3, 10, 10, 3]
    np.testing.assert_array_equal(full[3], got[2])
    assert FitPlan(10, 1, drop_last=True).num_batches(9) == 0


def test_fit_with_drop_last_equals_torch_sgd_over_the_full_batches() -> None:
    torch.manual_seed(0)
    model = MultiTaskModel(BackboneConfig("mlp", norm="none", hidden=(8,)), {"t": 3})
    ref = copy.deepcopy(model)
    module = MultiTaskModule(model, [Task("t", 3, "multiclass")], lr=0.1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(23, 1, 28, 28, generator=g), torch.randint(0, 3, (23,), generator=g)
    plan = FitPlan(batch_size=10, epochs=1, drop_last=True)
    steps, _ = fit(L.Fabric(accelerator="cpu", devices=1), module, x, {"t": y}, plan, seed=4)
    assert steps == 2
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    perm = torch.from_numpy(np.random.default_rng(4).permutation(23))
    for idx in (perm[:10], perm[10:20]):
        opt.zero_grad()
        F.cross_entropy(ref(x[idx])["t"], y[idx]).backward()
        opt.step()
    got, want = model.state_dict(), ref.state_dict()
    for k in want:
        np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), rtol=0, atol=1e-6, err_msg=k)


def test_drop_last_with_steps_is_refused_by_the_plan() -> None:
    with pytest.raises(ValueError, match="drop_last"):
        list(batch_indices(23, FitPlan(10, 1, steps=3, drop_last=True), seed=0))


def test_the_config_option_reaches_every_fit(small_cfg, tmp_path) -> None:
    from fmtl_lightning.simulation import Simulation

    assert parse_config(small_cfg).federation.drop_last is False  # the default
    small_cfg["federation"]["drop_last"] = True
    sim = Simulation(parse_config(small_cfg), tmp_path / "run", progress=False)
    assert sim.pool.fit_plan() == FitPlan(16, 1, None, True)


@pytest.mark.parametrize(
    "edit, field",
    [
        ({"federation": {"local_steps": 3}}, "federation.drop_last"),
        ({"clients": [{"count": 2, "tasks": ["digits/digit"], "edge": True}]}, "clients[0].edge"),
    ],
)
def test_refused_where_it_cannot_run(small_cfg, edit: dict, field: str) -> None:
    small_cfg["federation"]["drop_last"] = True
    for k, v in edit.items():
        if isinstance(v, dict):
            small_cfg[k].update(v)
        else:
            small_cfg[k] = v
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")) as ei:
        parse_config(small_cfg)
    assert "drop_last" in str(ei.value)
