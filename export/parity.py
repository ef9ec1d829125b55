"""Parity checks: exported graphs in onnxruntime against the torch model they came from.

Every failure mode listed in DESIGN.md is silent (wrong numbers, no error), so an
export is only trusted after these agree: inference logits against torch eval, and
several training steps against ``torch.optim.SGD`` (with the graph's momentum,
weight decay and nesterov) on the same batches, comparing every updated parameter and
buffer, and the momentum buffers (keys ``momentum:<param key>``). Numbers only; callers decide the tolerance.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.graphs import GraphInfo, TrainStepInfo
from export.step_optimizer import StepOptimizer
from export.trainstep import mode, task_loss
from fmtl_lightning.models import MultiTaskModel, head_name

Batch = tuple[torch.Tensor, Mapping[str, torch.Tensor]]  # (x, {task: y})


def session(path: Path | str):  # -> onnxruntime.InferenceSession
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(sess, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feeds)), strict=True))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| (0 when both are 0)."""
    scale = float(np.abs(want).max()) if want.size else 0.0
    diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()) if want.size else 0
    return diff / scale if scale > 0 else diff


def inference_logits(
    backbone: GraphInfo,
    heads: Mapping[str, GraphInfo],
    x: np.ndarray,
    backbone_state: Mapping[str, np.ndarray] | None = None,
    head_states: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> dict[str, np.ndarray]:
    """Backbone then each head in onnxruntime; states are needed for ``weights_as_inputs``."""
    backbone_state = backbone_state or {}
    head_states = head_states or {}
    feeds = {n: backbone_state[k] for n, k in backbone.weights.items()}
    feats = _run(session(backbone.path), {**feeds, "x": x})["features"]
    out = {}
    for task, info in heads.items():
        hf = {n: head_states[task][k] for n, k in info.weights.items()}
        out[task] = _run(session(info.path), {**hf, "features": feats})["logits"]
    return out


def inference_parity(
    model: MultiTaskModel, backbone: GraphInfo, heads: Mapping[str, GraphInfo], x: torch.Tensor
) -> dict[str, float]:
    """Relative error of backbone -> head logits in onnxruntime vs ``model`` in eval mode."""
    with mode(model, training=False), torch.no_grad():
        want = model(x)
    bb_state = {k: _np(v) for k, v in model.backbone.state_dict().items()}
    h_states = {
        t: {k: _np(v) for k, v in model.heads[head_name(t)].state_dict().items()} for t in heads
    }
    got = inference_logits(backbone, heads, _np(x), bb_state, h_states)
    return {t: relative_error(got[t], _np(want[t])) for t in heads}


@dataclass(frozen=True)
class StepParity:
    """Per-key max |onnxruntime - torch| after all steps, and both loss curves."""

    max_abs: dict[str, float]
    ort_losses: list[float]
    torch_losses: list[float]

    @property
    def worst(self) -> float:
        return max(self.max_abs.values(), default=0.0)


def run_train_steps(
    info: TrainStepInfo,
    state: Mapping[str, np.ndarray],
    batches: Sequence[tuple[np.ndarray, Mapping[str, np.ndarray]]],
    lr: float,
) -> tuple[dict[str, np.ndarray], list[float]]:
    """Run the step graph once per batch, feeding each step's new state into the next;
    momentum buffers (zeros at first) come back as ``momentum:<key>`` entries."""
    sess = session(info.path)
    state = dict(state)
    for k in info.momentum_inputs.values():
        state[f"momentum:{k}"] = np.zeros_like(state[k])
    losses = []
    x_name = info.x_input or info.features_input or "x"
    for x, ys in batches:
        feeds = {n: state[k] for n, k in {**info.param_inputs, **info.buffer_inputs}.items()}
        feeds.update({n: state[f"momentum:{k}"] for n, k in info.momentum_inputs.items()})
        feeds.update({info.target_inputs[t]: ys[t] for t in info.target_inputs})
        feeds[x_name] = x
        feeds[info.lr_input] = np.asarray(lr, dtype=np.float32)
        out = _run(sess, feeds)
        for n, k in {**info.param_outputs, **info.buffer_outputs}.items():
            state[k] = out[n]
        for n, k in info.momentum_outputs.items():
            state[f"momentum:{k}"] = out[n]
        losses.append(float(out[info.loss_output]))
    return state, losses


def _torch_sgd(
    module: nn.Module,
    loss_fn,
    batches: Sequence[Batch],
    lr: float,
    step_opt: StepOptimizer,
) -> tuple[list[float], dict[str, np.ndarray]]:
    """Torch's SGD steps; returns the losses and the momentum buffers by key."""
    opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=step_opt.momentum,
                          weight_decay=step_opt.weight_decay, nesterov=step_opt.nesterov)  # fmt: skip
    losses = []
    with mode(module, training=True):
        for x, ys in batches:
            opt.zero_grad()
            loss = loss_fn(module, x, ys)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    moms = {f"momentum:{k}": _np(opt.state[p]["momentum_buffer"])
            for k, p in module.named_parameters() if opt.state[p].get("momentum_buffer") is not None}  # fmt: skip
    return losses, moms


