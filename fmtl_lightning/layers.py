"""The width-aware layers of the built-in families, which the width plan also knows.

:class:`FlattenLinear` keeps a flattened map's channels as their own weight dim, so width
slicing cuts its input channels as it cuts a conv's; :class:`Scaler` is HeteroFL's
activation scaler. :mod:`fmtl_lightning.width_plan` plans them like any other layer, and
:mod:`fmtl_lightning.width_build` resizes a Scaler's rate.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class FlattenLinear(nn.Module):
    """A fully connected layer over a flattened (C, H, W) map, its weight kept (out, C, H, W).

    ``forward(x) = linear(x.flatten(1), weight.flatten(1), bias)``: the same numbers as
    ``Linear(C*H*W, out)`` after ``flatten`` (PFLlib's FedAvgCNN ``fc1``), whose weight is
    this one reshaped, and initialised like it (same fan-in, same draws in the same order).
    Keeping C as its own dim lets width slicing cut input channels as it cuts a conv's.
    """

    def __init__(self, in_channels: int, side: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_channels, side, side))
        self.bias = nn.Parameter(torch.empty(out_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear.reset_parameters
        bound = 1.0 / math.sqrt(in_channels * side * side)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, out)
        return nn.functional.linear(x.flatten(1), self.weight.flatten(1), self.bias)

    def extra_repr(self) -> str:
        out, c, h, w = self.weight.shape
        return f"in=({c}, {h}, {w}), out_features={out}"


class Scaler(nn.Module):
    """HeteroFL's scaler: output = input / r while training, identity in eval."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.rate if self.training else x
