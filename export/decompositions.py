"""The aten decomposition table that makes a training step exportable to plain ONNX.

``make_fx`` traces a training step down to aten ops; the ONNX exporter then has to
translate every op it sees. Three things go silently wrong without this table
(see DESIGN.md, "Training on the device with stock onnxruntime"):

* ``nll_loss`` keeps ``total_weight=1`` unless the core decompositions run, so
  gradients come out batch-size times too large;
* ``aten.convolution_backward`` has neither an ONNX translation nor a torch
  decomposition: :func:`convolution_backward` below writes it as two forward
  convolutions (grad-input as a transposed convolution, grad-weight as a
  convolution over the batch);
* batch norm is exported in inference mode unless ``native_batch_norm`` (and its
  ``_legit`` variants) are decomposed first, so the batch statistics and the
  running-stat update are spelled out in elementwise ops.

``max_pool2d_with_indices_backward`` has a torch decomposition that is not in the
core table; it is added here. Adaptive average pooling to 1x1 traces as a ``mean``
and needs no backward rule of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

aten = torch.ops.aten

# Ops whose stock torch decompositions must run even though the core table skips them.
_EXTRA_TORCH_DECOMPOSITIONS = (
    aten.max_pool2d_with_indices_backward,
    aten.native_batch_norm,
    aten._native_batch_norm_legit,
    aten._native_batch_norm_legit_functional,
    aten._native_batch_norm_legit_no_training,
    aten.native_group_norm,
)


def _grad_input(
    grad_out: torch.Tensor,  # (N, Cout, *out)
    input_shape: Sequence[int],  # (N, Cin, *in)
    weight: torch.Tensor,  # (Cout, Cin/G, *k)
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """dL/dx as a transposed convolution with the same weight; output_padding recovers
    the input rows that a strided forward convolution never reached."""
    spatial_in = input_shape[2:]
    spatial_out = grad_out.shape[2:]
    out_pad = []
    for i, (n_in, n_out) in enumerate(zip(spatial_in, spatial_out, strict=True)):
        k = weight.shape[2 + i]
        reached = (n_out - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k - 1) + 1
        out_pad.append(int(n_in) - int(reached))
    return aten.convolution.default(
        grad_out, weight, None, stride, padding, dilation, True, out_pad, groups
    )


def _grad_weight(
    grad_out: torch.Tensor,  # (N, Cout, *out)
    inp: torch.Tensor,  # (N, Cin, *in)
    weight_shape: Sequence[int],  # (Cout, Cin/G, *k)
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """dL/dW as a convolution over the batch.

    Per group g: the input channels act as the batch, the samples as the channels,
    and grad_out is the kernel; forward stride and dilation swap roles. All groups
    run as one grouped convolution with G*N input channels.
    """
    n, c_in = inp.shape[0], inp.shape[1]
    c_out = grad_out.shape[1]
    spatial = tuple(inp.shape[2:])
    spatial_out = tuple(grad_out.shape[2:])
    g = groups
    cin_g, cout_g = c_in // g, c_out // g
    nd = len(spatial)
    # input (N, Cin, *S) -> (Cin/G, G*N, *S): channel index g*N + n
    x = inp.reshape(n, g, cin_g, *spatial).permute(2, 1, 0, *range(3, 3 + nd))
    x = x.reshape(cin_g, g * n, *spatial)
    # grad_out (N, Cout, *So) -> (G*Cout/G, N, *So): out channel g*cout_g + j reads group g
    w = grad_out.reshape(n, g, cout_g, *spatial_out).permute(1, 2, 0, *range(3, 3 + nd))
    w = w.reshape(g * cout_g, n, *spatial_out)
    gw = aten.convolution.default(x, w, None, dilation, padding, stride, False, [0] * nd, g)
    # gw: (Cin/G, Cout, *k') with k' >= k; the extra taps never touched the real input
    for i, k in enumerate(weight_shape[2:]):
        gw = gw.narrow(2 + i, 0, int(k))
    return gw.transpose(0, 1)  # (Cout, Cin/G, *k)


def convolution_backward(
    grad_out: torch.Tensor,
    inp: torch.Tensor,
    weight: torch.Tensor,
    bias_sizes: Sequence[int] | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Decomposition of ``aten.convolution_backward`` for forward (not transposed) convs."""
    if transposed:
        return NotImplemented  # type: ignore[return-value]
    nd = inp.dim() - 2
    stride, padding, dilation = (_expand(v, nd) for v in (stride, padding, dilation))
    gi = gw = gb = None
    if output_mask[0]:
        gi = _grad_input(grad_out, inp.shape, weight, stride, padding, dilation, groups)
    if output_mask[1]:
        gw = _grad_weight(grad_out, inp, weight.shape, stride, padding, dilation, groups)
    if output_mask[2]:
        gb = grad_out.sum([0, *range(2, 2 + nd)])
    return gi, gw, gb


def _expand(v: Sequence[int], nd: int) -> list[int]:
    v = list(v)
    return v * nd if len(v) == 1 else v


def full_like(
    x: torch.Tensor,
    fill_value: float,
    *,
    dtype: torch.dtype | None = None,
    layout: torch.layout | None = None,
    device: torch.device | None = None,
    pin_memory: bool | None = None,
    memory_format: torch.memory_format | None = None,
) -> torch.Tensor:
    """``full_like`` from the shape alone, so an ``empty_permuted`` source (which has no
    ONNX translation; BCE-with-logits' decomposition makes one) drops out of the graph."""
    return aten.full.default(x.shape, fill_value, dtype=dtype or x.dtype, device=device or x.device)


def training_decompositions() -> dict[torch._ops.OperatorBase, Callable]:
    """Core aten table + the extras above: pass to ``make_fx(decomposition_table=...)``."""
    from torch._decomp import core_aten_decompositions, get_decompositions

    table = dict(core_aten_decompositions())
    table.update(get_decompositions(list(_EXTRA_TORCH_DECOMPOSITIONS)))
    table[aten.convolution_backward.default] = convolution_backward
    table[aten.full_like.default] = full_like
    return table
