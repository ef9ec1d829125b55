"""Infer a width plan for any ``nn.Module``: which tensor dims scale together with width.

:func:`infer_plan` traces the model with ``torch.fx`` (``symbolic_trace`` plus ``ShapeProp``
on one example input), gives every dim of every traced value a variable, and unifies the
variables that must have the same size at every width (a union-find over dims):

* ``Conv1d/2d/3d``: a new channel group for the output (weight ``(out, in, k...)``);
  depthwise convs (``groups == in == out``) and grouped convs with ``in == out`` couple
  their input and output (the group count scales with the channels);
* ``Linear`` (last dim), ``Embedding`` (a new group for the embedding dim), and
  :class:`fmtl_lightning.layers.FlattenLinear`;
* ``BatchNorm1d/2d/3d``, :class:`~fmtl_lightning.static_bn.StaticBatchNorm2d`, ``GroupNorm``
  (dim 1) and ``LayerNorm`` (last dim) follow their input;
* ``nn.MultiheadAttention`` (``kdim == vdim == embed_dim``, no ``add_bias_kv``): query,
  key, value and output share the embedding group; ``in_proj_weight`` is a concatenated
  ``(q, k, v)`` axis; at a width the head count scales and the head size stays;
* ``torch.cat`` along a channel dim makes a *concatenated* group: each input keeps its
  group and the output dim is their segments in order (:attr:`ModelSpec.segments`), so
  the layer after it keeps each segment's slice (DenseNet); cat along fixed dims (a class
  token) is plain;
* elementwise ops (``+ - * /``, residual adds: coupled, with broadcasting), activations,
  pooling, dropout, ``softmax``, ``transpose``/``permute``, ``matmul``, reductions,
  ``getitem``, ``expand``, ``unsqueeze`` pass dims through;
* ``flatten``/``view``/``reshape`` that merge a channel dim with fixed inner dims make a
  *blocked* dim: the linear layer after ``(B, C, H, W) -> (B, C*H*W)`` gets in-dim axis ``C``
  with block ``H*W`` (see :attr:`fmtl_lightning.roles.ParamSpec.blocks`); slicing keeps
  whole ``H*W`` runs, exactly what a model built at that width computes.

Fixed (never scaled) dims: the inputs' dims, spatial/kernel dims, the outputs of modules
named in ``heads`` (task heads: every tensor under them is kind ``head``) and every dim
entering or leaving a module named in ``not_scaled`` (traced as one opaque call). A class
of coupled dims is a *group* (named after the first layer that creates it) unless it
touches a fixed dim. Kinds come from module types, never from names.

Refused, with :class:`WidthPlanError` naming the layer and suggesting ``not_scaled``,
whenever a width-scaled dim reaches: a view that splits, reorders or flattens
concatenated channels or hard-codes a scaled size; indexing into a scaled dim; a grouped
conv with ``in != out`` (or over concatenated channels); a depthwise conv with a channel
multiplier; ``ConvTranspose``; attention with other key/value dims; a multi-dim
``LayerNorm``; a norm with neither parameters nor statistics; ``stack``; or any other
module or function the pass does not know (ops it does not know are fine on unscaled
tensors). :func:`fmtl_lightning.width_build.build_at_width` refuses widths at which a
GroupNorm's channels, a grouped conv's groups or attention heads would not stay whole,
and FedRolex windows through grouped convs or attention heads.

Why an own FX pass and not ``torch-pruning`` (1.6.1)'s ``DependencyGraph``: it answers a
different question, which *channel indices* to remove together (it records autograd
``grad_fn`` nodes with forward hooks and returns groups of (layer, prune function,
indices) that mutate layers in place); on this zoo it finds comparable coupled groups,
but the :class:`~fmtl_lightning.roles.ModelSpec` contract (slicing, aggregation, export)
needs a named group per dim, flattened and concatenated axes and deterministic names,
which would have to be reverse-engineered from index groups. It is also permissive where
we must refuse: an unknown parameter gets "prune the last non-singleton dim" with a
warning. And it would add a dependency to the training stack for about 900 lines of
code here. FX gives the graph, shapes (``ShapeProp``) and the qualified module names that
errors must name; ``torch.export`` would lower modules to aten ops and lose the module
boundaries the declarations are keyed on.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from fmtl_lightning.errors import WidthPlanError as WidthPlanError
from fmtl_lightning.layers import FlattenLinear
from fmtl_lightning.roles import Segment
from fmtl_lightning.static_bn import StaticBatchNorm2d
from fmtl_lightning.width_dims import Cat, Dims, Flat
from fmtl_lightning.width_layers import LayerTrace


class Declaration(NamedTuple):
    """What :func:`infer_plan` declares for one state-dict key (``models`` style + blocks)."""

    kind: str
    axes: tuple[str | None, ...]
    blocks: tuple[int, ...] = ()


NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def _within(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class _Tracer(fx.Tracer):
    def __init__(self, opaque: tuple[str, ...]) -> None:
        super().__init__()
        self.opaque = opaque

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.opaque or isinstance(m, (FlattenLinear, StaticBatchNorm2d)):
            return True
        return super().is_leaf_module(m, qualname)


def _kind(model: nn.Module, key: str, heads: tuple[str, ...], dtype: torch.dtype) -> str:
    owner_name, _, leaf = key.rpartition(".")
    if _within(owner_name, heads):
        return "head"
    owner = model.get_submodule(owner_name)
    if isinstance(owner, StaticBatchNorm2d):  # HeteroFL's sBN: statistics never trained
        return "static_stat" if leaf.startswith("running_") else "norm"
    if isinstance(owner, nn.modules.batchnorm._BatchNorm):
        if leaf == "num_batches_tracked":
            return "counter"
        return "norm_stat" if leaf.startswith("running_") else "norm"
    if isinstance(owner, NORMS):
        return "norm"
    if not (dtype.is_floating_point or dtype.is_complex):
        return "counter"
    return "backbone"


def infer_plan(
    model: nn.Module,
    example_input: Any,
    *,
    heads: Iterable[str] = (),
    not_scaled: Iterable[str] = (),
) -> tuple[dict[str, int | tuple[Segment, ...]], dict[str, Declaration]]:
    """Channel groups ``{name: full size}`` and a :class:`Declaration` per state-dict key.

    A concatenated group (after ``torch.cat``) maps to its segments instead of a size:
    ``{"cat(a,b)": (("a", 4), ("b", 4))}`` (see :attr:`ModelSpec.segments`).

    ``example_input``: one tensor, or a tuple of positional inputs, at any batch size.
    ``heads``/``not_scaled``: qualified module names (``"head"``, ``"blocks.0.attn"``).
    Raises :class:`WidthPlanError` naming the layer it cannot plan.
    """
    heads_t, opaque = tuple(heads), tuple(not_scaled)
    names = dict(model.named_modules())
    for what, given in (("heads", heads_t), ("not_scaled", opaque)):
        unknown = [n for n in given if n not in names or n == ""]
        if unknown:
            raise WidthPlanError(
                f"{what}: {unknown} are not submodules of {type(model).__name__} "
                f"(known: {sorted(n for n in names if n)[:12]}...)"
            )
    try:
        graph = _Tracer(opaque).trace(model)
    except Exception as exc:  # torch.fx raises many types (TraceError, TypeError, ...)
        raise WidthPlanError(
            f"torch.fx cannot trace {type(model).__name__}: {exc}; move data-dependent "
            "control flow into a submodule and pass its name in not_scaled"
        ) from exc
    gm = fx.GraphModule(model, graph)
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    modes = {m: m.training for m in model.modules()}
    model.eval()  # no running-stat updates, no dropout while shapes propagate
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as exc:
        raise WidthPlanError(f"{type(model).__name__} fails on the example input: {exc}") from exc
    finally:
        for m, t in modes.items():
            m.training = t
    dims = Dims()
    trace = LayerTrace(gm, dims, heads_t, opaque)
    for node in gm.graph.nodes:
        trace.visit(node)
    dims.check_deferred()
    plain, names_of = dims.groups()
    groups: dict[str, int | tuple[Segment, ...]] = dict(plain)
    sd = model.state_dict()
    decl: dict[str, Declaration] = {}
    for key, t in sd.items():
        kind = _kind(model, key, heads_t, t.dtype)
        labels = trace.params.get(key)
        if labels is None or kind == "counter" or not t.dtype.is_floating_point:
            decl[key] = Declaration(kind, (None,) * t.dim())
            continue
        axes: list[str | None] = []
        blocks: list[int] = []
        for lab in labels:
            block = lab.block if isinstance(lab, Flat) else 1
            if isinstance(lab, Cat):
                name = _concat_group(lab, dims, names_of, groups)
            else:
                name = names_of.get(dims.find(lab.var if isinstance(lab, Flat) else lab))
            axes.append(name)
            blocks.append(block if name is not None else 1)
        decl[key] = Declaration(kind, tuple(axes), tuple(blocks) if max(blocks) > 1 else ())
    return groups, decl


def _concat_group(
    lab: Cat, dims: Dims, names_of: dict[int, str], groups: dict[str, int | tuple[Segment, ...]]
) -> str | None:
    """Name (and register) the concatenated group of a ``torch.cat`` dim; None if none scales."""
    segs = tuple((names_of.get(dims.find(v)), n) for v, n in zip(lab.parts, lab.sizes, strict=True))
    if all(g is None for g, _ in segs):
        return None
    name = "cat(" + ",".join(g if g is not None else str(n) for g, n in segs) + ")"
    groups[name] = segs
    return name
