"""Training-step graphs in onnxruntime vs torch.optim.SGD: 5 steps, every parameter and
running statistic, every family at widths 1 and 0.25; and the head-only step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_helpers import CONFIGS, IDS, KINDS, Exports, random_batch

from export import export_head_step
from export.parity import head_step_parity, train_step_parity
from fmtl_lightning.models import head_name

LR = 0.05
# varying sizes exercise the dynamic batch axis; none is 1 (batch norm needs 2+ values)
SIZES = (8, 5, 16, 3, 8)


@pytest.mark.parametrize(("family", "norm", "width"), CONFIGS, ids=IDS)
def test_five_sgd_steps_match_torch(exports: Exports, family: str, norm: str, width: float) -> None:
    model, info = exports.step(family, norm, width)
    batches = [random_batch(b, seed) for seed, b in enumerate(SIZES)]
    res = train_step_parity(model, info, batches, LR)
    assert set(res.max_abs) == set(model.state_dict())
    assert res.worst <= 1e-5, sorted(res.max_abs.items(), key=lambda kv: -kv[1])[:3]
    np.testing.assert_allclose(res.ort_losses, res.torch_losses, rtol=1e-5)
    counters = [k for k in res.max_abs if k.endswith("num_batches_tracked")]
    assert all(res.max_abs[k] == 0.0 for k in counters)  # exact: start + 5


def test_step_info_names_and_order(exports: Exports) -> None:
    model, info = exports.step("cnn", "batch", 0.25)
    sd = model.state_dict()
    params = [k for k, _ in model.named_parameters()]
    buffers = [k for k, _ in model.named_buffers()]
    assert list(info.param_inputs.values()) == params
    assert list(info.buffer_inputs.values()) == buffers
    assert list(info.param_outputs.values()) == params
    assert list(info.buffer_outputs.values()) == buffers
    assert info.target_inputs == {t: f"y_{head_name(t)}" for t in KINDS}
    names = [i.name for i in info.inputs]
    assert names == [
        *info.param_inputs,
        *info.buffer_inputs,
        "x",
        *info.target_inputs.values(),
        "lr",
    ]
    assert [o.name for o in info.outputs] == ["loss", *info.param_outputs, *info.buffer_outputs]
    by_name = {i.name: i for i in info.inputs}
    assert by_name["x"].shape == ("batch", 1, 28, 28)
    assert by_name["y_mnist__digit"].shape == ("batch",)
    assert by_name["y_mnist__digit"].dtype == "int64"
    assert by_name["y_mnist__attrs"].shape == ("batch", 3)
    assert by_name["lr"].shape == () and by_name["lr"].dtype == "float32"
    for n, k in info.param_inputs.items():
        assert by_name[n].shape == tuple(sd[k].shape) and by_name[n].dtype == "float32"
    counter = next(n for n, k in info.buffer_inputs.items() if k.endswith("num_batches_tracked"))
    assert by_name[counter].dtype == "int64"


@pytest.mark.parametrize("kind", ["multiclass", "multilabel", "regression"])
def test_head_step_matches_torch(tmp_path, kind: str) -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(12, 4)
    info = export_head_step(head, kind, tmp_path / "head_step.onnx", 12)
    assert [i.name for i in info.inputs] == ["p_weight", "p_bias", "features", "y", "lr"]
    assert [o.name for o in info.outputs] == ["loss", "new_p_weight", "new_p_bias"]
    assert info.param_inputs == {"p_weight": "weight", "p_bias": "bias"}
    g = torch.Generator().manual_seed(1)
    batches = []
    for b in SIZES:
        f = torch.randn(b, 12, generator=g)
        if kind == "multiclass":
            y = torch.randint(0, 4, (b,), generator=g)
        elif kind == "multilabel":
            y = torch.randint(0, 2, (b, 4), generator=g).float()
        else:  # regression: any real values
            y = torch.randn(b, 4, generator=g) * 3
        batches.append((f, y))
    res = head_step_parity(head, info, batches, LR)
    assert res.worst <= 1e-6, res.max_abs
    np.testing.assert_allclose(res.ort_losses, res.torch_losses, rtol=1e-6)
