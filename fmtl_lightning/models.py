"""Width-sliceable backbones, task heads, and the parameter declarations they make.

Four backbone families, each buildable at any width r in (0, 1]:

* ``mlp``:   Linear -> ReLU stacks over the flattened image;
* ``cnn``:   3x3 conv -> [scaler] -> norm -> ReLU (-> 2x2 max-pool between blocks),
             then global average pooling (HeteroFL's CNN shape);
             ``norm="static_batch"`` is HeteroFL's sBN (:mod:`fmtl_lightning.static_bn`);
* ``dwcnn``: a MobileNet-style stem plus depthwise-separable blocks;
* ``fedavgcnn``: PFLlib's FedAvgCNN (McMahan et al.'s MNIST CNN): two 5x5 convolutions
  without padding, each -> [scaler] -> norm -> ReLU -> 2x2 max-pool, then a fully
  connected layer over the flattened map -> ReLU (``hidden = (conv1, conv2, fc)``,
  default (32, 64, 512); 28x28 inputs give a 64x4x4 = 1,024 map). ``norm="none"`` is
  exactly PFLlib's model; other norms go after each convolution, as in ``cnn``.

Every layer is created through :class:`_Builder`, which records, at the moment the
layer exists, what each of its tensors is (kind) and which dims scale with width
(axes). :func:`model_spec` turns those records into the :class:`ModelSpec` that
slicing, aggregation, the Ditto term and export all read.

A model built at width r has exactly the shapes that ``slice_state`` produces
from the full-width state, because both use :func:`roles.channels_at`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from fmtl_lightning.errors import SpecError, StateValidationError
from fmtl_lightning.roles import ModelSpec, ParamSpec, RolePolicy, channels_at, check_width
from fmtl_lightning.static_bn import StaticBatchNorm2d
from mobile_client.batching import head_name as head_name  # one definition, re-exported

Family = Literal["mlp", "cnn", "dwcnn", "fedavgcnn"]
Norm = Literal["group", "batch", "static_batch", "none"]

DEFAULT_HIDDEN: dict[str, tuple[int, ...]] = {
    "mlp": (256, 128),
    "cnn": (32, 64, 128),
    "dwcnn": (16, 32, 64, 128),
    "fedavgcnn": (32, 64, 512),
}
# The HeteroFL paper's MNIST CNN: about 1.56M parameters at width 1 with a 10-way head.
HETEROFL_CNN_HIDDEN = (64, 128, 256, 512)


@dataclass(frozen=True)
class BackboneConfig:
    """What a backbone looks like at full width. ``hidden=()`` picks the family default."""

    family: Family = "cnn"
    in_channels: int = 1
    image_size: int = 28
    hidden: tuple[int, ...] = ()
    norm: Norm = "group"
    scaler: bool = False  # HeteroFL: divide activations by r while training

    def __post_init__(self) -> None:
        if self.family not in DEFAULT_HIDDEN:
            raise SpecError(f"family must be one of {sorted(DEFAULT_HIDDEN)}, got {self.family!r}")
        if self.norm not in ("group", "batch", "static_batch", "none"):
            raise SpecError(f"norm must be group|batch|static_batch|none, got {self.norm!r}")
        if not self.hidden:
            object.__setattr__(self, "hidden", DEFAULT_HIDDEN[self.family])
        if any(int(h) < 1 for h in self.hidden):
            raise SpecError(f"hidden sizes must be >= 1, got {self.hidden}")
        if self.family == "fedavgcnn":
            if len(self.hidden) != 3:
                raise SpecError(
                    f"fedavgcnn needs hidden = (conv1, conv2, fc) channels, got {self.hidden}"
                )
            if fedavgcnn_map_side(self.image_size) < 1:
                raise SpecError(
                    f"fedavgcnn needs images of at least {FEDAVGCNN_MIN_IMAGE} pixels, "
                    f"got image_size {self.image_size}"
                )

    def groups(self) -> dict[str, int]:
        """Full size of each width-scaled channel group."""
        return {f"h{i}": int(h) for i, h in enumerate(self.hidden)}

    @property
    def feature_group(self) -> str:
        return f"h{len(self.hidden) - 1}"


FEDAVGCNN_MIN_IMAGE = 16  # two (5x5 valid conv, 2x2 pool) stages leave a 1x1 map


def fedavgcnn_map_side(image_size: int) -> int:
    """Side of FedAvgCNN's last feature map: two 5x5 valid convs, each then 2x2 pooled."""
    side = int(image_size)
    for _ in range(2):
        side = (side - 4) // 2
    return side


