"""The ``fedavgcnn`` family (PFLlib's FedAvgCNN): the same numbers as PFLlib's module, width
slicing through its flattened layer, the validator's limits, and an edge client training it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from fmtl_lightning.config import ConfigError, parse_config
from fmtl_lightning.errors import SpecError
from fmtl_lightning.models import (
    BackboneConfig,
    MultiTaskModel,
    fedavgcnn_map_side,
    load_arrays,
    model_spec,
    state_arrays,
)
from fmtl_lightning.roles import WidthSpec
from fmtl_lightning.simulation import Simulation
from fmtl_lightning.slicing import slice_state

TASK = {"fashion/item": 10}


class PFLlibFedAvgCNN(nn.Module):
    """PFLlib's FedAvgCNN as written in system/flcore/trainmodel/models.py (TsingZ0/PFLlib)."""

    def __init__(self, in_features: int = 1, num_classes: int = 10, dim: int = 1024) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_features, 32, kernel_size=5, padding=0, stride=1, bias=True),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=(2, 2)),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(32, 64, kernel_size=5, padding=0, stride=1, bias=True),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=(2, 2)),
        )
        self.fc1 = nn.Sequential(nn.Linear(dim, 512), nn.ReLU(inplace=True))
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        return self.fc(self.fc1(torch.flatten(out, 1)))


def test_same_seed_gives_pfllibs_weights_and_outputs():
    torch.manual_seed(0)
    ref = PFLlibFedAvgCNN()
    torch.manual_seed(0)
    ours = MultiTaskModel(BackboneConfig("fedavgcnn", norm="none"), TASK)
    pairs = list(zip(ref.state_dict().items(), ours.state_dict().items(), strict=True))
    for (rk, rv), (ok, ov) in pairs:  # same creation order, same draws
        assert torch.equal(rv.reshape(ov.shape), ov), (rk, ok)
    assert [tuple(v.shape) for _, v in ours.state_dict().items()] == [
        (32, 1, 5, 5), (32,), (64, 32, 5, 5), (64,), (512, 64, 4, 4), (512,), (10, 512), (10,)
    ]  # fmt: skip
    spec = ours.role_spec()
    assert spec.num_elements(spec.keys) == 582_026  # 832 + 51,264 + 524,800 + 5,130
    assert spec.local_keys() == ("heads.fashion__item.weight", "heads.fashion__item.bias")
    x = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        np.testing.assert_allclose(
            ours(x)["fashion/item"].numpy(), ref(x).numpy(), rtol=1e-6, atol=1e-6
        )


@pytest.mark.parametrize("width", [0.5, 0.25])
@pytest.mark.parametrize("mode", ["heterofl", "fedrolex"])
def test_sliced_submodel_computes_the_kept_channels_of_the_full_model(width, mode):
    # Zero every channel the slice drops in the full model (conv weights and biases ->
    # ReLU(0) = 0 after pooling); the flattened layer then sees only the kept channels'
    # 4x4 blocks, so the sub-model's features are the full model's kept features.
    torch.manual_seed(0)
    cfg = BackboneConfig("fedavgcnn", norm="none", hidden=(8, 12, 16))
    full_model = MultiTaskModel(cfg, TASK)
    spec = full_model.role_spec()
    full = state_arrays(full_model)
    ws = WidthSpec(width, mode, round_idx=5)
    small = MultiTaskModel(cfg, TASK, width)
    load_arrays(small, slice_state(full, spec, ws))
    zeroed = {k: v.copy() for k, v in full.items()}
    for key, group in (("backbone.layers.0", "h0"), ("backbone.layers.4", "h1")):
        drop = np.setdiff1d(np.arange(spec.groups[group]), ws.indices(spec.groups[group]))
        zeroed[f"{key}.weight"][drop] = 0
        zeroed[f"{key}.bias"][drop] = 0
    load_arrays(full_model, zeroed)
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = full_model.backbone(x)[:, ws.indices(16)]
        got = small.backbone(x)
    assert got.shape == (5, len(ws.indices(16)))
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_spec_shapes_and_refusals():
    spec = model_spec(BackboneConfig("fedavgcnn", norm="none"), TASK)
    assert spec.shape_at("backbone.layers.8.weight", 0.5) == (256, 32, 4, 4)
    assert spec["backbone.layers.8.weight"].axes == ("h2", "h1", None, None)
    assert fedavgcnn_map_side(28) == 4 and fedavgcnn_map_side(32) == 5
    assert fedavgcnn_map_side(16) == 1 and fedavgcnn_map_side(15) == 0
    with pytest.raises(SpecError, match=r"hidden = \(conv1, conv2, fc\)"):
        BackboneConfig("fedavgcnn", hidden=(8, 16))
    with pytest.raises(SpecError, match="at least 16 pixels, got image_size 8"):
        BackboneConfig("fedavgcnn", image_size=8)


def _cfg(small_cfg: dict, **model) -> dict:
    cfg = copy.deepcopy(small_cfg)
    cfg["model"] = {"family": "fedavgcnn", "norm": "none", **model}
    cfg["data"]["samples_per_client"] = 40
    cfg["clients"] = [
        {"count": 1, "tasks": ["fashion/item"], "width": 1.0},
        {"count": 1, "tasks": ["fashion/group"], "width": 0.5},
    ]
    cfg["federation"].update(rounds=1, batch_size=8)
    return cfg


def test_validator_accepts_the_family_and_names_what_it_refuses(small_cfg):
    assert parse_config(_cfg(small_cfg)).model.family == "fedavgcnn"
    assert parse_config(_cfg(small_cfg, hidden=[4, 8, 16])).model.hidden == (4, 8, 16)
    with pytest.raises(ConfigError, match=r"model.family: fedavgcnn .*got \[4, 8\]"):
        parse_config(_cfg(small_cfg, hidden=[4, 8]))
    digits = _cfg(small_cfg)
    digits["clients"][1]["tasks"] = ["digits/digit"]
    with pytest.raises(ConfigError, match=r"model.family: fedavgcnn .*>= 16 px \(got 8\)"):
        parse_config(digits)


@pytest.mark.slow  # two exports of the step graph (~20 s)
def test_an_edge_client_trains_fedavgcnn_like_lightning(small_cfg, tmp_path):
    # the FedPer round with one client on ONNX Runtime gives the Lightning round's model
    runs = {}
    for edge in (False, True):
        cfg = _cfg(small_cfg, hidden=[2, 4, 8])
        cfg["clients"][1]["edge"] = edge
        sim = Simulation(parse_config(cfg), tmp_path / str(edge), progress=False)
        start = {k: v.copy() for k, v in sim.global_state.items()}
        sim.run()
        runs[edge] = sim
    lit, edg = runs[False], runs[True]
    assert [c.edge for c in edg.fed.clients] == [False, True]
    for k, v in lit.global_state.items():
        np.testing.assert_allclose(edg.global_state[k], v, rtol=0, atol=1e-5, err_msg=k)
        assert not np.allclose(v, start[k], atol=1e-4), k  # the round trained every key
    for k, v in lit.pool.stores["c01"].local.items():  # the device's heads, too
        np.testing.assert_allclose(edg.pool.stores["c01"].local[k], v, rtol=0, atol=1e-5, err_msg=k)
