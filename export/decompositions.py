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

The rest is speed: in a step graph the weights are inputs, so onnxruntime runs its
generic kernels and every op of the decomposed backward counts. Measured with
onnxruntime's profiler on the GroupNorm CNN at batch 32, 1 thread (BENCHMARKS.md,
``export``), the stock translations spent ~60% of the step in four places, each
replaced here:

* tiling max pools (stride == kernel) are an elementwise maximum over the window
  taps, and their backward routes the gradient by the first-maximum masks: the
  exporter's ``max_pool2d_with_indices`` runs a second full-size MaxPool to convert
  indices, and torch's backward is a ScatterElements;
* ReLU's backward is a multiply by the 0/1 mask, not a broadcasting ``Where``;
* an ungrouped 2-d convolution's weight gradient is one GEMM over im2col columns
  instead of a convolution whose kernel is the whole image, and deep enough forward
  convolutions use the same columns (one GEMM for the batch instead of one per
  sample).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

aten = torch.ops.aten

# im2col + GEMM beats onnxruntime's Conv only when the GEMM is deep enough (Cin*kh*kw)
_MIN_IM2COL_DEPTH = 64

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
    stride, padding, dilation = (_expand(v, 2) for v in (stride, padding, dilation))
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
    stride, padding, dilation = (_expand(v, nd) for v in (stride, padding, dilation))
    gi = gw = gb = None
    if output_mask[0]:
        gi = _grad_input(grad_out, inp.shape, weight, stride, padding, dilation, groups)
    if output_mask[1]:
        gw = _grad_weight(grad_out, inp, weight.shape, stride, padding, dilation, groups)
    if output_mask[2]:
        gb = grad_out.sum([0, *range(2, 2 + nd)])
    return gi, gw, gb


def _window_pool(kernel_size, stride, padding, dilation, ceil_mode, spatial):
    """``(kh, kw)`` when a 2-d max pool tiles its input (stride == kernel, no padding or
    dilation; rows/columns past the last full window are dropped as floor mode does),
    else None."""
    k = _expand(kernel_size, 2)
    s = _expand(stride, 2) if len(stride) else k
    pad, dil = _expand(padding, 2), _expand(dilation, 2)
    if s != k or any(pad) or any(d != 1 for d in dil) or len(spatial) != 2:
        return None
    if ceil_mode and any(int(n) % kk for n, kk in zip(spatial, k, strict=True)):
        return None
    return k


def _taps(x: torch.Tensor, k: Sequence[int]) -> list[torch.Tensor]:
    """The ``kh * kw`` window taps of ``x`` (N, C, H, W), each (N, C, H/kh, W/kw): tap
    ``i * kw + j`` holds element (i, j) of every window, in the row-major order torch
    scans a window in. Window row i is a slice of whole image rows; a 2-d transpose
    of it brings column j to the front as one contiguous block (strided slices and
    general transposes copy element by element in onnxruntime). Same-shape taps keep
    every later op plain elementwise (onnxruntime broadcasts over a small inner axis
    slowly)."""
    n, c = x.shape[0], x.shape[1]
    ho, wo = int(x.shape[2]) // k[0], int(x.shape[3]) // k[1]
    x = x.narrow(2, 0, ho * k[0]).narrow(3, 0, wo * k[1])
    rows = x.reshape(n * c * ho, k[0], wo * k[1])
    taps = []
    for i in range(k[0]):
        cols = rows[:, i].reshape(n * c * ho * wo, k[1]).transpose(0, 1)  # (kw, N C Ho Wo)
        taps += [cols[j].reshape(n, c, ho, wo) for j in range(k[1])]
    return taps


