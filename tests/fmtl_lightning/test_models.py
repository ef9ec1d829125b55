"""Width-sliceable models: built-at-width shapes equal sliced shapes, roles are declared."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmtl_lightning.errors import StateValidationError
from fmtl_lightning.models import (
    HETEROFL_CNN_HIDDEN,
    BackboneConfig,
    MultiTaskModel,
    load_arrays,
    model_spec,
    state_arrays,
)
from fmtl_lightning.roles import WidthSpec
from fmtl_lightning.slicing import slice_state

TASKS = {"mnist/digit": 10, "mnist/attrs": 3}
WIDTHS = [1.0, 0.5, 0.25, 0.125, 0.0625]
FAMILIES = [
    BackboneConfig("mlp"),
    BackboneConfig("cnn", norm="group"),
    BackboneConfig("cnn", norm="batch"),
    BackboneConfig("cnn", norm="static_batch"),
    BackboneConfig("cnn", norm="none"),
    BackboneConfig("dwcnn", norm="batch"),
    BackboneConfig("dwcnn", norm="group"),
    BackboneConfig("fedavgcnn", norm="none"),
    BackboneConfig("fedavgcnn", norm="batch"),
]


@pytest.mark.parametrize("cfg", FAMILIES, ids=lambda c: f"{c.family}-{c.norm}")
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("mode", ["heterofl", "fedrolex"])
def test_built_at_width_has_exactly_the_sliced_shapes(cfg, width, mode):
    torch.manual_seed(0)
    full = state_arrays(MultiTaskModel(cfg, TASKS, 1.0))
    spec = model_spec(cfg, TASKS)
    sub = slice_state(full, spec, WidthSpec(width, mode, round_idx=5))
    small = MultiTaskModel(cfg, TASKS, width)
    sd = small.state_dict()
    assert list(sub) == list(sd)
    for k in sd:
        assert sub[k].shape == tuple(sd[k].shape), k
        assert spec.shape_at(k, width) == tuple(sd[k].shape), k
    load_arrays(small, sub)  # loads strictly: same keys, same shapes
    out = small.eval()(torch.zeros(2, 1, 28, 28))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "mnist/digit": (2, 10),
        "mnist/attrs": (2, 3),
    }


def test_sliced_submodel_computes_the_prefix_of_the_full_model_mlp():
    # With no norm and no scaler, the width-1/2 MLP's features equal the full model's first
    # half of hidden units when every dropped unit is zeroed in the full model.
    torch.manual_seed(0)
    cfg = BackboneConfig("mlp", hidden=(8, 6))
    full_model = MultiTaskModel(cfg, {"t": 2}, 1.0)
    spec = full_model.role_spec()
    full = state_arrays(full_model)
    small = MultiTaskModel(cfg, {"t": 2}, 0.5)
    load_arrays(small, slice_state(full, spec, 0.5))
    zeroed = dict(full)
    zeroed["backbone.layers.1.weight"] = full["backbone.layers.1.weight"].copy()
    zeroed["backbone.layers.1.weight"][4:] = 0
    zeroed["backbone.layers.1.bias"] = full["backbone.layers.1.bias"].copy()
    zeroed["backbone.layers.1.bias"][4:] = 0
    load_arrays(full_model, zeroed)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        f_full = full_model.backbone(x)
        f_small = small.backbone(x)
    np.testing.assert_allclose(f_small.numpy(), f_full[:, :3].numpy(), rtol=1e-5, atol=1e-6)


def test_roles_are_declared_for_every_key_and_fedbn_keeps_norms_local():
    cfg = BackboneConfig("cnn", norm="batch")
    spec = model_spec(cfg, TASKS, policy="fedper")
    assert set(spec.keys) == set(MultiTaskModel(cfg, TASKS).state_dict())
    assert all(k.startswith("heads.") for k in spec.local_keys())
    assert all(k.startswith("backbone.") for k in spec.shared_keys())
    fedbn = spec.with_policy("fedbn")
    norm_keys = set(spec.keys_of_kind("norm", "norm_stat", "counter"))
    assert norm_keys and norm_keys <= set(fedbn.local_keys())
    counters = spec.keys_of_kind("counter")
    assert len(counters) == 3 and all(spec[k].dtype == "int64" for k in counters)


def test_heterofl_cnn_has_about_1_56m_parameters():
    cfg = BackboneConfig("cnn", hidden=HETEROFL_CNN_HIDDEN, norm="static_batch")
    spec = model_spec(cfg, {"mnist/digit": 10})
    params = spec.keys_of_kind("backbone", "norm", "head")  # not the computed sBN statistics
    assert spec.num_elements(params) == 1_556_874


def test_scaler_divides_by_width_only_in_training():
    cfg = BackboneConfig("mlp", hidden=(4,), scaler=True)
    torch.manual_seed(0)
    m = MultiTaskModel(cfg, {"t": 2}, 0.5)
    lin = m.backbone.layers[1]
    x = torch.randn(3, 1, 28, 28)
    pre = lin(x.flatten(1))
    m.train()
    np.testing.assert_allclose(
        m.backbone(x).detach().numpy(), torch.relu(pre / 0.5).detach().numpy(), rtol=1e-6
    )
    m.eval()
    np.testing.assert_allclose(
        m.backbone(x).detach().numpy(), torch.relu(pre).detach().numpy(), rtol=1e-6
    )


def test_load_arrays_rejects_wrong_shape_and_unknown_key():
    m = MultiTaskModel(BackboneConfig("mlp", hidden=(4,)), {"t": 2}, 1.0)
    with pytest.raises(StateValidationError, match="heads.t.weight"):
        load_arrays(m, {"heads.t.weight": np.zeros((3, 4), dtype=np.float32)})
    with pytest.raises(StateValidationError, match="nope"):
        load_arrays(m, {"nope": np.zeros(1, dtype=np.float32)})
