"""The built-in backbone families and task heads, buildable at any width.

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

The built-in families go through the same path as a user's model: their roles and width
axes are inferred from the traced graph (:func:`builtin_plan`, which runs
:func:`fmtl_lightning.width_plan.infer_plan`), never declared by hand; only the channel
groups' names (``h0, h1, ...`` after ``BackboneConfig.hidden``) are theirs.
:func:`model_spec` turns that plan into the :class:`ModelSpec` that slicing, aggregation,
the Ditto term and export all read.

A model built at width r has exactly the shapes that ``slice_state`` produces
from the full-width state, because both use :func:`roles.channels_at`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from fmtl_lightning.errors import SpecError, StateValidationError
from fmtl_lightning.layers import FlattenLinear, Scaler
from fmtl_lightning.roles import ModelSpec, RolePolicy, channels_at, check_width
from fmtl_lightning.static_bn import StaticBatchNorm2d
from fmtl_lightning.width_build import plan_spec
from fmtl_lightning.width_plan import infer_plan
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


def _conv(cin: int, cout: int, k: int, padding: int | None = None) -> nn.Conv2d:
    """A k x k convolution, "same" padding unless given."""
    return nn.Conv2d(cin, cout, k, padding=k // 2 if padding is None else padding)


def _norm(c: int, norm: Norm) -> nn.Module:
    if norm == "none":
        return nn.Identity()
    if norm == "group":
        return nn.GroupNorm(group_norm_groups(c), c)
    if norm == "static_batch":  # statistics computed after aggregation, never trained
        return StaticBatchNorm2d(c)
    return nn.BatchNorm2d(c)


class Backbone(nn.Module):
    """Shared feature extractor at width ``width``: (B, C, H, W) -> (B, feature_dim)."""

    def __init__(self, cfg: BackboneConfig, width: float = 1.0) -> None:
        super().__init__()
        self.cfg = cfg
        self.width = check_width(width)
        layers: list[nn.Module] = []
        builders = {
            "mlp": self._mlp,
            "cnn": self._cnn,
            "dwcnn": self._dwcnn,
            "fedavgcnn": self._fedavgcnn,
        }
        builders[cfg.family](layers)
        self.layers = nn.Sequential(*layers)
        self.feature_dim = self._ch(cfg.hidden[-1])

    def _ch(self, full: int) -> int:
        return channels_at(full, self.width)

    def _scaler(self, layers: list[nn.Module]) -> None:
        if self.cfg.scaler:
            layers.append(Scaler(self.width))

    def _mlp(self, layers: list[nn.Module]) -> None:
        cfg = self.cfg
        layers.append(nn.Flatten())
        fin = cfg.in_channels * cfg.image_size**2
        for h in cfg.hidden:
            c = self._ch(h)
            layers.append(nn.Linear(fin, c))
            self._scaler(layers)
            layers.append(nn.ReLU())
            fin = c

    def _cnn(self, layers: list[nn.Module]) -> None:
        cfg = self.cfg
        cin = cfg.in_channels
        for i, h in enumerate(cfg.hidden):
            c = self._ch(h)
            layers.append(_conv(cin, c, 3))
            self._scaler(layers)
            layers.append(_norm(c, cfg.norm))
            layers.append(nn.ReLU())
            if i < len(cfg.hidden) - 1:
                layers.append(nn.MaxPool2d(2))
            cin = c
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]

    def _dwcnn(self, layers: list[nn.Module]) -> None:
        cfg = self.cfg
        cin = self._ch(cfg.hidden[0])
        layers.append(_conv(cfg.in_channels, cin, 3))
        self._scaler(layers)
        layers.append(_norm(cin, cfg.norm))
        layers.append(nn.ReLU())
        for i, h in enumerate(cfg.hidden[1:], start=1):
            c = self._ch(h)
            stride = 2 if i <= 2 else 1
            layers.append(nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin))
            layers.append(_norm(cin, cfg.norm))
            layers.append(nn.ReLU())
            layers.append(_conv(cin, c, 1))
            self._scaler(layers)
            layers.append(_norm(c, cfg.norm))
            layers.append(nn.ReLU())
            cin = c
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]

    def _fedavgcnn(self, layers: list[nn.Module]) -> None:
        cfg = self.cfg
        cin = cfg.in_channels
        for h in cfg.hidden[:2]:  # (B, C, 28, 28) -> (B, c0, 12, 12) -> (B, c1, 4, 4)
            c = self._ch(h)
            layers.append(_conv(cin, c, 5, padding=0))
            self._scaler(layers)
            layers.append(_norm(c, cfg.norm))
            layers.append(nn.ReLU())
            layers.append(nn.MaxPool2d(2))
            cin = c
        side = fedavgcnn_map_side(cfg.image_size)
        layers.append(FlattenLinear(cin, side, self._ch(cfg.hidden[2])))  # (B, c2)
        self._scaler(layers)
        layers.append(nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, F)
        return self.layers(x)


class MultiTaskModel(nn.Module):
    """A backbone plus one linear head per task; forward returns ``{task: logits}``.

    Its roles and width axes (``declarations``, :meth:`role_spec`) are inferred from the
    traced graph like any user's model (:func:`builtin_plan`), never declared by hand.
    """

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

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)  # (B, F)
        return {t: self.heads[head_name(t)](feats) for t in self.task_outputs}

    @property
    def declarations(self) -> dict[str, tuple]:
        """state-dict key -> (kind, axes, blocks): the inferred plan (:func:`builtin_plan`)."""
        return dict(builtin_plan(self.cfg, tuple(self.task_outputs.items()))[1])

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


@functools.lru_cache(maxsize=128)
def builtin_plan(
    cfg: BackboneConfig, tasks: tuple[tuple[str, int], ...]
) -> tuple[dict[str, int], dict[str, tuple]]:
    """The width plan of a built-in model, inferred like any user's model's.

    :func:`fmtl_lightning.width_plan.infer_plan` traces the width-1 model (on the meta
    device: no weights) with the heads as task heads; its channel groups, in the order
    the layers create them, are named ``h0, h1, ...`` after ``cfg.hidden`` (the names
    configs, ``spec.json`` and bundles use). Returns ``(groups, declarations)``.
    """
    with torch.device("meta"):
        model = MultiTaskModel(cfg, dict(tasks), 1.0)
        x = torch.zeros(2, *model.input_shape)
    groups, decl = infer_plan(model, x, heads=["heads"])
    want = cfg.groups()
    if [int(n) for n in groups.values()] != list(want.values()):  # type: ignore[arg-type]
        raise SpecError(f"{cfg.family}: inferred channel groups {groups} do not match {want}")
    rename = dict(zip(groups, want, strict=True))
    named: dict[str, tuple] = {
        k: d._replace(axes=tuple(None if a is None else rename[a] for a in d.axes))
        for k, d in decl.items()
    }
    return want, named


def model_spec(
    cfg: BackboneConfig, task_outputs: Mapping[str, int], policy: RolePolicy | str = "fedper"
) -> ModelSpec:
    """ModelSpec of a built-in config: its inferred plan plus shapes (meta device)."""
    groups, decl = builtin_plan(cfg, tuple(task_outputs.items()))
    with torch.device("meta"):
        model = MultiTaskModel(cfg, task_outputs, 1.0)
    return plan_spec(model, groups, decl, policy)


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
