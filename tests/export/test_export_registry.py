"""Our exports share torch.onnx's ATen -> ONNX registry (``shared_torchlib_registry``):
the graphs are the same bytes as with a registry built per export, the registry is built
once per opset, and nothing outside our exports ever sees the shared one."""

from __future__ import annotations

import contextlib

import onnx
import pytest
import torch
from torch import nn

from export import graphs, inference
from export.graphs import shared_torchlib_registry

_registration = pytest.importorskip("torch.onnx._internal.exporter._registration")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )


def _export_both(tmp, tag: str) -> list[bytes]:
    """A backbone graph (``inference``'s export) and a traced pure function
    (``export_pure_function``: what the step graphs go through) of the same weights."""
    m = _model()
    inference.export_backbone(m, tmp / f"bb_{tag}.onnx", torch.zeros(1, 1, 8, 8), 18)
    w, b = m[-1].weight.detach(), m[-1].bias.detach()
    graphs.export_pure_function(
        lambda w, b, x: torch.softmax(x @ w.T + b, dim=1),
        [w, b, torch.zeros(13, w.shape[1])], {2}, ["w", "b", "x"], ["p"],
        tmp / f"fn_{tag}.onnx", 18,
    )  # fmt: skip
    return [onnx.load(tmp / f"{g}_{tag}.onnx").SerializeToString() for g in ("bb", "fn")]


def test_shared_registry_gives_the_same_graphs_and_is_built_once_per_opset(tmp_path, monkeypatch):
    built = []
    original = _registration.ONNXRegistry.__dict__["from_torchlib"]

    def counting(cls, opset_version=18):
        built.append(opset_version)
        return original.__func__(cls, opset_version)

    monkeypatch.setattr(_registration.ONNXRegistry, "from_torchlib", classmethod(counting))
    monkeypatch.setattr(graphs, "_REGISTRIES", {})
    shared = _export_both(tmp_path, "shared")
    assert built == [18]  # two torch.onnx.export calls, one registry

    # the same exports, each building its own registry as torch does by default
    monkeypatch.setattr(inference, "shared_torchlib_registry", contextlib.nullcontext)
    monkeypatch.setattr(graphs, "shared_torchlib_registry", contextlib.nullcontext)
    built.clear()
    fresh = _export_both(tmp_path, "fresh")
    assert len(built) >= 2
    assert shared == fresh


def test_the_shared_registry_never_leaves_the_block():
    cls = _registration.ONNXRegistry
    before = cls.__dict__["from_torchlib"]
    with shared_torchlib_registry():
        a, b = cls.from_torchlib(18), cls.from_torchlib(18)
        assert a is b
    assert cls.__dict__["from_torchlib"] is before
    outside = cls.from_torchlib(18)  # a caller's own export, e.g. with custom translations
    assert outside is not a
    with pytest.raises(ValueError), shared_torchlib_registry():
        raise ValueError("an export that fails")
    assert cls.__dict__["from_torchlib"] is before  # restored on the way out of an error
