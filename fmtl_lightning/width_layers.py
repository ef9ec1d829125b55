"""Width-plan rules for layers with weights and for ops that combine tensors.

:class:`LayerTrace` extends :class:`fmtl_lightning.width_ops.Trace` with the rules of
conv / linear / embedding / norm layers (which create or follow channel groups and
label their weights) and of ``matmul``, reductions, ``expand`` and ``cat``.
"""

from __future__ import annotations

from typing import Any, cast

import torch.fx as fx
from torch import nn

from fmtl_lightning.layers import FlattenLinear
from fmtl_lightning.static_bn import StaticBatchNorm2d
from fmtl_lightning.width_dims import Cat, Flat, Label, Multi, vars_of
from fmtl_lightning.width_ops import CAT, EXPAND, MATMUL, REDUCE, Trace


class LayerTrace(Trace):
    """The FX pass of :func:`fmtl_lightning.width_plan.infer_plan`."""

    def _plain(self, node: fx.Node, lab: Label) -> int | Cat:
        if isinstance(lab, Flat):
            self.refuse_scaled(node, "takes a flattened channel map as channels", (lab,))
            return lab.var
        return lab

    def _weights(self, name: str, node: fx.Node, **labs: tuple[Label, ...]) -> None:
        for leaf, lab in labs.items():
            self.record(f"{name}.{leaf}", lab, node)

    def module_rule(
        self, node: fx.Node, mod: nn.Module, name: str, x: tuple[Label, ...], head: bool
    ) -> Any:
        d = self.dims
        if isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed:
            cin = self._plain(node, x[1])
            k = self.fixed(tuple(mod.kernel_size))
            g, cout = mod.groups, mod.out_channels
            out: Label
            if g == 1:
                out = d.new(cout, fixed=head, source=name)
                w: tuple[Label, ...] = (out, cin, *k)
            elif mod.in_channels == cout:  # depthwise / grouped, in == out: coupled
                if isinstance(cin, Cat) and g != cout:
                    self.refuse_scaled(
                        node, "a grouped conv over concatenated channels would regroup them "
                        "when they scale", (cin,),
                    )  # fmt: skip
                if head:
                    for v in vars_of(cin):
                        d.fix(v)
                out = cin
                w = (out, d.new(mod.in_channels // g, fixed=True), *k)
            else:
                reason = (
                    "a depthwise conv with a channel multiplier"
                    if g == mod.in_channels
                    else "a grouped conv with in_channels != out_channels"
                ) + " cannot keep whole groups when its channels scale"
                self.refuse_scaled(node, reason, (cin,))
                out = d.new(cout, fixed=True)
                w = (out, d.new(mod.in_channels // g, fixed=True), *k)
            self._weights(name, node, weight=w, bias=(out,))
            return (x[0], out, *self.fixed((self.shape(node) or ())[2:]))
        if isinstance(mod, nn.Linear):
            out = d.new(mod.out_features, fixed=head, source=name)
            self._weights(name, node, weight=(out, x[-1]), bias=(out,))
            return (*x[:-1], out)
        if isinstance(mod, FlattenLinear):  # (B, C, H, W) -> (B, out), weight (out, C, H, W)
            out = d.new(mod.weight.shape[0], fixed=head, source=name)
            hw = self.fixed(tuple(mod.weight.shape[2:]))
            self._weights(name, node, weight=(out, self._plain(node, x[1]), *hw), bias=(out,))
            return (x[0], out)
        if isinstance(mod, nn.Embedding):
            out = d.new(mod.embedding_dim, fixed=head, source=name)
            self._weights(name, node, weight=(d.new(mod.num_embeddings, fixed=True), out))
            return (*x, out)
        if isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
            c = self._plain(node, x[1])
            stats = isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats
            if not mod.affine and not stats:
                self.refuse_scaled(node, "has no parameters or statistics to slice", (c,))
            self._weights(
                name, node, weight=(c,), bias=(c,), running_mean=(c,), running_var=(c,),
                num_batches_tracked=(),
            )  # fmt: skip
            return x
        if isinstance(mod, StaticBatchNorm2d):
            c = self._plain(node, x[1])
            self._weights(name, node, weight=(c,), bias=(c,), running_mean=(c,), running_var=(c,))
            return x
        if isinstance(mod, nn.LayerNorm):
            n = len(mod.normalized_shape)
            if n != 1 or not mod.elementwise_affine:
                why = "normalizes over several dims" if n != 1 else "has no affine parameters"
                self.refuse_scaled(node, f"{why}, so its shape cannot follow width", x[-n:])
            self._weights(name, node, weight=tuple(x[-n:]), bias=tuple(x[-n:]))
            return x
        if isinstance(mod, nn.MultiheadAttention):
            return self.attention(node, mod, name, head)
        return self.generic(node, f"{type(mod).__name__} is not known to the width plan")

    def attention(self, node: fx.Node, mod: nn.MultiheadAttention, name: str, head: bool) -> Any:
        """Embedding dim = one group (query, key, value, output); heads keep their size."""
        if not mod._qkv_same_embed_dim or mod.bias_k is not None:
            return self.generic(
                node, "nn.MultiheadAttention with kdim/vdim != embed_dim or add_bias_kv "
                "is not known to the width plan",
            )  # fmt: skip
        names = ("query", "key", "value")
        qkv = [
            node.kwargs.get(n, node.args[i] if i < len(node.args) else None)
            for i, n in enumerate(names)
        ]
        labs = [self.labels(a) for a in qkv]
        if any(lab is None for lab in labs):
            return self.generic(node, "takes no tensor the plan can follow")
        e = labs[0][-1]  # type: ignore[index]
        for lab in labs[1:]:
            self.unify(e, lab[-1], node)  # type: ignore[index]
        if not isinstance(e, int):
            self.refuse_scaled(node, "attends over flattened or concatenated channels", (e,))
            e = self.dims.new(mod.embed_dim, fixed=True)
        if head:
            self.dims.fix(e)
        n = mod.embed_dim
        self._weights(
            name,
            node,
            in_proj_weight=(Cat((e, e, e), (n, n, n)), e),
            in_proj_bias=(Cat((e, e, e), (n, n, n)),),
        )
        self._weights(f"{name}.out_proj", node, weight=(e, e), bias=(e,))
        out = self.fixed_out(node)  # (attn_output, attn_weights or None)
        return Multi((tuple(labs[0][:-1]) + (e,), *out[1:]))  # type: ignore[index]

    def function_rule(self, node: fx.Node, fn: Any, x: tuple[Label, ...]) -> Any:
        out_shape = self.shape(node) or ()
        if fn in MATMUL:
            y = self.labels(node.args[1])
            if y is None or len(x) < 2 or len(y) < 2:
                return self.generic(node, "is a matmul on vectors")
            self.unify(x[-1], y[-2], node)  # the contracted dim
            batch: list[Label] = list(self.fixed(out_shape[:-2]))  # broadcast batch dims
            sx, sy = self.shape(node.args[0]) or (), self.shape(node.args[1]) or ()
            for k in range(1, len(batch) + 1):
                big = [
                    lab[-2 - k]
                    for lab, s in ((x, sx), (y, sy))
                    if len(s) >= 2 + k and s[-2 - k] != 1
                ]
                for other in big[1:]:
                    self.unify(big[0], other, node)
                if big:
                    batch[-k] = big[0]
            return (*batch, x[-2], y[-1])
        if fn in REDUCE:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            keep = bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))
            if dim is None:
                return self.fixed(out_shape)
            drop = {int(dd) % len(x) for dd in (dim if isinstance(dim, (tuple, list)) else (dim,))}
            if keep:
                return tuple(
                    self.dims.new(1, fixed=True) if i in drop else lab for i, lab in enumerate(x)
                )
            return tuple(lab for i, lab in enumerate(x) if i not in drop)
        if fn in EXPAND:
            in_shape = self.shape(node.args[0]) or ()
            out: list[Label] = list(self.fixed(out_shape))
            for k in range(1, len(in_shape) + 1):
                if in_shape[-k] == out_shape[-k]:
                    out[-k] = x[-k]
            return tuple(out)
        if fn in CAT:
            return self.cat(node)
        return self.generic(node, "is an op whose channels the width plan cannot follow")

    def cat(self, node: fx.Node) -> Any:
        """``torch.cat``: other dims couple; along ``dim`` the output is a :class:`Cat`."""
        args = node.args[0]
        parts = [self.labels(a) for a in args] if isinstance(args, (list, tuple)) else [None]
        if any(p is None for p in parts):
            return self.generic(node, "concatenates non-tensors")
        labs = [p for p in parts if p is not None]
        dim = int(cast(int, node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)))
        dim %= len(labs[0])
        for p in labs[1:]:
            for i, (a, b) in enumerate(zip(labs[0], p, strict=True)):
                if i != dim:
                    self.unify(a, b, node)
        pieces: list[int] = []
        sizes: list[int] = []
        for a, p in zip(args, labs, strict=True):  # type: ignore[arg-type]
            lab, n = p[dim], (self.shape(a) or ())[dim]
            if isinstance(lab, Cat):
                pieces += lab.parts
                sizes += lab.sizes
            elif isinstance(lab, Flat):
                self.refuse_scaled(node, "concatenates a flattened channel map", (lab,))
                pieces.append(self.dims.new(n, fixed=True))
                sizes.append(n)
            else:
                pieces.append(lab)
                sizes.append(n)
        out = list(labs[0])
        out[dim] = Cat(tuple(pieces), tuple(sizes)) if len(pieces) > 1 else pieces[0]
        return tuple(out)
