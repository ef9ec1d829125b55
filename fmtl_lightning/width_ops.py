"""The node visitor of the width-plan FX pass (:mod:`fmtl_lightning.width_plan`).

:class:`Trace` visits the FX nodes in order, gives each tensor's dims labels
(:mod:`fmtl_lightning.width_dims`) and applies one rule per op: pass-through ops,
broadcasting elementwise ops (residual adds couple), views, transposes and indexing.
Layers with weights and ops that combine tensors are in :mod:`fmtl_lightning.width_layers`.
"""

from __future__ import annotations

import math
import operator
from typing import Any, cast

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fmtl_lightning.width_dims import Cat, Dims, Flat, Label, Multi, _within, align, vars_of

PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
    nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softmax, nn.LogSoftmax, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
PASS_FUNCS = {
    torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.elu, F.leaky_relu, F.hardswish,
    F.hardsigmoid, F.mish, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.dropout,
    F.dropout1d, F.dropout2d, F.softmax, torch.softmax, F.log_softmax, torch.log_softmax,
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, operator.neg,
    torch.exp, torch.abs, torch.clamp, torch.max_pool1d, torch.max_pool2d, torch.avg_pool1d,
    torch.adaptive_avg_pool1d, torch.dropout, torch.relu_,
}  # fmt: skip
PASS_METHODS = {
    "relu", "relu_", "sigmoid", "tanh", "softmax", "log_softmax", "contiguous", "clone",
    "detach", "float", "exp", "abs", "neg", "clamp", "sqrt", "to",
}  # fmt: skip
BINARY = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.pow, operator.iadd,
    operator.isub, operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul,
    torch.div, torch.maximum, torch.minimum, "add", "sub", "mul", "div", "add_", "sub_",
    "mul_", "div_", "pow",
}  # fmt: skip
RESHAPE = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten,
           "flatten", "view", "reshape", "squeeze", "unsqueeze", "unflatten"}  # fmt: skip
REDUCE = {torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin",
          "std", "var"}  # fmt: skip
MATMUL = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"}
TRANSPOSE = {torch.transpose, torch.permute, "transpose", "permute"}
EXPAND = {"expand", "expand_as"}
CAT = {torch.cat, torch.concat}