def _first_max(taps: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Window maxima and, per tap, the mask of windows whose first maximum it is."""
    m = taps[0]
    for t in taps[1:]:
        m = torch.maximum(m, t)
    masks, taken = [], None
    for t in taps:
        hit = t == m
        if taken is None:
            masks.append(hit)
            taken = hit
        else:
            masks.append(hit & ~taken)
            taken = taken | hit
    return m, masks


def max_pool2d_with_indices(
    x: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int] = (),
    padding: Sequence[int] = (0,),
    dilation: Sequence[int] = (1,),
    ceil_mode: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiling 2-d max pool as an elementwise maximum over the window taps. The
    exporter's own translation runs a second full-size MaxPool to turn ONNX indices
    into torch's; here the indices (flat ``h * W + w``, first maximum, as torch) are
    spelled out but :func:`max_pool2d_with_indices_backward` never reads them, so in a
    training step they are dead code."""
    if x.dim() != 4:
        return NotImplemented  # type: ignore[return-value]
    k = _window_pool(kernel_size, stride, padding, dilation, ceil_mode, x.shape[2:])
    if k is None:
        return NotImplemented  # type: ignore[return-value]
    values, masks = _first_max(_taps(x, k))
    w = int(x.shape[3])
    ho, wo = int(values.shape[2]), int(values.shape[3])
    rows = torch.arange(ho, dtype=torch.int64).reshape(ho, 1) * (k[0] * w)
    cols = torch.arange(wo, dtype=torch.int64).reshape(1, wo) * k[1]
    idx = rows + cols
    for t, mask in enumerate(masks):
        idx = idx + mask.to(torch.int64) * ((t // k[1]) * w + t % k[1])
    return values, idx


def max_pool2d_with_indices_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    ceil_mode: bool,
    indices: torch.Tensor,
) -> torch.Tensor:
    """Gradient of a tiling max pool: each window's output gradient goes to the first
    maximum of the window (torch's arg-max), found again from the input instead of a
    scatter over the flat indices."""
    k = None
    if x.dim() == 4:
        k = _window_pool(kernel_size, stride, padding, dilation, ceil_mode, x.shape[2:])
    if k is None:  # overlapping or padded windows: torch's scatter over the indices
        from torch._decomp.decompositions import max_pool2d_with_indices_backward as stock

        return stock(grad_out, x, kernel_size, stride, padding, dilation, ceil_mode, indices)
    n, c, h, w = x.shape
    _, masks = _first_max(_taps(x, k))
    g = torch.stack([grad_out * mk.to(grad_out.dtype) for mk in masks])  # (kh*kw, N, C, Ho, Wo)
    ho, wo = int(grad_out.shape[2]), int(grad_out.shape[3])
    # interleave the taps back into (N, C, H, W) with two single-axis transposes: one
    # general 6-d transpose (what a single permute becomes) is ~7x slower in onnxruntime,
    # and the reshape between the two keeps its optimizer from fusing them into one
    g = g.reshape(k[0], k[1], n * c, ho, wo).permute(1, 2, 3, 0, 4)  # (kw, NC, Ho, kh, Wo)
    g = g.reshape(k[1], n * c * ho * k[0], wo).permute(1, 2, 0)  # (NC Ho kh, Wo, kw)
    g = g.reshape(n, c, ho * k[0], wo * k[1])
    pad_h, pad_w = int(h) - ho * k[0], int(w) - wo * k[1]
    if pad_h or pad_w:
        g = aten.constant_pad_nd.default(g, [0, pad_w, 0, pad_h], 0.0)
    return g


def threshold_backward(grad_out: torch.Tensor, x: torch.Tensor, threshold: float) -> torch.Tensor:
    """ReLU's backward as a multiply by the 0/1 mask: onnxruntime's broadcasting
    ``Where`` (torch's decomposition) is several times slower than Cast + Mul."""
    return grad_out * (x > threshold).to(grad_out.dtype)


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
    table[aten.max_pool2d_with_indices.default] = max_pool2d_with_indices
    table[aten.max_pool2d_with_indices_backward.default] = max_pool2d_with_indices_backward
    table[aten.threshold_backward.default] = threshold_backward
    table[aten.convolution.default] = convolution
    return table
