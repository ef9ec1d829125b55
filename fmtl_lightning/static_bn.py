"""Static batch norm (HeteroFL's sBN): the layer and the statistics pass.

HeteroFL trains with batch statistics and keeps no running statistics (a running
average over sub-models of different widths and over clients means nothing). For
inference the statistics are computed once, after aggregation, by a pass over
training data, and then held fixed, so a sample's prediction never depends on the
rest of its batch.

* :class:`StaticBatchNorm2d` normalises with the batch's statistics while training
  and with its ``running_mean``/``running_var`` buffers in eval mode. The model
  declares those buffers with kind ``static_stat`` (see :mod:`fmtl_lightning.roles`):
  computed, never trained, never aggregated.
* :func:`compute_static_stats` is the statistics pass. For each static BN layer in
  execution order it takes the per-channel mean and population variance of the
  layer's input over every sample and position of ``x`` (N*H*W values per
  channel), with the model in eval mode (scaler off, earlier static BN layers
  already normalising with their new statistics). So the statistics are exactly
  those of the eval-mode model: every channel of the training data leaves each
  static BN standardised. HeteroFL's code accumulates a cumulative average of
  per-batch statistics in train mode instead; the two agree when the pass sees
  all data in one batch, up to that code's unbiased-variance correction.

Where it runs: :class:`fmtl_lightning.simulation.Simulation` calls the pass after
every aggregation, for every client, on the model that client is evaluated and
deployed with, at its width, over its own training data (nothing leaves the
client; the statistics are local state, checkpointed with it every round, and
exported with the client's backbone: export reads them from the checkpoint and
needs no data). HeteroFL computes one set over the pooled training data
at the server instead; per-client statistics need no data at the server and no
extra communication.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fmtl_lightning.errors import FMTLError

STAT_NAMES = ("running_mean", "running_var")


class StaticStatsError(FMTLError, ValueError):
    """The statistics pass cannot run: no data, or the data does not fit the model."""


class StaticBatchNorm2d(nn.Module):
    """Batch norm with batch statistics in training and fixed, computed statistics in eval.

    ``running_mean``/``running_var`` start at 0/1 (no normalisation) until
    :func:`compute_static_stats` (or a loaded state) sets them.
    """

    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> same
        if self.training:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class _Stop(Exception):
    """Raised by the collecting hook: nothing after the layer being measured is needed."""


class _Moments:
    """Per-channel count, mean and sum of squared deviations, merged chunk by chunk
    (Chan et al.'s parallel update, in float64)."""

    def __init__(self, channels: int) -> None:
        self.n = 0
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)

    def add(self, x: torch.Tensor) -> None:  # (B, C, H, W)
        v = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)  # (C, B*H*W)
        nb = v.shape[1]
        if nb == 0:
            return
        mb = v.mean(1)
        m2b = ((v - mb[:, None]) ** 2).sum(1)
        mb_np, m2b_np = mb.numpy(), m2b.numpy()
        n = self.n + nb
        delta = mb_np - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b_np + delta**2 * (self.n * nb / n)
        self.n = n


def static_layers(model: nn.Module) -> list[tuple[str, StaticBatchNorm2d]]:
    """The model's static BN layers as ``(module name, layer)``, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, StaticBatchNorm2d)]


def compute_static_stats(
    model: nn.Module, x: torch.Tensor, *, chunk: int = 512
) -> dict[str, np.ndarray]:
    """Compute every static BN layer's statistics over ``x``, load them into ``model``,
    and return them as ``{state-dict key: float32 array}``.

    ``x``: the inputs of ``model`` (e.g. a client's training images, ``(N, C, H, W)``),
    processed ``chunk`` samples at a time; the result does not depend on ``chunk``.
    The model's train/eval mode is restored afterwards.
    """
    layers = static_layers(model)
    if not layers:
        return {}
    if x.shape[0] == 0:
        raise StaticStatsError("the static batch-norm statistics pass needs at least one sample")
    order = _execution_order(model, layers, x[:1])
    was = model.training
    model.eval()
    out: dict[str, np.ndarray] = {}
    try:
        with torch.no_grad():
            for name, layer in order:
                mom = _Moments(layer.num_features)

                def collect(_m: nn.Module, args: tuple, mom: _Moments = mom) -> None:
                    mom.add(args[0])
                    raise _Stop

                handle = layer.register_forward_pre_hook(collect)
                try:
                    for i in range(0, x.shape[0], chunk):
                        try:
                            model(x[i : i + chunk])
                        except _Stop:
                            pass
                finally:
                    handle.remove()
                stats = {"running_mean": mom.mean, "running_var": mom.m2 / mom.n}
                for s in STAT_NAMES:
                    arr = stats[s].astype(np.float32)
                    getattr(layer, s).copy_(torch.from_numpy(arr))
                    out[f"{name}.{s}" if name else s] = arr
    finally:
        model.train(was)
    return out


def _execution_order(
    model: nn.Module, layers: list[tuple[str, StaticBatchNorm2d]], x1: torch.Tensor
) -> list[tuple[str, StaticBatchNorm2d]]:
    """``layers`` sorted by the order a forward pass calls them (one sample, eval mode)."""
    seen: list[int] = []
    handles = [m.register_forward_pre_hook(lambda m, a: seen.append(id(m))) for _, m in layers]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x1)
    except RuntimeError as exc:
        raise StaticStatsError(f"the statistics pass cannot run the model on x: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    rank = {i: r for r, i in reversed(list(enumerate(seen)))}
    missing = [n for n, m in layers if id(m) not in rank]
    if missing:
        raise StaticStatsError(f"static batch-norm layers {missing} are not used by the forward")
    return sorted(layers, key=lambda nm: rank[id(nm[1])])