def group_norm_groups(channels: int) -> int:
    """GroupNorm group count that divides ``channels`` at every width: gcd(C, 4)."""
    return math.gcd(channels, 4)


class FlattenLinear(nn.Module):
    """A fully connected layer over a flattened (C, H, W) map, its weight kept (out, C, H, W).

    ``forward(x) = linear(x.flatten(1), weight.flatten(1), bias)``: the same numbers as
    ``Linear(C*H*W, out)`` after ``flatten`` (PFLlib's FedAvgCNN ``fc1``), whose weight is
    this one reshaped, and initialised like it (same fan-in, same draws in the same order).
    Keeping C as its own dim lets width slicing cut input channels as it cuts a conv's.
    """

    def __init__(self, in_channels: int, side: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_channels, side, side))
        self.bias = nn.Parameter(torch.empty(out_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear.reset_parameters
        bound = 1.0 / math.sqrt(in_channels * side * side)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, out)
        return nn.functional.linear(x.flatten(1), self.weight.flatten(1), self.bias)

    def extra_repr(self) -> str:
        out, c, h, w = self.weight.shape
        return f"in=({c}, {h}, {w}), out_features={out}"


class Scaler(nn.Module):
    """HeteroFL's scaler: output = input / r while training, identity in eval."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.rate if self.training else x


@dataclass
class _Builder:
    """Creates layers at a width and records (kind, axes) for each of their tensors."""

    width: float
    decl: dict[str, tuple[str, tuple[str | None, ...]]] = field(default_factory=dict)

    def ch(self, group: str, full: int) -> int:
        return channels_at(full, self.width)

    def linear(
        self, name: str, fin: int, fout: int, gin: str | None, gout: str | None, kind: str
    ) -> nn.Linear:
        self.decl[f"{name}.weight"] = (kind, (gout, gin))
        self.decl[f"{name}.bias"] = (kind, (gout,))
        return nn.Linear(fin, fout)

    def conv(
        self,
        name: str,
        cin: int,
        cout: int,
        gin: str | None,
        gout: str,
        k: int,
        stride: int = 1,
        padding: int | None = None,  # None: k // 2 ("same" for odd k)
    ) -> nn.Conv2d:
        self.decl[f"{name}.weight"] = ("backbone", (gout, gin, None, None))
        self.decl[f"{name}.bias"] = ("backbone", (gout,))
        pad = k // 2 if padding is None else padding
        return nn.Conv2d(cin, cout, k, stride=stride, padding=pad)

    def flat_linear(
        self, name: str, cin: int, side: int, cout: int, gin: str, gout: str
    ) -> FlattenLinear:
        self.decl[f"{name}.weight"] = ("backbone", (gout, gin, None, None))
        self.decl[f"{name}.bias"] = ("backbone", (gout,))
        return FlattenLinear(cin, side, cout)

    def depthwise(self, name: str, c: int, g: str, stride: int) -> nn.Conv2d:
        self.decl[f"{name}.weight"] = ("backbone", (g, None, None, None))
        self.decl[f"{name}.bias"] = ("backbone", (g,))
        return nn.Conv2d(c, c, 3, stride=stride, padding=1, groups=c)

    def norm(self, name: str, c: int, g: str, norm: Norm) -> nn.Module:
        if norm == "none":
            return nn.Identity()
        self.decl[f"{name}.weight"] = ("norm", (g,))
        self.decl[f"{name}.bias"] = ("norm", (g,))
        if norm == "group":
            return nn.GroupNorm(group_norm_groups(c), c)
        if norm == "static_batch":  # statistics computed after aggregation, never trained
            self.decl[f"{name}.running_mean"] = ("static_stat", (g,))
            self.decl[f"{name}.running_var"] = ("static_stat", (g,))
            return StaticBatchNorm2d(c)
        self.decl[f"{name}.running_mean"] = ("norm_stat", (g,))
        self.decl[f"{name}.running_var"] = ("norm_stat", (g,))
        self.decl[f"{name}.num_batches_tracked"] = ("counter", ())
        return nn.BatchNorm2d(c)


class Backbone(nn.Module):
    """Shared feature extractor at width ``width``: (B, C, H, W) -> (B, feature_dim)."""

    def __init__(self, cfg: BackboneConfig, width: float = 1.0) -> None:
        super().__init__()
        self.cfg = cfg
        self.width = check_width(width)
        b = _Builder(self.width)
        layers: list[nn.Module] = []
        builders = {
            "mlp": self._mlp,
            "cnn": self._cnn,
            "dwcnn": self._dwcnn,
            "fedavgcnn": self._fedavgcnn,
        }
        builders[cfg.family](b, layers)
        self.layers = nn.Sequential(*layers)
        self.feature_dim = channels_at(cfg.hidden[-1], self.width)
        self.declarations = {f"layers.{k}": v for k, v in b.decl.items()}

    def _scaler(self, layers: list[nn.Module]) -> None:
        if self.cfg.scaler:
            layers.append(Scaler(self.width))

    def _mlp(self, b: _Builder, layers: list[nn.Module]) -> None:
        cfg = self.cfg
        layers.append(nn.Flatten())
        fin, gin = cfg.in_channels * cfg.image_size**2, None
        for i, h in enumerate(cfg.hidden):
            c = b.ch(f"h{i}", h)
            layers.append(b.linear(str(len(layers)), fin, c, gin, f"h{i}", "backbone"))
            self._scaler(layers)
            layers.append(nn.ReLU())
            fin, gin = c, f"h{i}"

    def _cnn(self, b: _Builder, layers: list[nn.Module]) -> None:
        cfg = self.cfg
        cin, gin = cfg.in_channels, None
        for i, h in enumerate(cfg.hidden):
            c, g = b.ch(f"h{i}", h), f"h{i}"
            layers.append(b.conv(str(len(layers)), cin, c, gin, g, 3))
            self._scaler(layers)
            layers.append(b.norm(str(len(layers)), c, g, cfg.norm))
            layers.append(nn.ReLU())
            if i < len(cfg.hidden) - 1:
                layers.append(nn.MaxPool2d(2))
            cin, gin = c, g
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]

    def _dwcnn(self, b: _Builder, layers: list[nn.Module]) -> None:
        cfg = self.cfg
        c0 = b.ch("h0", cfg.hidden[0])
        layers.append(b.conv(str(len(layers)), cfg.in_channels, c0, None, "h0", 3))
        self._scaler(layers)
        layers.append(b.norm(str(len(layers)), c0, "h0", cfg.norm))
        layers.append(nn.ReLU())
        cin, gin = c0, "h0"
        for i, h in enumerate(cfg.hidden[1:], start=1):
            c, g = b.ch(f"h{i}", h), f"h{i}"
            layers.append(b.depthwise(str(len(layers)), cin, gin, stride=2 if i <= 2 else 1))
            layers.append(b.norm(str(len(layers)), cin, gin, cfg.norm))
            layers.append(nn.ReLU())
            layers.append(b.conv(str(len(layers)), cin, c, gin, g, 1))
            self._scaler(layers)
            layers.append(b.norm(str(len(layers)), c, g, cfg.norm))
            layers.append(nn.ReLU())
            cin, gin = c, g
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]

    def _fedavgcnn(self, b: _Builder, layers: list[nn.Module]) -> None:
        cfg = self.cfg
        cin, gin = cfg.in_channels, None
        for i, h in enumerate(cfg.hidden[:2]):  # (B, C, 28, 28) -> (B, c0, 12, 12) -> (B, c1, 4, 4)
            c, g = b.ch(f"h{i}", h), f"h{i}"
            layers.append(b.conv(str(len(layers)), cin, c, gin, g, 5, padding=0))
            self._scaler(layers)
            layers.append(b.norm(str(len(layers)), c, g, cfg.norm))
            layers.append(nn.ReLU())
            layers.append(nn.MaxPool2d(2))
            cin, gin = c, g
        c2 = b.ch("h2", cfg.hidden[2])
        side = fedavgcnn_map_side(cfg.image_size)
        layers.append(b.flat_linear(str(len(layers)), cin, side, c2, "h1", "h2"))  # (B, c2)
        self._scaler(layers)
        layers.append(nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, F)
        return self.layers(x)


class MultiTaskModel(nn.Module):
    """A backbone plus one linear head per task; forward returns ``{task: logits}``."""

    def __init__(
        self, cfg: BackboneConfig, task_outputs: Mapping[str, int], width: float = 1.0
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.width = check_width(width)
        self.task_outputs = dict(task_outputs)
        self.backbone = Backbone(cfg, self.width)
        self.heads = nn.ModuleDict(
            {head_name(t): nn.Linear(self.backbone.feature_dim, n) for t, n in task_outputs.items()}
        )
        decl = {f"backbone.{k}": v for k, v in self.backbone.declarations.items()}
        for t in task_outputs:
            h = head_name(t)
            decl[f"heads.{h}.weight"] = ("head", (None, cfg.feature_group))
            decl[f"heads.{h}.bias"] = ("head", (None,))
        self.declarations = decl

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)  # (B, F)
        return {t: self.heads[head_name(t)](feats) for t in self.task_outputs}

    @property
    def family(self) -> str:
        """The model's name in bundles: the built-in family."""
        return self.cfg.family

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One input without the batch dim: (channels, height, width)."""
        return (self.cfg.in_channels, self.cfg.image_size, self.cfg.image_size)

    @property
    def feature_dim(self) -> int:
        """The backbone's output features at this model's width (the heads' input)."""
        return self.backbone.feature_dim

    def role_spec(self, policy: RolePolicy | str = "fedper") -> ModelSpec:
        """The full-width ModelSpec of this model's architecture under ``policy``."""
        return model_spec(self.cfg, self.task_outputs, policy)


def spec_of(model: MultiTaskModel, policy: RolePolicy | str = "fedper") -> ModelSpec:
    """The ModelSpec of a width-1 model: declarations plus the real tensor shapes/dtypes."""
    if model.width != 1.0:
        raise SpecError(f"spec_of needs a width-1 model, got width {model.width}")
    sd = model.state_dict()
    undeclared = sorted(set(sd) - set(model.declarations))
    if undeclared:
        raise SpecError(f"state-dict keys without a declared role: {undeclared[:5]}")
    params = tuple(
        ParamSpec(
            key=k,
            kind=model.declarations[k][0],  # type: ignore[arg-type]
            shape=tuple(sd[k].shape),
            axes=model.declarations[k][1],
            dtype=str(sd[k].dtype).removeprefix("torch."),
        )
        for k in sd
    )
    spec = ModelSpec(groups=model.cfg.groups(), params=params)
    return spec.with_policy(policy)


def model_spec(
    cfg: BackboneConfig, task_outputs: Mapping[str, int], policy: RolePolicy | str = "fedper"
) -> ModelSpec:
    """ModelSpec for a config, computed on the meta device (no memory for weights)."""
    with torch.device("meta"):
        model = MultiTaskModel(cfg, task_outputs, 1.0)
    return spec_of(model, policy)


def state_arrays(module: nn.Module, keys: list[str] | tuple[str, ...] | None = None) -> dict:
    """Named numpy copies of a module's state (``keys`` default: all)."""
    sd = module.state_dict()
    wanted = list(sd) if keys is None else list(keys)
    return {k: sd[k].detach().cpu().numpy().copy() for k in wanted}


def load_arrays(module: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy named arrays into a module's state; every key must exist with its exact shape."""
    sd = module.state_dict()
    for k, v in arrays.items():
        if k not in sd:
            raise StateValidationError("not a key of the model", key=k)
        if tuple(v.shape) != tuple(sd[k].shape):
            raise StateValidationError(
                f"shape {tuple(v.shape)} does not match the model's {tuple(sd[k].shape)}", key=k
            )
    with torch.no_grad():
        for k, v in arrays.items():
            sd[k].copy_(torch.from_numpy(np.array(v, copy=True, order="C")))
