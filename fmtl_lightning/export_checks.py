"""What an exported step graph can express, said at export time.

The on-device step graph (:mod:`export.trainstep`) is one SGD step, with the momentum,
weight decay and Nesterov setting of the client's optimiser
(:func:`export.step_optimizer.step_optimizer`). A client trained with anything else
(Adam/AdamW, dampening, param groups with different settings) would train differently on a device, so
``Simulation.export_client`` says so with a :class:`StepOptimizerWarning` naming the
optimiser and why, and exports plain SGD steps.
"""

from __future__ import annotations

import warnings

import torch


class StepOptimizerWarning(UserWarning):
    """The exported step graph cannot train with the optimiser the client used."""


def describe(opt: torch.optim.Optimizer) -> str:
    g = opt.param_groups[0]
    keys = ("lr", "momentum", "weight_decay", "betas", "nesterov")
    return f"{type(opt).__name__}(" + ", ".join(f"{k}={g[k]}" for k in keys if k in g) + ")"


def warn_step_optimizer(opt: torch.optim.Optimizer, who: str, why: str) -> None:
    """Warn that ``who`` was trained with an optimiser the step graph cannot express."""
    warnings.warn(
        f"{who} trained with {describe(opt)} ({why}); the bundle's step graphs take plain "
        "SGD steps (w -= lr * grad), so a device training with it follows a different "
        "optimiser",
        StepOptimizerWarning,
        stacklevel=3,
    )
