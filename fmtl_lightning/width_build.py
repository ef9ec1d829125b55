"""Build a model at a width from an inferred plan, and the plan's :class:`ModelSpec`.

:func:`plan_spec` is the ModelSpec of any model (built-in or a user's): the
declarations of :func:`fmtl_lightning.width_plan.infer_plan` plus the real shapes and
dtypes. :func:`build_at_width` deep-copies the full model, replaces every width-scaled
tensor by its slice (:func:`fmtl_lightning.slicing.slice_state`, so HeteroFL prefixes and
FedRolex windows both work) and resizes the layers' own bookkeeping (channel counts, conv,
GroupNorm and attention group/head counts, LayerNorm shapes, HeteroFL's ``Scaler`` rate)
so the copy is the model at that width.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from fmtl_lightning.errors import WidthPlanError
from fmtl_lightning.layers import Scaler
from fmtl_lightning.roles import ModelSpec, ParamSpec, RolePolicy, Segment, WidthSpec
from fmtl_lightning.slicing import slice_state
from fmtl_lightning.static_bn import StaticBatchNorm2d


def plan_spec(
    model: nn.Module,
    groups: Mapping[str, int | tuple[Segment, ...]],
    declarations: Mapping[str, Sequence],
    policy: RolePolicy | str = "fedper",
) -> ModelSpec:
    """The ModelSpec of a full-width model from its (inferred or hand-written) declarations."""
    sd = model.state_dict()
    missing = sorted(set(sd) - set(declarations))
    extra = sorted(set(declarations) - set(sd))
    if missing or extra:
        raise WidthPlanError(
            f"declarations do not match the state dict: undeclared {missing[:5]}, "
            f"not in the model {extra[:5]}"
        )
    params = tuple(
        ParamSpec(
            key=k,
            kind=declarations[k][0],
            shape=tuple(sd[k].shape),
            axes=tuple(declarations[k][1]),
            dtype=str(sd[k].dtype).removeprefix("torch."),
            blocks=tuple(declarations[k][2]) if len(declarations[k]) > 2 else (),
        )
        for k in sd
    )
    segments = {g: v for g, v in groups.items() if isinstance(v, tuple)}
    sizes = {
        g: (sum(n for _, n in v) if isinstance(v, tuple) else int(v)) for g, v in groups.items()
    }
    return ModelSpec(groups=sizes, params=params, segments=segments).with_policy(policy)


def _set_tensor(model: nn.Module, key: str, value: np.ndarray) -> None:
    owner_name, _, leaf = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    t = torch.from_numpy(np.ascontiguousarray(value))
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(
            t, requires_grad=bool(old is None or old.requires_grad)
        )
    else:
        owner._buffers[leaf] = t


def _resize(name: str, mod: Any, full: Any, ws: WidthSpec) -> None:
    """Set a layer's size attributes from its (already sliced) tensors."""
    if isinstance(mod, nn.modules.conv._ConvNd):
        cout, per_group = mod.weight.shape[0], mod.weight.shape[1]
        if full.groups == 1:
            mod.in_channels, mod.out_channels = per_group, cout
            return
        old_per = full.in_channels // full.groups
        if cout == full.out_channels:
            return
        if cout % old_per:
            raise WidthPlanError(
                f"layer {name!r} (grouped conv, {old_per} channels per group): "
                f"{cout} channels at width {ws.width} are not whole groups"
            )
        if old_per > 1 and ws.mode == "fedrolex":
            raise WidthPlanError(
                f"layer {name!r} (grouped conv, {old_per} channels per group): a FedRolex "
                "window does not keep whole groups; use heterofl or pass it in not_scaled"
            )
        mod.groups, mod.in_channels, mod.out_channels = cout // old_per, cout, cout
    elif isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    elif isinstance(mod, nn.Embedding):
        mod.embedding_dim = mod.weight.shape[1]
    elif isinstance(mod, StaticBatchNorm2d):
        mod.num_features = mod.weight.shape[0]
    elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
        t = mod.running_mean if mod.running_mean is not None else mod.weight
        mod.num_features = t.shape[0]
    elif isinstance(mod, nn.GroupNorm):
        c = mod.weight.shape[0]
        g = full.num_groups
        if g == full.num_channels:
            g = c  # one channel per group (instance-norm style): the group count scales
        elif c % g:
            raise WidthPlanError(
                f"layer {name!r} (GroupNorm, {g} groups): {c} channels at width "
                f"{ws.width} do not divide into {g} groups; pick a group count that "
                "divides every width's channels, or pass it in not_scaled"
            )
        mod.num_channels, mod.num_groups = c, g
    elif isinstance(mod, nn.MultiheadAttention):
        e, hd = mod.out_proj.weight.shape[0], full.head_dim
        if e % hd or (hd > 1 and ws.mode == "fedrolex" and e < full.embed_dim):
            why = "a FedRolex window" if e % hd == 0 else f"{e} channels at width {ws.width}"
            raise WidthPlanError(
                f"layer {name!r} (MultiheadAttention, heads of {hd} channels): {why} does "
                "not keep whole heads; use heterofl, widths that keep whole heads, or pass it "
                "in not_scaled"
            )
        mod.embed_dim = mod.kdim = mod.vdim = e
        mod.num_heads = e // hd
    elif isinstance(mod, nn.LayerNorm):
        mod.normalized_shape = tuple(mod.weight.shape)


_M = TypeVar("_M", bound=nn.Module)


def build_at_width(
    model: _M,
    groups: Mapping[str, int | tuple[Segment, ...]],
    declarations: Mapping[str, Sequence],
    ws: WidthSpec | float,
) -> _M:
    """A copy of the full-width ``model`` at ``ws``, holding the slice of its weights."""
    ws = ws if isinstance(ws, WidthSpec) else WidthSpec(float(ws))
    spec = plan_spec(model, groups, declarations)
    full = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    sub = slice_state(full, spec, ws)
    out = copy.deepcopy(model)
    full_modules = dict(model.named_modules())
    touched: set[str] = set()
    for key, arr in sub.items():
        if arr.shape != full[key].shape:
            _set_tensor(out, key, arr)
            touched.add(key.rpartition(".")[0])
    for name in sorted(touched):
        _resize(name, out.get_submodule(name), full_modules[name], ws)
    for mod in out.modules():
        if isinstance(mod, Scaler):  # HeteroFL's scaler divides by the width while training
            mod.rate = ws.width
    return out
