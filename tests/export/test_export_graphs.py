"""Graph hygiene: ONNX checker, default-domain ops only, no baked weights, .ort parity."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from export_helpers import KINDS, Exports, random_batch

from export import ExportError, to_ort_format
from export.graphs import op_types, sanitize, unique_names
from export.parity import _run, session


def _all_paths(exports: Exports) -> list[str]:
    _, bb, heads = exports.inference("cnn", "batch", 0.25)
    _, step = exports.step("dwcnn", "batch", 0.25)
    return [bb.path, *(h.path for h in heads.values()), step.path]


def test_checker_and_default_domain_only(exports: Exports) -> None:
    for path in _all_paths(exports):
        model = onnx.load(path)
        onnx.checker.check_model(model, full_check=True)
        assert {o.domain: o.version for o in model.opset_import}.get("", 0) >= 18
        ops = op_types(path)
        assert ops and all(op.startswith("::") for op in ops), (path, ops)


def test_step_graph_has_no_weight_initializers(exports: Exports) -> None:
    _, info = exports.step("cnn", "group", 1.0)
    model = onnx.load(info.path)
    floats = [
        i.name
        for i in model.graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT and int(np.prod(i.dims)) > 1
    ]
    assert floats == []
    # convolution backward became forward convolutions (grad-input: ConvTranspose)
    assert {"::Conv", "::ConvTranspose"} <= op_types(info.path)


def test_batchnorm_step_is_in_training_mode(exports: Exports) -> None:
    """An inference-mode BatchNormalization node would be the silent exporter pitfall."""
    _, info = exports.step("cnn", "batch", 1.0)
    assert "::BatchNormalization" not in op_types(info.path)


def test_ort_format_gives_the_same_outputs(exports: Exports) -> None:
    model, info = exports.step("cnn", "batch", 0.25)
    (ort_path,) = to_ort_format([info.path])
    assert ort_path.suffix == ".ort" and ort_path.is_file()
    x, ys = random_batch(6, seed=3)
    sd = model.state_dict()
    feeds = {n: sd[k].numpy() for n, k in {**info.param_inputs, **info.buffer_inputs}.items()}
    feeds.update({info.target_inputs[t]: ys[t].numpy() for t in KINDS})
    feeds.update(x=x.numpy(), lr=np.asarray(0.05, dtype=np.float32))
    want = _run(session(info.path), feeds)
    got = _run(session(ort_path), feeds)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_names_are_sanitized_and_collisions_raise() -> None:
    assert sanitize("heads.mnist__digit.weight") == "heads_mnist__digit_weight"
    assert unique_names("p_", ["a.b", "c"]) == {"p_a_b": "a.b", "p_c": "c"}
    with pytest.raises(ExportError, match="both map"):
        unique_names("p_", ["a.b", "a_b"])


def test_bad_task_kind_raises(tmp_path) -> None:
    from export_helpers import make_model

    from export import export_train_step

    model = make_model("mlp", "none", 0.25)
    with pytest.raises(ExportError, match="kind must be one of"):
        export_train_step(
            model, {"mnist/digit": "ranking"}, tmp_path / "s.onnx", torch.zeros(1, 1, 28, 28)
        )
    with pytest.raises(ExportError, match="no head"):
        export_train_step(
            model, {"other": "multiclass"}, tmp_path / "s.onnx", torch.zeros(1, 1, 28, 28)
        )
