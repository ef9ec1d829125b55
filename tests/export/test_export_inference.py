"""Backbone -> head in onnxruntime vs torch eval, for every family at widths 1 and 0.25."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_helpers import CONFIGS, IDS, TASKS, Exports

from export.parity import inference_parity
from fmtl_lightning.models import head_name

BATCHES = (1, 3, 32)


@pytest.mark.parametrize(("family", "norm", "width"), CONFIGS, ids=IDS)
def test_backbone_then_head_matches_torch_eval(
    exports: Exports, family: str, norm: str, width: float
) -> None:
    model, bb, heads = exports.inference(family, norm, width)
    for b in BATCHES:
        x = torch.randn(b, 1, 28, 28, generator=torch.Generator().manual_seed(b))
        errs = inference_parity(model, bb, heads, x)
        assert max(errs.values()) <= 1e-5, (b, errs)


@pytest.mark.parametrize(
    ("family", "norm", "width"), [("cnn", "batch", 0.25), ("mlp", "none", 1.0)]
)
def test_weights_as_inputs_matches_torch_eval_and_maps_every_key(
    exports: Exports, family: str, norm: str, width: float
) -> None:
    model, bb, heads = exports.inference(family, norm, width, weights_as_inputs=True)
    float_keys = {k for k, v in model.backbone.state_dict().items() if v.is_floating_point()}
    assert set(bb.weights.values()) == float_keys
    assert [i.name for i in bb.inputs] == [*bb.weights, "x"]
    for t in TASKS:
        assert set(heads[t].weights.values()) == {"weight", "bias"}
    for b in BATCHES:
        x = torch.randn(b, 1, 28, 28, generator=torch.Generator().manual_seed(b))
        assert max(inference_parity(model, bb, heads, x).values()) <= 1e-5


def test_feeding_other_weights_changes_the_output(exports: Exports) -> None:
    """With weights as inputs the file bakes nothing in: new weights, new features."""
    model, bb, heads = exports.inference("cnn", "batch", 0.25, weights_as_inputs=True)
    other = type(model)(model.cfg, TASKS, model.width)  # fresh init, different weights
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert max(inference_parity(other, bb, heads, x).values()) <= 1e-5
    with torch.no_grad():
        assert not np.allclose(model(x)["mnist/digit"].numpy(), other(x)["mnist/digit"].numpy())


@pytest.mark.parametrize(("family", "norm", "width"), CONFIGS[:2], ids=IDS[:2])
def test_info_lists_names_shapes_dtypes(
    exports: Exports, family: str, norm: str, width: float
) -> None:
    model, bb, heads = exports.inference(family, norm, width)
    f = model.backbone.feature_dim
    assert [(i.name, i.shape, i.dtype) for i in bb.inputs] == [
        ("x", ("batch", 1, 28, 28), "float32")
    ]
    assert [(o.name, o.shape, o.dtype) for o in bb.outputs] == [
        ("features", ("batch", f), "float32")
    ]
    assert bb.kind == "backbone" and bb.opset >= 18 and not bb.weights_as_inputs
    for t, n in TASKS.items():
        h = heads[t]
        assert h.kind == "head"
        assert [(i.name, i.shape) for i in h.inputs] == [("features", ("batch", f))]
        assert [(o.name, o.shape) for o in h.outputs] == [("logits", ("batch", n))]
        assert model.heads[head_name(t)].out_features == n


@pytest.fixture(scope="module")
def mnist_images() -> torch.Tensor:
    from fmtl_lightning.data import load_mnist

    ds = load_mnist("test")
    x = (ds.images[:32].astype(np.float32) / 255.0 - ds.mean) / ds.std
    return torch.from_numpy(x[:, None].copy())  # (32, 1, 28, 28), real digits


@pytest.mark.parametrize(("family", "norm", "width"), CONFIGS, ids=IDS)
def test_backbone_then_head_matches_torch_on_real_mnist(
    exports: Exports, mnist_images: torch.Tensor, family: str, norm: str, width: float
) -> None:
    model, bb, heads = exports.inference(family, norm, width)
    for b in BATCHES:
        errs = inference_parity(model, bb, heads, mnist_images[:b])
        assert max(errs.values()) <= 1e-5, (b, errs)
