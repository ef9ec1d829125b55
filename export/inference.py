"""Inference graphs: a backbone (x -> features) and a task head (features -> logits).

Backbone and heads are separate files, so a device holds one backbone per width
and one small file per task, and a server can swap a head without touching the
backbone. Both run in eval mode with a dynamic batch axis.

Two layouts:

* ``weights_as_inputs=False`` (default): weights are baked into the file; the
  graph input is just ``x`` (or ``features``). The ONNX optimizer may fold
  weights together (e.g. GroupNorm's affine into constants), so the file's
  initializers do NOT map one-to-one onto state-dict keys, and
  :attr:`GraphInfo.weights` is empty.
* ``weights_as_inputs=True``: every state-dict tensor is a graph input
  (``p_*`` params, ``b_*`` buffers, before ``x``), named after its key, with the
  map in :attr:`GraphInfo.weights`. A client that trained locally feeds its own
  weights without rewriting the file (DESIGN.md: do not swap initializers at
  session level).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from export.graphs import (
    ExportError,
    GraphInfo,
    describe,
    export_pure_function,
    name_batch_axis,
    save_checked,
    shared_torchlib_registry,
    trace_batch,
    unique_names,
)
from export.trainstep import mode


def _export_module(
    module: nn.Module,
    example: torch.Tensor,
    in_name: str,
    out_name: str,
    path: Path,
    opset: int,
    kind: str,
    weights_as_inputs: bool,
) -> GraphInfo:
    with mode(module, training=False):
        if weights_as_inputs:
            return _export_functional(module, example, in_name, out_name, path, opset, kind)
        # a batch of 1 would be specialised away; trace at a size no other dim has
        b = trace_batch(module.state_dict().values(), example.shape[1:])
        x = torch.zeros(b, *example.shape[1:], dtype=example.dtype)
        batch = torch.export.Dim("batch", min=1)
        with shared_torchlib_registry():
            program = torch.onnx.export(
                module,
                (x,),
                dynamo=True,
                opset_version=opset,
                input_names=[in_name],
                output_names=[out_name],
                dynamic_shapes=({0: batch},),
                optimize=True,
                verbose=False,
            )
    if program is None:
        raise ExportError(f"{path}: torch.onnx.export returned no program")
    proto = program.model_proto
    name_batch_axis(proto)
    save_checked(proto, path)
    ins, outs = describe(proto)
    return GraphInfo(str(path), kind, opset, ins, outs)


def _export_functional(
    module: nn.Module,
    example: torch.Tensor,
    in_name: str,
    out_name: str,
    path: Path,
    opset: int,
    kind: str,
) -> GraphInfo:
    """``(*params, *buffers, x) -> y`` through make_fx, so no weight is baked in."""
    pk = [k for k, _ in module.named_parameters()]
    bk = [k for k, _ in module.named_buffers()]
    # integer buffers (num_batches_tracked) are unused in eval mode: leave them out
    bk = [k for k in bk if module.get_buffer(k).is_floating_point()]
    state = module.state_dict()
    b = trace_batch(state.values(), example.shape[1:])
    x = torch.zeros(b, *example.shape[1:], dtype=example.dtype)
    keys = [*pk, *bk]
    args = [state[k].detach().clone() for k in keys] + [x]

    def forward(*a: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(module, dict(zip(keys, a[:-1], strict=True)), (a[-1],))

    names = {**unique_names("p_", pk), **unique_names("b_", bk)}
    in_names = [*names, in_name]
    proto = export_pure_function(forward, args, {len(keys)}, in_names, [out_name], path, opset)
    ins, outs = describe(proto)
    return GraphInfo(str(path), kind, opset, ins, outs, weights=names, weights_as_inputs=True)


def export_backbone(
    backbone: nn.Module,
    path: Path | str,
    example_x: torch.Tensor,
    opset: int = 18,
    *,
    weights_as_inputs: bool = False,
) -> GraphInfo:
    """Export ``backbone`` in eval mode: ``x`` (batch, C, H, W) -> ``features`` (batch, F).

    ``example_x`` fixes the per-sample shape and dtype; the batch axis is dynamic.
    """
    return _export_module(
        backbone, example_x, "x", "features", Path(path), opset, "backbone", weights_as_inputs
    )


def export_head(
    head: nn.Linear,
    path: Path | str,
    feature_dim: int,
    opset: int = 18,
    *,
    weights_as_inputs: bool = False,
) -> GraphInfo:
    """Export a task head: ``features`` (batch, F) -> ``logits`` (batch, n)."""
    example = torch.zeros(2, feature_dim)
    return _export_module(
        head, example, "features", "logits", Path(path), opset, "head", weights_as_inputs
    )
