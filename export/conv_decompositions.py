"""Convolutions in a training step as ops onnxruntime runs fast: the forward as
im2col + GEMM (:func:`convolution`), and ``aten.convolution_backward``, which has
neither an ONNX translation nor a torch decomposition (:func:`convolution_backward`).

The backward is written as two forward convolutions (grad-input as a transposed
convolution, grad-weight as a convolution over the batch), except that an ungrouped
2-d convolution's weight gradient is one GEMM over im2col columns. Registered in
:func:`export.decompositions.training_decompositions`, whose docstring says why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

aten = torch.ops.aten

# im2col + GEMM beats onnxruntime's Conv only when the GEMM is deep enough (Cin*kh*kw)
_MIN_IM2COL_DEPTH = 64


def expand(v: Sequence[int], nd: int) -> list[int]:
    """An aten int-list argument for ``nd`` dims (a single value repeats)."""
    v = list(v)
    return v * nd if len(v) == 1 else v


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
    if groups == 1 and inp.dim() == 4:
        return _grad_weight_im2col(grad_out, inp, weight_shape, stride, padding, dilation)
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


def _conv_out_size(
    spatial: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[int, int]:
    """(Ho, Wo) of a 2-d convolution (torch's formula, floor mode)."""
    return tuple(  # type: ignore[return-value]
        (int(n) + 2 * p - d * (int(k) - 1) - 1) // s + 1
        for n, k, s, p, d in zip(spatial, kernel, stride, padding, dilation, strict=True)
    )


def _im2col(
    x: torch.Tensor,  # (N, Cin, H, W)
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> torch.Tensor:
    """im2col columns ``(Cin*kh*kw, N*Ho*Wo)`` of a 2-d convolution's input: the kernel
    taps' strided slices of the padded input, channels first. The forward convolution
    and its weight gradient build the very same nodes from the same input, so
    onnxruntime's common-subexpression pass computes them once."""
    n, c_in, h, w = x.shape
    kh, kw = int(kernel[0]), int(kernel[1])
    ho, wo = _conv_out_size((h, w), (kh, kw), stride, padding, dilation)
    xt = x.transpose(0, 1)  # (Cin, N, H, W)
    if any(padding):
        xt = aten.constant_pad_nd.default(xt, [padding[1], padding[1], padding[0], padding[0]], 0.0)
    taps = [
        xt[
            :,
            :,
            i * dilation[0] : i * dilation[0] + (ho - 1) * stride[0] + 1 : stride[0],
            j * dilation[1] : j * dilation[1] + (wo - 1) * stride[1] + 1 : stride[1],
        ]
        for i in range(kh)
        for j in range(kw)
    ]
    return torch.stack(taps, 1).reshape(c_in * kh * kw, n * ho * wo)


def _grad_weight_im2col(
    grad_out: torch.Tensor,  # (N, Cout, Ho, Wo)
    inp: torch.Tensor,  # (N, Cin, H, W)
    weight_shape: Sequence[int],  # (Cout, Cin, kh, kw)
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> torch.Tensor:
    """dL/dW of an ungrouped 2-d convolution as one MatMul over im2col columns.

    The batch-as-channels convolution of :func:`_grad_weight` has a kernel as large
    as the image and a 3x3 output: onnxruntime's im2col GEMM runs it ~2x slower than
    the forward convolution. Here the columns ``(Cin*kh*kw, N*Ho*Wo)`` times grad_out
    as ``(N*Ho*Wo, Cout)`` is a single large GEMM.
    """
    n, c_in = inp.shape[0], inp.shape[1]
    c_out, kh, kw = weight_shape[0], int(weight_shape[2]), int(weight_shape[3])
    ho, wo = int(grad_out.shape[2]), int(grad_out.shape[3])
    cols = _im2col(inp, (kh, kw), stride, padding, dilation)
    go = grad_out.permute(0, 2, 3, 1).reshape(n * ho * wo, c_out)
    gw_t = torch.mm(cols, go)  # (Cin*kh*kw, Cout)
    return gw_t.transpose(0, 1).reshape(c_out, c_in, kh, kw)


def convolution(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """An ungrouped 2-d forward convolution as im2col + one GEMM over the whole batch.

    In a step graph the weights are inputs, not initializers, so onnxruntime cannot
    pre-pack them for its NCHWc convolution kernels; its generic Conv runs one small
    GEMM per sample. The columns are shared with the weight gradient."""
    if transposed or groups != 1 or x.dim() != 4 or math.prod(weight.shape[1:]) < _MIN_IM2COL_DEPTH:
        return NotImplemented  # type: ignore[return-value]
    stride, padding, dilation = (expand(v, 2) for v in (stride, padding, dilation))
    n = x.shape[0]
    c_out = weight.shape[0]
    cols = _im2col(x, weight.shape[2:], stride, padding, dilation)
    out = torch.mm(weight.reshape(c_out, -1), cols)  # (Cout, N*Ho*Wo)
    if bias is not None:
        out = out + bias.reshape(c_out, 1)
    out = out.reshape(c_out, n, -1).transpose(0, 1)  # (N, Cout, Ho*Wo)
    ho, wo = _conv_out_size(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    return out.reshape(n, c_out, ho, wo)


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
    stride, padding, dilation = (expand(v, nd) for v in (stride, padding, dilation))
    gi = gw = gb = None
    if output_mask[0]:
        gi = _grad_input(grad_out, inp.shape, weight, stride, padding, dilation, groups)
    if output_mask[1]:
        gw = _grad_weight(grad_out, inp, weight.shape, stride, padding, dilation, groups)
    if output_mask[2]:
        gb = grad_out.sum([0, *range(2, 2 + nd)])
    return gi, gw, gb