def _step_opt(info: TrainStepInfo) -> StepOptimizer:
    o = info.optimizer
    return StepOptimizer(
        o.get("momentum", 0.0), o.get("weight_decay", 0.0), bool(o.get("nesterov"))
    )


def _compare(
    got: Mapping[str, np.ndarray],
    module: nn.Module,
    keys: Sequence[str],
    moms: Mapping[str, np.ndarray],
) -> dict[str, float]:
    want = {**module.state_dict(), **{k: torch.from_numpy(v) for k, v in moms.items()}}
    keys = [*keys, *(k for k in got if k.startswith("momentum:"))]
    return {
        k: float(np.abs(got[k].astype(np.float64) - _np(want[k]).astype(np.float64)).max())
        for k in keys
    }


def train_step_parity(
    model: MultiTaskModel, info: TrainStepInfo, batches: Sequence[Batch], lr: float
) -> StepParity:
    """Steps of the exported graph vs ``torch.optim.SGD(lr)`` on a copy of ``model``."""
    ref = copy.deepcopy(model)
    start = {k: _np(v) for k, v in model.state_dict().items()}
    np_batches = [(_np(x), {t: _np(y) for t, y in ys.items()}) for x, ys in batches]
    got, ort_losses = run_train_steps(info, start, np_batches, lr)

    def loss_fn(m: nn.Module, x: torch.Tensor, ys: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = m(x)
        losses = [task_loss(info.task_kinds[t], out[t], ys[t]) for t in info.task_kinds]
        return torch.stack(losses).sum()

    torch_losses, moms = _torch_sgd(ref, loss_fn, batches, lr, _step_opt(info))
    keys = [*info.param_inputs.values(), *info.buffer_inputs.values()]
    return StepParity(_compare(got, ref, keys, moms), ort_losses, torch_losses)


def head_step_parity(
    head: nn.Linear,
    info: TrainStepInfo,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    lr: float,
) -> StepParity:
    """Head-only steps on fixed features vs ``torch.optim.SGD`` on a copy of ``head``."""
    (task,) = info.task_kinds
    kind = info.task_kinds[task]
    ref = copy.deepcopy(head)
    start = {k: _np(v) for k, v in head.state_dict().items()}
    np_batches = [(_np(f), {task: _np(y)}) for f, y in batches]
    got, ort_losses = run_train_steps(info, start, np_batches, lr)

    def loss_fn(m: nn.Module, f: torch.Tensor, ys: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return task_loss(kind, m(f), ys[task])

    tb = [(f, {task: y}) for f, y in batches]
    torch_losses, moms = _torch_sgd(ref, loss_fn, tb, lr, _step_opt(info))
    return StepParity(
        _compare(got, ref, list(info.param_inputs.values()), moms), ort_losses, torch_losses
    )
