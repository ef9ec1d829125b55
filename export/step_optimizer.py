"""The optimiser of the step graphs: ``torch.optim.SGD`` with momentum, weight decay and
nesterov (dampening 0), as constants of the graph; what a graph cannot express is
refused by :func:`step_optimizer` when the run or model is exported.

With momentum, each stepped parameter has a buffer that is a graph input (``m_*``) and
output (``new_*``), carried by the device from step to step (zeros first, as torch's
optimiser starts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from export.graphs import unique_names


@dataclass(frozen=True)
class StepOptimizer:
    """``torch.optim.SGD`` with dampening 0: ``g = grad + weight_decay * p``; with
    momentum ``buf = momentum * buf + g`` (buf starts at 0, so the first step's buf is g,
    as torch's) and ``g = g + momentum * buf`` (nesterov) or ``buf``; ``p -= lr * g``."""

    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def to_dict(self) -> dict[str, float]:
        return {"momentum": self.momentum, "weight_decay": self.weight_decay,
                "nesterov": float(self.nesterov)}  # fmt: skip


PLAIN_SGD = StepOptimizer()


def step_optimizer(opt: torch.optim.Optimizer, who: str) -> StepOptimizer:
    """The :class:`StepOptimizer` of a torch optimiser, or a RunExportError naming what
    the step graph cannot express (another optimiser, dampening, maximize, groups with
    different settings)."""
    from export.bundle import RunExportError

    if type(opt) is not torch.optim.SGD:
        raise RunExportError(f"{who} trains with {type(opt).__name__}; the exported step graph "
                             "expresses SGD only (momentum, weight decay, nesterov)")  # fmt: skip
    seen = set()
    for i, g in enumerate(opt.param_groups):
        if g.get("maximize") or (g.get("momentum", 0) and g.get("dampening", 0)):
            raise RunExportError(f"{who}: SGD param_groups[{i}] has dampening "
                                 f"{g.get('dampening')} / maximize {g.get('maximize')}; the step "
                                 "graph expresses dampening 0 and minimising only")  # fmt: skip
        seen.add((float(g["momentum"]), float(g["weight_decay"]), bool(g["nesterov"])))
    if len(seen) != 1:
        raise RunExportError(f"{who}: SGD param groups differ in momentum / weight decay / "
                             f"nesterov {sorted(seen)}; the step graph takes one setting")  # fmt: skip
    return StepOptimizer(*seen.pop())


def momentum_keys(
    param_keys: Sequence[str], opt: StepOptimizer, frozen: frozenset[str] = frozenset()
) -> list[str]:
    """The parameters that carry a momentum buffer: every stepped one, when momentum != 0."""
    return [k for k in param_keys if k not in frozen] if opt.momentum else []


def momentum_io(keys: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Graph names of the momentum buffers of ``keys``: ``m_*`` in, ``new_m_*`` out."""
    m_in = unique_names("m_", keys)
    return m_in, {f"new_{n}": k for n, k in m_in.items()}
