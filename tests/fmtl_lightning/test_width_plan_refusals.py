"""Width plans: every refusal is a WidthPlanError naming the layer (and the escape hatch,
``not_scaled``, works); blocked and concatenated axes in the ModelSpec."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fmtl_lightning.errors import FMTLError, SpecError, WidthPlanError
from fmtl_lightning.roles import ModelSpec, ParamSpec, WidthSpec
from fmtl_lightning.width_build import build_at_width, plan_spec
from fmtl_lightning.width_plan import infer_plan
from fmtl_lightning.zoo import ZOO, LeNet


# ----------------------------------------------------------------- refusals
def _conv_then(layer: nn.Module, c: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), layer)


@pytest.mark.parametrize(
    ("model", "pattern"),
    [
        (_conv_then(nn.Conv2d(8, 16, 3, groups=4)), r"layer '1' \(Conv2d\): a grouped conv with in_channels != out"),
        (_conv_then(nn.Conv2d(8, 16, 3, groups=8)), r"layer '1' \(Conv2d\): a depthwise conv with a channel multiplier"),
        (_conv_then(nn.PReLU(8)), r"layer '1' \(PReLU\): PReLU is not known to the width plan; pass '1' in not_scaled"),
        (_conv_then(nn.ConvTranspose2d(8, 4, 2)), r"layer '1' \(ConvTranspose2d\)"),
        (_conv_then(nn.BatchNorm2d(8, affine=False, track_running_stats=False)), r"layer '1' \(BatchNorm2d\): has no parameters"),
        (_conv_then(nn.LayerNorm([8, 4, 4])), r"layer '1' \(LayerNorm\): normalizes over several dims"),
    ],
)  # fmt: skip
def test_unsupported_layers_are_refused_by_name(model: nn.Module, pattern: str) -> None:
    with pytest.raises(WidthPlanError, match=pattern):
        infer_plan(model, torch.randn(2, 3, 4, 4))
    groups, _ = infer_plan(model, torch.randn(2, 3, 4, 4), not_scaled=["1"])  # the escape hatch
    assert groups == {}  # the conv's output feeds the full-width layer: it cannot scale


class _CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.kv = nn.Linear(4, 8), nn.Linear(4, 6)
        self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 4)
        kv = self.kv(x)
        return self.attn(self.q(x), kv, kv)[0]


def test_attention_with_other_key_dims_refused_unless_not_scaled() -> None:
    x = torch.randn(2, 5, 4)
    with pytest.raises(
        WidthPlanError,
        match=r"layer 'attn' \(MultiheadAttention\): .*kdim.*pass 'attn' in not_scaled",
    ):
        infer_plan(_CrossAttention(), x)
    groups, decl = infer_plan(_CrossAttention(), x, not_scaled=["attn"])
    assert groups == {} and decl["attn.k_proj_weight"] == ("backbone", (None, None), ())
    assert issubclass(WidthPlanError, FMTLError)


class _CatFlat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Linear(128, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.cat([self.a(x), self.b(x)], dim=1).flatten(1))


class _Cumsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(self.a(torch.cumsum(x, 1)), 1)  # fine on the fixed input only


class _HardCodedView(LeNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(
            torch.relu(self.conv2(torch.max_pool2d(torch.relu(self.conv1(x)), 2))), 2
        )
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.view(-1, 256))))))


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) if x.sum() > 0 else -self.a(x)


@pytest.mark.parametrize(
    ("model", "shape", "pattern"),
    [
        (_CatFlat(), (2, 3, 4, 4), r"op 'flatten' \(node 'flatten', in the model's own forward\): flattens concatenated channels"),
        (_Cumsum(), (2, 3, 4, 4), r"op 'cumsum' \(node 'cumsum_1'.*cannot follow"),
        (_HardCodedView(), (2, 1, 28, 28), r"op 'view'.*hard-codes size 256"),
        (_Branchy(), (2, 3), r"torch.fx cannot trace _Branchy"),
    ],
)  # fmt: skip
def test_unsupported_ops_are_refused_by_name(model: nn.Module, shape: tuple, pattern: str) -> None:
    with pytest.raises(WidthPlanError, match=pattern):
        infer_plan(model, torch.randn(*shape), heads=["fc3"] if isinstance(model, LeNet) else ())


def test_unknown_module_names_are_refused() -> None:
    with pytest.raises(WidthPlanError, match=r"heads: \['head'\] are not submodules of TabularMLP"):
        infer_plan(ZOO["mlp"].build(1.0), torch.randn(2, 12), heads=["head"])
    with pytest.raises(WidthPlanError, match=r"not_scaled: \['fc9'\]"):
        infer_plan(ZOO["mlp"].build(1.0), torch.randn(2, 12), not_scaled=["fc9"])


def test_group_norm_that_would_not_divide_is_refused_at_build() -> None:
    model = nn.Sequential(nn.Conv2d(3, 12, 1), nn.GroupNorm(4, 12))
    groups, decl = infer_plan(model, torch.randn(2, 3, 4, 4))
    assert build_at_width(model, groups, decl, 1 / 3)[1].num_groups == 4  # 4 channels: fine
    with pytest.raises(WidthPlanError, match=r"layer '1' \(GroupNorm, 4 groups\): 6 channels"):
        build_at_width(model, groups, decl, 0.5)


def test_plan_spec_refuses_mismatched_declarations() -> None:
    model = ZOO["mlp"].build(1.0)
    groups, decl = infer_plan(model, torch.randn(2, 12), heads=["heads"])
    del decl["fc1.bias"]
    with pytest.raises(WidthPlanError, match=r"undeclared \['fc1.bias'\]"):
        plan_spec(model, groups, decl)


def test_infer_plan_leaves_the_model_untouched() -> None:
    model = ZOO["resnet"].build(1.0).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _ = infer_plan(model, torch.randn(4, 3, 16, 16), heads=["linear"])
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # no running-stat update while shapes propagate


# ----------------------------------------------------------------- blocked axes in the spec
def test_segments_in_model_spec_json_and_validation() -> None:
    p = ParamSpec("w", "backbone", (9,), ("cat(a,3)",))
    segs = {"cat(a,3)": (("a", 6), (None, 3))}
    spec = ModelSpec(groups={"a": 6, "cat(a,3)": 9}, params=(p,), segments=segs)
    ws = WidthSpec(0.5, "fedrolex", 4)
    assert spec.shape_at("w", ws) == (6,) and spec.runs("cat(a,3)", ws) == [
        (4, 6, 0),
        (0, 1, 2),
        (6, 9, 3),
    ]
    assert ModelSpec.from_json(spec.to_json()).segments == segs
    with pytest.raises(SpecError, match=r"concatenated group 'cat\(a,3\)'"):
        ModelSpec(
            groups={"a": 6, "cat(a,3)": 9},
            params=(p,),
            segments={"cat(a,3)": (("a", 5), (None, 4))},
        )


def test_blocks_in_model_spec_json_and_validation() -> None:
    p = ParamSpec("w", "backbone", (3, 8), (None, "g"), blocks=(1, 4))
    spec = ModelSpec(groups={"g": 2}, params=(p,))
    assert spec.shape_at("w", 0.5) == (3, 4)
    back = ModelSpec.from_json(spec.to_json())
    assert back["w"].blocks == (1, 4)
    assert (
        "blocks"
        not in json.loads(
            ModelSpec(groups={"g": 2}, params=(ParamSpec("b", "backbone", (2,), ("g",)),)).to_json()
        )["params"][0]
    )  # specs without blocks serialise as before
    with pytest.raises(SpecError, match="key 'w': blocks"):
        ParamSpec("w", "backbone", (3, 8), (None, "g"), blocks=(2, 4))
    with pytest.raises(SpecError, match="channels x block 3"):
        ModelSpec(
            groups={"g": 2},
            params=(ParamSpec("w", "backbone", (3, 8), (None, "g"), blocks=(1, 3)),),
        )