class Trace:
    """Applies the rule of each FX node; fills ``env`` (labels per node) and ``params``."""

    def __init__(
        self, gm: fx.GraphModule, dims: Dims, heads: tuple[str, ...], opaque: tuple[str, ...]
    ) -> None:
        self.gm, self.dims, self.heads, self.opaque = gm, dims, heads, opaque
        self.modules = dict(gm.named_modules())
        self.env: dict[fx.Node, Any] = {}
        self.params: dict[str, tuple[Label, ...]] = {}
        self.keys = set(gm.state_dict())

    # ------------------------------------------------------------------ helpers
    def visit(self, node: fx.Node) -> None:
        self.env[node] = getattr(self, f"_{node.op}")(node)

    @staticmethod
    def shape(node: Any) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        shape = getattr(meta, "shape", None)
        return None if shape is None else tuple(shape)

    def fixed(self, shape: tuple[int, ...]) -> tuple[Label, ...]:
        return tuple(self.dims.new(n, fixed=True) for n in shape)

    def fixed_out(self, node: fx.Node, *, fixed: bool = True) -> Any:
        """Fresh labels for a node's output(s); ``fixed=False``: floating (fixed unless coupled)."""

        def new(shape: Any) -> tuple[Label, ...]:
            return tuple(self.dims.new(n, fixed=fixed) for n in shape)

        meta = node.meta.get("tensor_meta")
        if getattr(meta, "shape", None) is not None:
            return new(tuple(meta.shape))  # type: ignore[union-attr]
        if isinstance(meta, (tuple, list)):
            return Multi(new(tuple(m.shape)) if hasattr(m, "shape") else None for m in meta)
        return None

    def labels(self, a: Any) -> tuple[Label, ...] | None:
        v = self.env.get(a) if isinstance(a, fx.Node) else None
        return None if isinstance(v, Multi) else v

    def where(self, node: fx.Node) -> str:
        if node.op == "call_module":
            mod = self.modules[str(node.target)]
            return f"layer {node.target!r} ({type(mod).__name__})"
        fn = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "?")
        stack = node.meta.get("nn_module_stack") or {}
        inside = f"in layer {list(stack)[-1]!r}" if stack else "in the model's own forward"
        return f"op {fn!r} (node {node.name!r}, {inside})"

    def hint(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"pass {node.target!r} in not_scaled to keep it (and the channels it touches) at full width"
        stack = list(node.meta.get("nn_module_stack") or {})
        if stack:
            return f"pass {stack[-1]!r} in not_scaled to keep it at full width"
        return "move it into a submodule and pass that submodule's name in not_scaled"

    def refuse_scaled(self, node: fx.Node, reason: str, labs: Any) -> None:
        msg = f"{self.where(node)}: {reason}; {self.hint(node)}"
        for lab in labs:
            self.dims.require_fixed(lab, msg)

    def unify(self, a: Label, b: Label, node: fx.Node) -> None:
        if isinstance(a, Flat) and isinstance(b, Flat) and a.block == b.block:
            self.dims.union(a.var, b.var, self.where(node))
        elif isinstance(a, Cat) and isinstance(b, Cat) and a.sizes == b.sizes:
            for u, v in zip(a.parts, b.parts, strict=True):
                self.dims.union(u, v, self.where(node))
        elif isinstance(a, int) and isinstance(b, int):
            self.dims.union(a, b, self.where(node))
        else:
            self.refuse_scaled(
                node, "couples a flattened or concatenated channel dim with a different one", (a, b)
            )

    def record(self, key: str, labs: tuple[Label, ...], node: fx.Node) -> None:
        if key not in self.keys:
            return
        old = self.params.get(key)
        if old is None:
            self.params[key] = labs
        else:  # a module called twice: both calls share its weights
            for a, b in zip(old, labs, strict=True):
                self.unify(a, b, node)

    def generic(self, node: fx.Node, reason: str) -> Any:
        """An op the plan does not know: fine on unscaled tensors, refused on scaled ones."""
        tensors: list[tuple[Label, ...]] = []
        fx.node.map_arg((node.args, node.kwargs), lambda a: tensors.append(self.labels(a) or ()))
        out = self.fixed_out(node, fixed=False)  # may not scale either: refused if coupled
        outs = out if isinstance(out, Multi) else (out,)
        labs = [lab for t in (*tensors, *outs) if t for lab in t]
        self.refuse_scaled(node, reason, labs)
        return out

    # ------------------------------------------------------------------ node kinds
    def _placeholder(self, node: fx.Node) -> Any:
        return self.fixed_out(node)

    def _output(self, node: fx.Node) -> None:
        return None

    def _get_attr(self, node: fx.Node) -> Any:
        shape = self.shape(node)
        if shape is None:
            return None
        labs = tuple(self.dims.new(n) for n in shape)  # floating: fixed unless coupled
        self.record(str(node.target), labs, node)
        return labs

    def _call_module(self, node: fx.Node) -> Any:
        name = str(node.target)
        if name in self.opaque:
            tensors: list[tuple[Label, ...]] = []
            fx.node.map_arg(node.args, lambda a: tensors.append(self.labels(a) or ()))
            for lab in (lab for t in tensors for lab in t):  # declared full width
                for v in vars_of(lab):
                    self.dims.fix(v)
            return self.fixed_out(node)
        mod = self.modules[name]
        x = self.labels(node.args[0]) if node.args else None
        if x is None:
            return self.generic(node, "takes no tensor the plan can follow")
        if isinstance(mod, PASS_MODULES) and len(x) == len(self.shape(node) or ()):
            return x
        if isinstance(mod, (nn.Flatten, nn.Unflatten)):
            return self.reshape(node, x)
        return self.module_rule(node, mod, name, x, _within(name, self.heads))

    def _call_function(self, node: fx.Node) -> Any:
        return self.function(node, node.target)

    def _call_method(self, node: fx.Node) -> Any:
        return self.function(node, str(node.target))

    def function(self, node: fx.Node, fn: Any) -> Any:
        if fn is operator.getitem:  # before the meta check: tuple outputs have no tensor meta
            return self.getitem(node)
        if node.meta.get("tensor_meta") is None:
            return None  # sizes, dims, python values: nothing to scale
        x = self.labels(node.args[0]) if node.args else None
        if fn in CAT:
            return self.function_rule(node, fn, ())
        if fn in BINARY:  # also ``1 - x``: the first operand may be a number
            return self.broadcast(node)
        if x is None:
            return self.generic(node, "is an op whose channels the width plan cannot follow")
        if fn in PASS_FUNCS or fn in PASS_METHODS:
            return (
                x if len(x) == len(self.shape(node) or ()) else self.generic(node, "changes rank")
            )
        if fn in RESHAPE:
            return self.reshape(node, x)
        if fn in TRANSPOSE:
            return self.transpose(node, x)
        return self.function_rule(node, fn, x)

    def module_rule(
        self, node: fx.Node, mod: nn.Module, name: str, x: tuple[Label, ...], head: bool
    ) -> Any:  # overridden by width_layers.LayerTrace
        return self.generic(node, f"{type(mod).__name__} is not known to the width plan")

    def function_rule(self, node: fx.Node, fn: Any, x: tuple[Label, ...]) -> Any:
        return self.generic(node, "is an op whose channels the width plan cannot follow")

    # ------------------------------------------------------------------ shared rules
    def broadcast(self, node: fx.Node) -> tuple[Label, ...]:
        ins: list[tuple[tuple[Label, ...], tuple[int, ...]]] = []
        for a in node.args:
            lab, shp = self.labels(a), self.shape(a)
            if lab is not None and shp is not None:
                ins.append((lab, shp))
        out_shape = self.shape(node) or ()
        out: list[Label] = []
        for k in range(len(out_shape), 0, -1):
            big = [lab[-k] for lab, s in ins if len(s) >= k and s[-k] != 1]
            if not big:
                out.append(self.dims.new(1, fixed=True))
                continue
            for other in big[1:]:
                self.unify(big[0], other, node)
            out.append(big[0])
        return tuple(out)

    def reshape(self, node: fx.Node, x: tuple[Label, ...]) -> tuple[Label, ...]:
        a, b = self.shape(node.args[0]) or (), self.shape(node) or ()
        out: list[Label | None] = [None] * len(b)
        for ins, outs in align(a, b):
            ins_nz = [i for i in ins if a[i] != 1]
            outs_nz = [o for o in outs if b[o] != 1]
            for o in outs:
                out[o] = self.dims.new(b[o], fixed=True)
            if len(ins_nz) <= 1 and len(outs_nz) <= 1:
                if ins_nz and outs_nz:
                    out[outs_nz[0]] = x[ins_nz[0]]
            elif len(outs_nz) == 1:  # merge: the outermost dim may scale, inner ones not
                for i in ins_nz[1:]:
                    self.refuse_scaled(
                        node, "merges a width-scaled dim that is not outermost", (x[i],)
                    )
                block = math.prod(a[i] for i in ins_nz[1:])
                lead = x[ins_nz[0]]
                if isinstance(lead, Cat):
                    self.refuse_scaled(node, "flattens concatenated channels", (lead,))
                    continue
                lead_var, lead_block = (
                    (lead.var, lead.block) if isinstance(lead, Flat) else (lead, 1)
                )
                out[outs_nz[0]] = Flat(lead_var, lead_block * block)
            else:
                self.refuse_scaled(
                    node, "splits or reorders a width-scaled dim", [x[i] for i in ins]
                )
        if isinstance(node.target, str) and node.target in ("view", "reshape"):
            sizes = node.args[1:]
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = tuple(sizes[0])
            for k, s in enumerate(sizes):
                lab = out[k] if k < len(out) else None
                if isinstance(s, int) and s != -1 and lab is not None:
                    self.refuse_scaled(
                        node, f"hard-codes size {s} of a width-scaled dim (write "
                        "x.flatten(1) or x.view(x.size(0), -1))", (lab,),
                    )  # fmt: skip
        return tuple(lab for lab in out if lab is not None)

    def transpose(self, node: fx.Node, x: tuple[Label, ...]) -> tuple[Label, ...]:
        args = list(node.args[1:])
        if node.target in (torch.transpose, "transpose"):
            d0, d1 = (int(cast(int, d)) % len(x) for d in args[:2])
            order = list(range(len(x)))
            order[d0], order[d1] = d1, d0
        else:
            perm = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
            order = [int(cast(int, d)) % len(x) for d in perm]
        return tuple(x[d] for d in order)

    def getitem(self, node: fx.Node) -> Any:
        src, idx = node.args[0], node.args[1]
        v = self.env.get(src) if isinstance(src, fx.Node) else None
        if isinstance(v, Multi):
            return v[idx] if isinstance(idx, int) else self.generic(node, "slices op outputs")
        if v is None or node.meta.get("tensor_meta") is None:
            return None if node.meta.get("tensor_meta") is None else self.generic(node, "indexes")
        items = idx if isinstance(idx, tuple) else (idx,)
        consumed = sum(1 for it in items if isinstance(it, (int, slice)))
        out: list[Label] = []
        k = 0
        for it in items:
            if it is None:
                out.append(self.dims.new(1, fixed=True))
            elif it is Ellipsis:
                out.extend(v[k : k + len(v) - consumed])
                k += len(v) - consumed
            elif isinstance(it, int):
                self.refuse_scaled(node, "picks one entry of a width-scaled dim", (v[k],))
                k += 1
            elif isinstance(it, slice):
                if it != slice(None):
                    self.refuse_scaled(node, "slices a width-scaled dim", (v[k],))
                    out.append(self.dims.new((self.shape(node) or ())[len(out)], fixed=True))
                else:
                    out.append(v[k])
                k += 1
            else:
                return self.generic(node, "indexes with tensors")
        out.extend(v[k:])
        if len(out) != len(self.shape(node) or ()):
            return self.generic(node, "indexes in a way the plan cannot follow")
        return tuple(out)
