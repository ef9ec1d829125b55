"""The hand-written convolution backward against autograd, over strides, padding,
dilation and groups (incl. depthwise), plus the decomposition table's contents."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from export.conv_decompositions import convolution_backward
from export.decompositions import training_decompositions

aten = torch.ops.aten

CASES = [
    # (cin, cout, groups, kernel, stride, padding, dilation, H, W)
    (3, 5, 1, 3, 1, 1, 1, 9, 10),
    (4, 6, 1, 3, 2, 1, 1, 28, 28),  # strided: output_padding needed
    (4, 6, 1, 3, 2, 1, 1, 7, 8),
    (4, 4, 4, 3, 2, 1, 1, 14, 14),  # depthwise, strided
    (4, 8, 2, 3, 1, 2, 2, 11, 9),  # grouped, dilated
    (4, 4, 1, 1, 1, 0, 1, 7, 7),  # pointwise
    (2, 3, 1, 5, 3, 2, 1, 13, 12),
    (6, 6, 3, 3, 2, 0, 2, 15, 16),
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_convolution_backward_matches_autograd(case: tuple[int, ...]) -> None:
    cin, cout, g, k, s, p, d, h, w = case
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, cin, h, w, dtype=torch.float64, generator=gen, requires_grad=True)
    wt = torch.randn(cout, cin // g, k, k, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(cout, dtype=torch.float64, generator=gen, requires_grad=True)
    y = F.conv2d(x, wt, b, s, p, d, g)
    go = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    want = torch.autograd.grad(y, (x, wt, b), go)
    got = convolution_backward(
        go, x.detach(), wt.detach(), [cout], [s], [p], [d], False, [0, 0], g, [True] * 3
    )
    for name, gt, wn in zip(("input", "weight", "bias"), got, want, strict=True):
        assert gt is not None and gt.shape == wn.shape, name
        torch.testing.assert_close(gt, wn, rtol=1e-10, atol=1e-10, msg=name)


def test_output_mask_skips_unwanted_grads() -> None:
    x, wt = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    go = torch.randn(2, 4, 4, 4)
    gi, gw, gb = convolution_backward(
        go, x, wt, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False]
    )
    assert gi is None and gb is None and gw is not None and gw.shape == wt.shape


def test_table_holds_the_silent_pitfall_fixes() -> None:
    table = training_decompositions()
    for op in (
        aten.convolution_backward.default,
        aten.max_pool2d_with_indices_backward.default,
        aten.native_batch_norm.default,
        aten._native_batch_norm_legit.default,
        aten.nll_loss_forward.default,  # core table: total_weight = batch size
        aten.nll_loss_backward.default,
    ):
        assert op in table, op


@pytest.mark.parametrize(
    "h,k,s,p",
    [(8, 2, 2, 0), (7, 2, 2, 0), (9, 3, 2, 1), (8, 3, 1, 1), (6, 2, 1, 0)],
)
def test_avg_pool2d_backward_matches_autograd(h: int, k: int, s: int, p: int) -> None:
    from export.decompositions import avg_pool2d_backward

    torch.manual_seed(0)
    x = torch.randn(2, 3, h, h + 1, requires_grad=True)
    y = F.avg_pool2d(x, k, s, p)
    g = torch.randn_like(y)
    (want,) = torch.autograd.grad(y, x, g)
    got = avg_pool2d_backward(g, x.detach(), [k, k], [s, s], [p, p], False, True, None)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # windows with different divisors are left to the exporter, which names the op
    assert avg_pool2d_backward(g, x.detach(), [k, k], [s, s], [1, 1], False, False, None) is (
        NotImplemented
    )


def test_linear_over_tokens_keeps_the_batch_symbolic() -> None:
    """``F.linear`` on (batch, tokens, dim) reads concrete sizes in torch; under
    :class:`SymbolicLinear` the trace keeps the batch a symbol and the same numbers."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from export.decompositions import SymbolicLinear
    from export.graphs import _fake_args

    lin = torch.nn.Linear(8, 16)
    args = [torch.randn(13, 5, 8), lin.weight.detach(), lin.bias.detach()]

    def fn(x, w, b):
        return torch.func.grad(lambda w: F.gelu(F.linear(x, w, b)).square().sum())(w)

    with SymbolicLinear():
        gm = make_fx(fn, decomposition_table=training_decompositions(), tracing_mode="symbolic")(
            *_fake_args(args, {0})
        )
    assert "13" not in str([n.meta.get("val") for n in gm.graph.nodes if n.op != "output"])
    x = torch.randn(4, 5, 8)  # another batch size runs through the same graph
    torch.testing.assert_close(gm(x, *args[1:]), fn(x, *args[1:]), rtol=1e-5, atol=1e-6)
