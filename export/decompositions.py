"""The aten decomposition table that makes a training step exportable to plain ONNX.

``make_fx`` traces a training step down to aten ops; the ONNX exporter then has to
translate every op it sees. Three things go silently wrong without this table
(see DESIGN.md, "Training on the device with stock onnxruntime"):

* ``nll_loss`` keeps ``total_weight=1`` unless the core decompositions run, so
  gradients come out batch-size times too large;
* ``aten.convolution_backward`` has neither an ONNX translation nor a torch
  decomposition: :func:`~export.conv_decompositions.convolution_backward` writes it
  as two forward convolutions (grad-input as a transposed convolution, grad-weight
  as a convolution over the batch);
* batch norm is exported in inference mode unless ``native_batch_norm`` (and its
  ``_legit`` variants) are decomposed first, so the batch statistics and the
  running-stat update are spelled out in elementwise ops.

``max_pool2d_with_indices_backward`` has a torch decomposition that is not in the
core table; it is added here. ``avg_pool2d_backward`` is listed in the core table but
has no decomposition (nor an ONNX translation): :func:`avg_pool2d_backward` writes it.
Adaptive average pooling to 1x1 traces as a ``mean`` and needs no backward rule of its
own. Two things are handled above autograd, while tracing (see
:func:`export.graphs.export_pure_function`): attention runs as its math (the fused CPU
kernel's backward has no ONNX translation), and :class:`SymbolicLinear` keeps the batch
axis symbolic through a Linear over (batch, tokens, dim).

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

from collections.abc import Callable, Sequence

import torch
from torch.overrides import TorchFunctionMode

from export.conv_decompositions import convolution, convolution_backward, expand

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


def _window_pool(kernel_size, stride, padding, dilation, ceil_mode, spatial):
    """``(kh, kw)`` when a 2-d max pool tiles its input (stride == kernel, no padding or
    dilation; rows/columns past the last full window are dropped as floor mode does),
    else None."""
    k = expand(kernel_size, 2)
    s = expand(stride, 2) if len(stride) else k
    pad, dil = expand(padding, 2), expand(dilation, 2)
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


def avg_pool2d_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: int | None,
) -> torch.Tensor:
    """Gradient of a 2-d average pool, which has neither an ONNX translation nor a torch
    decomposition: each kernel tap adds ``grad_out / divisor``, spread out by the stride
    (zeros between) and shifted to the tap's offset, cropped to the input. Refused
    (left as the aten op, which the exporter then names) when the divisor differs between
    windows: padding not counted, or ceil mode adding a partial window."""
    if x.dim() != 4:
        return NotImplemented  # type: ignore[return-value]
    k = expand(kernel_size, 2)
    s = expand(stride, 2) if len(stride) else k
    pad = expand(padding, 2)
    n, c = x.shape[0], x.shape[1]  # n symbolic: int() would fix the batch size
    h, w = int(x.shape[2]), int(x.shape[3])
    ho, wo = int(grad_out.shape[2]), int(grad_out.shape[3])
    floor = [
        (size + 2 * p - kk) // ss + 1 for size, p, kk, ss in zip((h, w), pad, k, s, strict=True)
    ]
    if (any(pad) and not count_include_pad and divisor_override is None) or [ho, wo] != floor:
        return NotImplemented  # type: ignore[return-value]
    g = grad_out / float(divisor_override or k[0] * k[1])
    # spread by the stride: (N, C, Ho, 1, Wo, 1) -> zero-padded (N, C, Ho, s0, Wo, s1)
    g = g.reshape(n, c, ho, 1, wo, 1)
    g = aten.constant_pad_nd.default(g, [0, s[1] - 1, 0, 0, 0, s[0] - 1], 0.0)
    g = g.reshape(n, c, ho * s[0], wo * s[1])
    hp, wp = h + 2 * pad[0], w + 2 * pad[1]
    total = None
    for i in range(k[0]):
        for j in range(k[1]):
            # place the tap's (stride-spread) gradient at offset (i, j) of the padded input
            t = aten.constant_pad_nd.default(
                g, [j, max(0, wp - j - wo * s[1]), i, max(0, hp - i - ho * s[0])], 0.0
            )
            t = t[:, :, :hp, :wp]
            total = t if total is None else total + t
    assert total is not None
    return total[:, :, pad[0] : pad[0] + h, pad[1] : pad[1] + w]


def _flat_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``x @ W.T + b`` with the leading dims flattened by shape symbols."""
    lead = x.shape[:-1]
    out = torch.mm(x.reshape(-1, x.shape[-1]), weight.t())
    if bias is not None:
        out = out + bias
    return out.reshape(*lead, weight.shape[0])


class SymbolicLinear(TorchFunctionMode):
    """Within the block, ``F.linear`` on inputs of more than 2 dims is a flatten + ``mm``.

    torch's own path for such inputs reads the concrete sizes (``aten.size``), which
    fixes the batch size of a symbolic trace: a Linear on (batch, tokens, dim), as in a
    transformer block or inside ``nn.MultiheadAttention``. ``linear`` is composite, so it
    never reaches the decomposition table; this mode catches it above autograd."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is torch._C._nn.linear and args and args[0].dim() > 2:
            return _flat_linear(*args, **kwargs)
        return func(*args, **kwargs)


def threshold_backward(grad_out: torch.Tensor, x: torch.Tensor, threshold: float) -> torch.Tensor:
    """ReLU's backward as a multiply by the 0/1 mask: onnxruntime's broadcasting
    ``Where`` (torch's decomposition) is several times slower than Cast + Mul."""
    return grad_out * (x > threshold).to(grad_out.dtype)


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
    table[aten.avg_pool2d_backward.default] = avg_pool2d_backward
    table[aten.convolution.default] = convolution
    return table
