"""What an exported step graph can express, said at export time.

The on-device step graph (:mod:`export.trainstep`) is one plain SGD step: ``w -= lr * g``.
A client trained with anything else (momentum, weight decay, Adam/AdamW, or the user's
own ``configure_optimizers``) would train differently on a device, so export says so
with a :class:`StepOptimizerWarning` naming the optimiser and its settings.
"""

from __future__ import annotations

import warnings

import torch


class StepOptimizerWarning(UserWarning):
    """The exported step graph trains with plain SGD, not the optimiser the client used."""


def plain_sgd(opt: torch.optim.Optimizer) -> bool:
    """Whether ``opt`` is SGD without momentum, weight decay or Nesterov in every group."""
    if type(opt) is not torch.optim.SGD:
        return False
    return all(not g.get("momentum", 0) and not g.get("weight_decay", 0) and not g.get("nesterov")
               and not g.get("maximize") for g in opt.param_groups)  # fmt: skip


def describe(opt: torch.optim.Optimizer) -> str:
    g = opt.param_groups[0]
    keys = ("lr", "momentum", "weight_decay", "betas", "nesterov")
    return f"{type(opt).__name__}(" + ", ".join(f"{k}={g[k]}" for k in keys if k in g) + ")"


def warn_step_optimizer(opt: torch.optim.Optimizer, who: str) -> None:
    """Warn when ``who`` was trained with an optimiser the step graph cannot express."""
    if not plain_sgd(opt):
        warnings.warn(
            f"{who} trained with {describe(opt)}; the exported step graph takes plain SGD "
            "steps (w -= lr * grad: no momentum, weight decay or adaptive moments), so a "
            "device training with this bundle follows a different optimiser",
            StepOptimizerWarning,
            stacklevel=3,
        )
