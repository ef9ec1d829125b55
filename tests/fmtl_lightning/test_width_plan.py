"""Width plans inferred from traced models: the zoo at widths 1, 1/2, 1/4 (HeteroFL and
FedRolex) against models built directly at that width, hand-checked couplings, and the
built-in families (planned by the same inference). Refusals: test_width_plan_refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fmtl_lightning.errors import WidthPlanError
from fmtl_lightning.layers import FlattenLinear
from fmtl_lightning.models import load_arrays, state_arrays
from fmtl_lightning.roles import WidthSpec, channels_at
from fmtl_lightning.slicing import slice_state
from fmtl_lightning.width_build import build_at_width, plan_spec
from fmtl_lightning.width_plan import infer_plan
from fmtl_lightning.zoo import ZOO, TinyViT

WIDTHS = (1.0, 0.5, 0.25)
MODES = ("heterofl", "fedrolex")


def _plan(name: str) -> tuple[nn.Module, torch.Tensor, dict, dict]:
    e = ZOO[name]
    torch.manual_seed(0)
    model = e.build(1.0)
    x = e.example(3)
    groups, decl = infer_plan(model, x, heads=e.heads, not_scaled=e.not_scaled)
    return model, x, groups, decl


def _out(y: torch.Tensor | dict) -> torch.Tensor:
    return torch.cat([v.flatten(1) for v in y.values()], 1) if isinstance(y, dict) else y


def _randomize_stats(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics, so eval-mode forwards exercise their slices."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_at_width_matches_direct_build(name: str, width: float, mode: str) -> None:
    model, x, groups, decl = _plan(name)
    _randomize_stats(model)
    ws = WidthSpec(width, mode, round_idx=5)
    direct = ZOO[name].build(width).eval()  # the zoo's own width argument: independent
    if name == "vit" and mode == "fedrolex" and width < 1:
        # a rolling window cuts through attention heads: refused, and with the attention
        # kept at full width only the MLPs scale (and roll)
        with pytest.raises(WidthPlanError, match=r"'blocks.0.attn' \(MultiheadAttention, heads"):
            build_at_width(model, groups, decl, ws)
        attn = ("blocks.0.attn", "blocks.1.attn")
        groups, decl = infer_plan(model, x, heads=["head"], not_scaled=attn)
        direct = TinyViT(mlp=channels_at(32, width)).eval()
    spec = plan_spec(model, groups, decl)
    sub = build_at_width(model, groups, decl, ws).eval()
    for key, t in sub.state_dict().items():
        assert tuple(t.shape) == spec.shape_at(key, ws), key
    load_arrays(direct, slice_state(state_arrays(model), spec, ws))
    assert set(direct.state_dict()) == set(sub.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(_out(sub(x)), _out(direct(x)), atol=1e-6, rtol=0)
    sub.train()
    direct.train()
    torch.manual_seed(7)
    y_sub = _out(sub(x))
    torch.manual_seed(7)
    torch.testing.assert_close(y_sub, _out(direct(x)), atol=1e-6, rtol=0)  # batch stats, dropout


@pytest.mark.parametrize("name", sorted(ZOO))
def test_width_one_is_the_full_model(name: str) -> None:
    model, x, groups, decl = _plan(name)
    model.eval()
    sub = build_at_width(model, groups, decl, WidthSpec(1.0, "fedrolex", 3)).eval()
    with torch.no_grad():
        assert torch.equal(_out(sub(x)), _out(model(x)))
    for key, t in model.state_dict().items():
        assert torch.equal(sub.state_dict()[key], t), key


@settings(max_examples=12, deadline=None)
@given(
    width=st.floats(0.05, 1.0),
    round_idx=st.integers(0, 200),
    name=st.sampled_from(["lenet", "resnet", "mobilenetv2", "seqconv"]),
)
def test_any_width_and_window(width: float, round_idx: int, name: str) -> None:
    model, x, groups, decl = _plan(name)
    ws = WidthSpec(width, "fedrolex", round_idx)
    spec = plan_spec(model, groups, decl)
    try:
        sub = build_at_width(model, groups, decl, ws).eval()
    except WidthPlanError as exc:  # only GroupNorm(4, .) may refuse an odd channel count
        assert name == "seqconv" and "'gn2' (GroupNorm, 4 groups)" in str(exc)
        return
    direct = ZOO[name].build(width).eval()
    load_arrays(direct, slice_state(state_arrays(model), spec, ws))
    with torch.no_grad():
        torch.testing.assert_close(sub(x), direct(x), atol=1e-6, rtol=0)


# ----------------------------------------------------------------- hand-checked plans
def test_resnet_residual_adds_couple_groups() -> None:
    _, _, groups, decl = _plan("resnet")
    # stage 0: stem conv, block conv2 and the identity shortcut share one group;
    # stage 1: block conv2 and the 1x1 shortcut conv share one group (first creator names it)
    assert groups == {"conv1": 8, "layers.0.conv1": 8, "layers.1.conv1": 16, "layers.1.conv2": 16}
    assert decl["layers.0.conv2.weight"].axes == ("conv1", "layers.0.conv1", None, None)
    assert decl["layers.1.shortcut.0.weight"].axes == ("layers.1.conv2", "conv1", None, None)
    assert decl["layers.1.shortcut.1.running_var"] == ("norm_stat", ("layers.1.conv2",), ())
    assert decl["conv1.weight"].axes == ("conv1", None, None, None)  # input channels fixed
    assert decl["linear.weight"] == ("head", (None, "layers.1.conv2"), ())


def test_mobilenet_depthwise_and_inverted_residual() -> None:
    _, _, groups, decl = _plan("mobilenetv2")
    # depthwise conv: output = input group; its weight's dim 1 (size 1) never scales
    assert decl["features.4.conv.3.weight"].axes == ("features.4.conv.0", None, None, None)
    # the second t=4 block's residual add couples its projection with the first block's
    assert decl["features.5.conv.6.weight"].axes == (
        "features.4.conv.6",
        "features.5.conv.0",
        None,
        None,
    )
    assert groups["features.4.conv.6"] == 12 and groups["features.4.conv.0"] == 32


def test_flatten_into_linear_is_a_blocked_axis() -> None:
    model, _, groups, decl = _plan("lenet")
    assert groups == {"conv1": 6, "conv2": 16, "fc1": 120, "fc2": 84}
    assert decl["fc1.weight"] == ("backbone", ("fc1", "conv2"), (1, 16))
    spec = plan_spec(model, groups, decl)
    ws = WidthSpec(0.5, "fedrolex", round_idx=13)  # window wraps: channels 13, 14, 15, 0, ...
    assert spec.shape_at("fc1.weight", ws) == (60, 128)
    full = model.fc1.weight.detach().numpy()
    rows, chans = ws.indices(120), ws.indices(16)
    cols = (chans[:, None] * 16 + np.arange(16)[None, :]).ravel()  # whole 4x4 maps per channel
    sub = slice_state({"fc1.weight": full}, spec, ws)["fc1.weight"]
    np.testing.assert_array_equal(sub, full[rows][:, cols])


def test_tabular_mlp_heads_and_kinds() -> None:
    _, _, groups, decl = _plan("mlp")
    assert groups == {"fc1": 32, "fc2": 16}
    assert decl["fc1.weight"] == ("backbone", ("fc1", None), ())  # input features fixed
    assert decl["bn1.weight"].kind == "norm" and decl["bn1.running_mean"].kind == "norm_stat"
    assert decl["bn1.num_batches_tracked"] == ("counter", (), ())
    assert decl["heads.risk.weight"] == ("head", (None, "fc2"), ())
    assert decl["heads.score.bias"] == ("head", (None,), ())


def test_vit_attention_scales_by_whole_heads() -> None:
    model, x, groups, decl = _plan("vit")
    qkv = "cat(patch_embed,patch_embed,patch_embed)"  # in_proj stacks q, k, v projections
    assert groups == {
        "patch_embed": 16, "blocks.0.mlp.0": 32, "blocks.1.mlp.0": 32,
        qkv: (("patch_embed", 16),) * 3,
    }  # fmt: skip
    assert decl["blocks.1.attn.in_proj_weight"].axes == (qkv, "patch_embed")
    assert decl["blocks.1.attn.out_proj.weight"].axes == ("patch_embed", "patch_embed")
    assert decl["pos_embed"].axes == (None, None, "patch_embed")  # get_attr parameter
    assert decl["cls_token"].axes == (None, None, "patch_embed")
    assert decl["head.weight"] == ("head", (None, "patch_embed"), ())
    sub = build_at_width(model, groups, decl, 0.5)
    assert (sub.blocks[0].attn.num_heads, sub.blocks[0].attn.embed_dim) == (2, 8)
    with pytest.raises(
        WidthPlanError,
        match=r"'blocks.0.attn' \(MultiheadAttention, heads of 4 channels\): 5 channels",
    ):
        build_at_width(model, groups, decl, 0.3)


def test_vit_scales_only_the_mlp_when_attention_is_not_scaled() -> None:
    e = ZOO["vit"]
    attn = ["blocks.0.attn", "blocks.1.attn"]
    groups, decl = infer_plan(e.build(1.0), e.example(2), heads=e.heads, not_scaled=attn)
    assert groups == {"blocks.0.mlp.0": 32, "blocks.1.mlp.0": 32}
    assert decl["blocks.0.mlp.2.weight"].axes == (None, "blocks.0.mlp.0")
    assert decl["pos_embed"].axes == (None, None, None)  # get_attr parameter, coupled to fixed D
    assert decl["blocks.0.norm1.weight"] == ("norm", (None,), ())
    assert decl["blocks.0.attn.in_proj_weight"] == ("backbone", (None, None), ())


def test_kinds_come_from_types_not_names() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Conv2d(1, 4, 3)  # named "head" but not declared a head
            self.fc_norm = nn.GroupNorm(2, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.fc_norm(self.head(x)).mean((2, 3)))

    groups, decl = infer_plan(Net(), torch.randn(2, 1, 6, 6), heads=["out"])
    assert groups == {"head": 4}
    assert decl["head.weight"].kind == "backbone" and decl["fc_norm.bias"].kind == "norm"
    assert decl["out.weight"] == ("head", (None, "head"), ())


def test_residual_add_couples_two_convs_into_one_group() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = (
                nn.Conv2d(3, 8, 1),
                nn.Conv2d(3, 8, 3, padding=1),
                nn.Conv2d(8, 5, 1),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.relu(self.a(x) + self.b(x)))

    groups, decl = infer_plan(Net(), torch.randn(1, 3, 5, 5))
    assert groups == {"a": 8, "c": 5}  # the model output is not a head: it may scale
    assert decl["b.weight"].axes == ("a", None, None, None)
    assert decl["c.weight"].axes == ("c", "a", None, None)


def test_concatenation_makes_a_segmented_group() -> None:
    model, _, groups, decl = _plan("densenet")
    c1 = "cat(conv0,dense.0.conv)"
    c2 = "cat(conv0,dense.0.conv,dense.1.conv)"
    assert groups == {
        "conv0": 8, "dense.0.conv": 4, "dense.1.conv": 4, "transition": 16,
        c1: (("conv0", 8), ("dense.0.conv", 4)),
        c2: (("conv0", 8), ("dense.0.conv", 4), ("dense.1.conv", 4)),
    }  # fmt: skip
    assert decl["dense.1.bn.running_mean"] == ("norm_stat", (c1,), ())
    assert decl["dense.1.conv.weight"].axes == ("dense.1.conv", c1, None, None)
    assert decl["transition.weight"].axes == ("transition", c2, None, None)
    spec = plan_spec(model, groups, decl)
    ws = WidthSpec(0.5, "fedrolex", round_idx=7)  # windows wrap inside each segment
    assert spec.shape_at("transition.weight", ws) == (8, 8, 1, 1)
    full = model.transition.weight.detach().numpy()
    cols = np.concatenate([ws.indices(8), 8 + ws.indices(4), 12 + ws.indices(4)])
    sub = slice_state({"transition.weight": full}, spec, ws)["transition.weight"]
    np.testing.assert_array_equal(sub, full[ws.indices(16)][:, cols])


def test_concatenation_along_a_fixed_dim_and_of_fixed_channels() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(7, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # input channels stay full width
            return self.c(torch.cat([x, self.a(x)], dim=1))

    groups, decl = infer_plan(Net(), torch.randn(2, 3, 4, 4), heads=["c"])
    assert groups == {"a": 4, "cat(3,a)": ((None, 3), ("a", 4))}
    sub = build_at_width(Net(), groups, decl, 0.25)
    assert tuple(sub.c.weight.shape) == (2, 4, 1, 1) and sub.c.in_channels == 4


def test_not_scaled_layer_keeps_its_channels() -> None:
    model = ZOO["lenet"].build(1.0)
    x = torch.randn(2, 1, 28, 28)
    groups, decl = infer_plan(model, x, heads=["fc3"], not_scaled=["fc2"])
    assert groups == {"conv1": 6, "conv2": 16}  # fc2's input (fc1's output) and output are fixed
    assert decl["fc2.weight"].axes == (None, None)
    assert decl["fc1.weight"] == ("backbone", (None, "conv2"), (1, 16))
    assert decl["fc3.weight"] == ("head", (None, None), ())
    sub = build_at_width(model, groups, decl, 0.5)
    assert (sub.conv2.out_channels, sub.fc1.in_features, sub.fc1.out_features) == (8, 128, 120)


def test_grouped_conv_with_equal_in_out_scales_its_group_count() -> None:
    class Net(nn.Module):
        def __init__(self, width: float = 1.0) -> None:
            super().__init__()
            c = max(1, int(16 * width))
            self.a = nn.Conv2d(2, c, 1)
            self.g = nn.Conv2d(c, c, 3, padding=1, groups=c // 4)  # 4 channels per group

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.g(self.a(x))

    model, x = Net(), torch.randn(2, 2, 5, 5)
    groups, decl = infer_plan(model, x)
    assert decl["g.weight"].axes == ("a", None, None, None)
    sub = build_at_width(model, groups, decl, 0.5)
    assert sub.g.groups == 2 and sub.g.in_channels == 8
    direct = Net(0.5)
    load_arrays(direct, slice_state(state_arrays(model), plan_spec(model, groups, decl), 0.5))
    torch.testing.assert_close(sub(x), direct(x), atol=1e-6, rtol=0)
    with pytest.raises(WidthPlanError, match=r"layer 'g' \(grouped conv.*FedRolex"):
        build_at_width(model, groups, decl, WidthSpec(0.5, "fedrolex", 1))
    with pytest.raises(WidthPlanError, match=r"layer 'g' \(grouped conv, 4 channels per group\)"):
        build_at_width(model, groups, decl, 0.3)  # ceil(4.8) = 5 channels: not whole groups


def test_flatten_linear_module_is_supported() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = FlattenLinear(4, 2, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x))

    groups, decl = infer_plan(Net(), torch.randn(2, 1, 4, 4))
    assert decl["fc.weight"].axes == ("fc", "conv", None, None)
    sub = build_at_width(Net(), groups, decl, 0.5)
    assert tuple(sub.fc.weight.shape) == (3, 2, 2, 2)


# ----------------------------------------------------------------- the built-in families
BUILTIN = [
    ("mlp", "none", False),
    ("cnn", "group", True),
    ("cnn", "batch", False),
    ("cnn", "static_batch", True),
    ("dwcnn", "batch", True),
    ("fedavgcnn", "group", False),
]


# hand-checked axes of a few built-in tensors ((family, scaler): a Scaler shifts the indices)
BUILTIN_AXES = {
    ("mlp", False): {
        "backbone.layers.1.weight": ("h0", None),
        "backbone.layers.3.weight": ("h1", "h0"),
    },
    ("cnn", False): {"backbone.layers.4.weight": ("h1", "h0", None, None)},
    ("cnn", True): {"backbone.layers.5.weight": ("h1", "h0", None, None)},
    ("dwcnn", True): {
        "backbone.layers.4.weight": ("h0", None, None, None),  # depthwise: in == out
        "backbone.layers.7.weight": ("h1", "h0", None, None),  # pointwise
    },
    ("fedavgcnn", False): {"backbone.layers.8.weight": ("h2", "h1", None, None)},  # FlattenLinear
}


@pytest.mark.parametrize(("family", "norm", "scaler"), BUILTIN)
def test_builtin_families_are_planned_like_user_models(
    family: str, norm: str, scaler: bool
) -> None:
    """The built-ins' plan is infer_plan's (groups named h0.. after cfg.hidden); a model
    built directly at a width equals build_at_width of the full model on that plan."""
    from fmtl_lightning.models import BackboneConfig, MultiTaskModel, model_spec

    cfg = BackboneConfig(family=family, norm=norm, scaler=scaler)  # type: ignore[arg-type]
    tasks = {"digits/digit": 10, "digits/parity": 2}
    torch.manual_seed(0)
    model = MultiTaskModel(cfg, tasks)
    x = torch.randn(3, 1, 28, 28)
    spec = model_spec(cfg, tasks)
    assert spec.groups == cfg.groups()
    decl = model.declarations
    assert set(decl) == set(model.state_dict())
    last = cfg.feature_group
    assert decl["heads.digits__digit.weight"][:2] == ("head", (None, last))
    for key, axes in BUILTIN_AXES[(family, scaler)].items():
        assert decl[key][1] == axes, key
    inferred, _ = infer_plan(model, x, heads=["heads"])
    assert list(inferred.values()) == list(cfg.groups().values())
    ws = WidthSpec(0.5, "fedrolex", 2)
    sub = build_at_width(model, cfg.groups(), decl, ws).eval()
    direct = MultiTaskModel(cfg, tasks, 0.5).eval()
    load_arrays(direct, slice_state(state_arrays(model), spec, ws))
    with torch.no_grad():
        torch.testing.assert_close(_out(sub(x)), _out(direct(x)), atol=1e-6, rtol=0)
        sub.train()
        direct.train()  # batch statistics and HeteroFL's scaler (divides by the width)
        torch.testing.assert_close(_out(sub(x)), _out(direct(x)), atol=1e-5, rtol=0)


def test_layer_scale_parameter_and_scalar_first_ops_follow_the_group() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.gamma, self.out = (
                nn.Linear(3, 6),
                nn.Parameter(torch.ones(6)),
                nn.Linear(6, 2),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            return self.out(h + (1 - torch.sigmoid(h)) * self.gamma)  # gated, layer-scaled

    model, x = Net(), torch.randn(2, 3)
    groups, decl = infer_plan(model, x, heads=["out"])
    assert groups == {"fc": 6} and decl["gamma"] == ("backbone", ("fc",), ())
    sub = build_at_width(model, groups, decl, 0.5)
    assert tuple(sub.gamma.shape) == (3,) and sub(x).shape == (2, 2)


def test_module_called_twice_couples_its_input_and_output() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc0, self.shared, self.out = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.shared(torch.relu(self.shared(self.fc0(x)))))

    groups, decl = infer_plan(Net(), torch.randn(2, 3), heads=["out"])
    assert groups == {"fc0": 8}
    assert decl["shared.weight"].axes == ("fc0", "fc0")


def test_aggregation_over_blocked_and_concatenated_axes() -> None:
    from fmtl_lightning.aggregation import ClientUpdate, aggregate

    model, _, groups, decl = _plan("densenet")
    lenet, _, lgroups, ldecl = _plan("lenet")
    for m, g, d, key, cols_of in (
        (model, groups, decl, "transition.weight",
         lambda ws: np.concatenate([ws.indices(8), 8 + ws.indices(4), 12 + ws.indices(4)])),
        (lenet, lgroups, ldecl, "fc1.weight",
         lambda ws: (ws.indices(16)[:, None] * 16 + np.arange(16)).ravel()),
    ):  # fmt: skip
        spec = plan_spec(m, g, d).restrict([key])
        full = {key: np.zeros(spec[key].shape, np.float32)}
        ws = WidthSpec(0.5, "fedrolex", 11)
        updates = [
            ClientUpdate("a", {key: np.full(spec[key].shape, 2.0, np.float32)}, 10),
            ClientUpdate("b", {key: np.full(spec.shape_at(key, ws), 4.0, np.float32)}, 10, ws),
        ]
        new = aggregate(full, updates, spec)[key]
        expected = np.full(spec[key].shape, 2.0, np.float32).reshape(spec[key].shape[0], -1)
        expected[np.ix_(ws.indices(spec[key].shape[0]), cols_of(ws))] = 3.0  # held by both
        np.testing.assert_array_equal(new.reshape(expected.shape), expected)
