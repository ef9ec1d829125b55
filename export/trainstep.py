"""Training-step graphs: one SGD step as a pure ONNX function, for stock onnxruntime.

A step is ``(params..., buffers..., [momenta...], x, y_task..., lr) -> (loss,
new_params..., new_buffers..., [new_momenta...])``. The SGD is ``torch.optim.SGD``'s with
dampening 0 (:class:`StepOptimizer`): weight decay and momentum are constants of the
graph; the momentum buffers (one per stepped parameter, zeros before a client's first
step, as torch's optimizer starts) are inputs and outputs, so a device carries them
from step to step. What the graph cannot express is refused (:func:`step_optimizer`). It is written with ``torch.func`` (``functional_call`` +
``grad_and_value``), traced to aten ops by ``make_fx`` with symbolic shapes and
the decompositions of :mod:`export.decompositions`, then exported with
``torch.onnx.export(dynamo=True)``. Parameters and buffers are graph inputs, so a
client feeds the global weights straight in; nothing is baked into the file.

Batch norm runs in training mode: batch statistics, running stats updated with
momentum and the unbiased batch variance, ``num_batches_tracked + 1``, exactly
as ``torch.nn.BatchNorm2d.train()`` does.

The total loss is the sum over tasks of each task's batch-mean loss:
``multiclass`` = cross-entropy on int64 targets (B,), ``multilabel`` =
BCE-with-logits on float32 targets (B, n) of 0/1, ``regression`` = mean squared error
on float32 targets (B, n).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from export.graphs import (
    ExportError,
    TrainStepInfo,
    describe,
    export_pure_function,
    sanitize,
    trace_batch,
    unique_names,
)
from export.step_optimizer import PLAIN_SGD, StepOptimizer, momentum_io, momentum_keys
from fmtl_lightning.models import head_name
from fmtl_lightning.tasks import DEFAULT_LOSSES, Task

if TYPE_CHECKING:
    from fmtl_lightning.model_source import ClientModel

TASK_KINDS = ("multiclass", "multilabel", "regression")  # the kinds a step graph trains
LossOf = Callable[[nn.Module, dict, torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]


def task_loss(kind: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Batch-mean loss of one task: the default loss of its kind, the very function
    Lightning training uses (:data:`fmtl_lightning.tasks.DEFAULT_LOSSES`)."""
    if kind not in TASK_KINDS:
        raise ExportError(f"task kind must be one of {TASK_KINDS}, got {kind!r}")
    return DEFAULT_LOSSES[kind](logits, y)


def target_example(kind: str, n: int, batch: int) -> torch.Tensor:
    """A target tensor of the right dtype/shape for a task (values are irrelevant for tracing)."""
    if kind == "multiclass":
        return torch.zeros(batch, dtype=torch.int64)
    if kind in ("multilabel", "regression"):
        return torch.zeros(batch, n, dtype=torch.float32)
    raise ExportError(f"task kind must be one of {TASK_KINDS}, got {kind!r}")


@contextmanager
def mode(module: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Put ``module`` in train/eval mode for the block, then restore what it was."""
    was = module.training
    module.train(training)
    try:
        yield module
    finally:
        module.train(was)


def sgd_step_fn(
    module: nn.Module,
    param_keys: Sequence[str],
    buffer_keys: Sequence[str],
    loss_of: LossOf,
    n_targets: int,
    opt: StepOptimizer = PLAIN_SGD,
    frozen: frozenset[str] = frozenset(),
) -> Callable[..., tuple[torch.Tensor, ...]]:
    """The flat pure function ``(*params, *buffers, *momenta, x, *ys, lr) -> (loss, *new_p,
    *new_b, *new_momenta)`` (momenta: one per key of ``momentum_keys(param_keys, opt,
    frozen)``). Parameters in ``frozen`` (heads outside the loss) come back unchanged,
    as torch's SGD skips a parameter without a gradient.

    ``loss_of(module, state, x, ys)`` runs ``module`` with ``state`` swapped in
    (``torch.func.functional_call``) and returns the scalar loss.
    """
    from torch.func import grad_and_value

    mk = momentum_keys(param_keys, opt, frozen)
    n_p, n_b, n_m = len(param_keys), len(buffer_keys), len(mk)

    def step(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        params = dict(zip(param_keys, args[:n_p], strict=True))
        buffers = {k: b.clone() for k, b in zip(buffer_keys, args[n_p : n_p + n_b], strict=True)}
        moms = dict(zip(mk, args[n_p + n_b : n_p + n_b + n_m], strict=True))
        x = args[n_p + n_b + n_m]
        ys = args[n_p + n_b + n_m + 1 : n_p + n_b + n_m + 1 + n_targets]
        lr = args[-1]

        def loss_fn(p: dict, b: dict) -> tuple[torch.Tensor, dict]:
            # batch norm updates ``b`` in place, so b must be an explicit input here
            return loss_of(module, {**p, **b}, x, ys), b

        grads, (loss, new_b) = grad_and_value(loss_fn, has_aux=True)(params, buffers)
        new_p, new_m = [], {}
        for k in param_keys:
            p = params[k]
            if k in frozen:
                new_p.append(p)
                continue
            g = grads[k] + opt.weight_decay * p if opt.weight_decay else grads[k]
            if opt.momentum:
                new_m[k] = opt.momentum * moms[k] + g
                g = g + opt.momentum * new_m[k] if opt.nesterov else new_m[k]
            new_p.append(p - lr * g)
        return (loss, *new_p, *(new_b[k] for k in buffer_keys), *(new_m[k] for k in mk))

    return step


def _check_kinds(task_kinds: Mapping[str, str], task_outputs: Mapping[str, int]) -> None:
    missing = [t for t in task_kinds if t not in task_outputs]
    if missing:
        raise ExportError(f"tasks {missing} have no head; the model has {list(task_outputs)}")
    for t, kind in task_kinds.items():
        if kind not in TASK_KINDS:
            raise ExportError(f"task {t!r}: kind must be one of {TASK_KINDS}, got {kind!r}")


def export_train_step(
    model: ClientModel,
    task_kinds: Mapping[str, str],
    path: Path | str,
    example_x: torch.Tensor,
    opset: int = 18,
    opt: StepOptimizer = PLAIN_SGD,
) -> TrainStepInfo:
    """Export one SGD step (``opt``) of ``model`` on the summed losses of ``task_kinds``' tasks.

    ``example_x`` fixes the per-sample input shape and dtype; its batch size does
    not matter (the batch axis is dynamic). Targets follow each task's kind. Every
    parameter of ``model`` is a graph input and output; heads of tasks not in
    ``task_kinds`` come back unchanged (no gradient: torch's SGD skips them).
    """
    path = Path(path)
    tasks = list(task_kinds)
    _check_kinds(task_kinds, model.task_outputs)

    def loss_of(m: nn.Module, state: dict, x: torch.Tensor, ys: Sequence[torch.Tensor]):
        out = torch.func.functional_call(m, state, (x,))
        losses = [task_loss(task_kinds[t], out[t], y) for t, y in zip(tasks, ys, strict=True)]
        return torch.stack(losses).sum()

    pk = [k for k, _ in model.named_parameters()]
    bk = [k for k, _ in model.named_buffers()]
    trained = {head_name(t) for t in tasks}
    outside = {id(p) for h, m in model.heads.items() if h not in trained for p in m.parameters()}
    frozen = frozenset(k for k, p in model.named_parameters() if id(p) in outside)
    mk = momentum_keys(pk, opt, frozen)
    state = model.state_dict()
    b = trace_batch(state.values(), [*example_x.shape[1:], *model.task_outputs.values()])
    x = torch.zeros(b, *example_x.shape[1:], dtype=example_x.dtype)
    ys = [target_example(task_kinds[t], model.task_outputs[t], b) for t in tasks]
    args = [state[k].detach().clone() for k in [*pk, *bk]]
    args += [torch.zeros_like(state[k]) for k in mk] + [x, *ys, torch.tensor(0.1)]

    p_in, b_in = unique_names("p_", pk), unique_names("b_", bk)
    m_in, m_out = momentum_io(mk)
    y_in = {t: f"y_{sanitize(head_name(t))}" for t in tasks}
    p_out = {f"new_{n}": k for n, k in p_in.items()}
    b_out = {f"new_{n}": k for n, k in b_in.items()}
    in_names = [*p_in, *b_in, *m_in, "x", *y_in.values(), "lr"]
    out_names = ["loss", *p_out, *b_out, *m_out]
    n_sb = len(pk) + len(bk) + len(mk)
    batch_args = set(range(n_sb, n_sb + 1 + len(tasks)))

    with mode(model, training=True):
        step = sgd_step_fn(model, pk, bk, loss_of, len(tasks), opt, frozen)
        proto = export_pure_function(step, args, batch_args, in_names, out_names, path, opset)
    ins, outs = describe(proto)
    return TrainStepInfo(
        path=str(path),
        opset=opset,
        inputs=ins,
        outputs=outs,
        param_inputs=p_in,
        buffer_inputs=b_in,
        x_input="x",
        target_inputs=y_in,
        task_kinds=dict(task_kinds),
        lr_input="lr",
        loss_output="loss",
        param_outputs=p_out,
        buffer_outputs=b_out,
        momentum_inputs=m_in,
        momentum_outputs=m_out,
        optimizer=opt.to_dict(),
    )


def export_head_step(
    head: nn.Linear,
    kind: str,
    path: Path | str,
    feature_dim: int,
    opset: int = 18,
    opt: StepOptimizer = PLAIN_SGD,
) -> TrainStepInfo:
    """Export one SGD step (``opt``) of a head alone on frozen features.

    Graph: ``(p_weight, p_bias, [m_weight, m_bias,] features, y, lr) -> (loss,
    new_p_weight, new_p_bias[, new_m_weight, new_m_bias])``; the maps say
    ``weight``/``bias`` (keys of the head's own state dict).
    """
    path = Path(path)
    if head.in_features != feature_dim:
        raise ExportError(f"head takes {head.in_features} features, feature_dim is {feature_dim}")
    _check_kinds({"task": kind}, {"task": head.out_features})

    def loss_of(m: nn.Module, state: dict, f: torch.Tensor, ys: Sequence[torch.Tensor]):
        return task_loss(kind, torch.func.functional_call(m, state, (f,)), ys[0])

    pk = [k for k, _ in head.named_parameters()]
    mk = momentum_keys(pk, opt)
    state = head.state_dict()
    b = trace_batch(state.values())
    feats = torch.zeros(b, feature_dim)
    y = target_example(kind, head.out_features, b)
    args = [state[k].detach().clone() for k in pk] + [torch.zeros_like(state[k]) for k in mk]
    args += [feats, y, torch.tensor(0.1)]

    p_in = unique_names("p_", pk)
    p_out = {f"new_{n}": k for n, k in p_in.items()}
    m_in, m_out = momentum_io(mk)
    in_names = [*p_in, *m_in, "features", "y", "lr"]
    out_names = ["loss", *p_out, *m_out]
    step = sgd_step_fn(head, pk, [], loss_of, 1, opt)
    n = len(pk) + len(mk)
    proto = export_pure_function(step, args, {n, n + 1}, in_names, out_names, path, opset)
    ins, outs = describe(proto)
    return TrainStepInfo(
        path=str(path),
        opset=opset,
        inputs=ins,
        outputs=outs,
        param_inputs=p_in,
        buffer_inputs={},
        x_input=None,
        target_inputs={"task": "y"},
        task_kinds={"task": kind},
        lr_input="lr",
        loss_output="loss",
        param_outputs=p_out,
        buffer_outputs={},
        features_input="features",
        momentum_inputs=m_in,
        momentum_outputs=m_out,
        optimizer=opt.to_dict(),
    )


DROPOUT_CHOICES = ("refuse", "off")


@contextmanager
def dropout_off(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Set ``p = 0`` on the dropout ``modules`` for the block, then restore each p."""
    ps = [m.p for m in modules]  # type: ignore[attr-defined]
    try:
        for m in modules:
            m.p = 0.0  # type: ignore[assignment]
        yield
    finally:
        for m, p in zip(modules, ps, strict=True):
            m.p = p  # type: ignore[assignment]


def export_model_step(
    model: ClientModel,
    task_kinds: Mapping[str, str],
    path: Path,
    example_x: torch.Tensor,
    opset: int,
    dropout: str = "refuse",
    opt: StepOptimizer = PLAIN_SGD,
) -> TrainStepInfo:
    """:func:`export_train_step` (with ``opt``) of a whole model (built-in or a user's), or
    :class:`~export.bundle.RunExportError` saying why there is none:
    a dropout layer (the step graph cannot reproduce its random masks), or an op the
    ONNX exporter cannot differentiate (named by its message).

    ``dropout="off"`` exports the step of the model with every dropout's p set to 0
    (the on-device step then trains without dropout, as torch does with p = 0); the
    inference graphs are unaffected (dropout is the identity in eval mode)."""
    from export.bundle import RunExportError

    if dropout not in DROPOUT_CHOICES:
        raise RunExportError(f"dropout must be one of {DROPOUT_CHOICES}, got {dropout!r}")
    drops = {n: m for n, m in model.named_modules()
             if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0}  # fmt: skip
    if drops and dropout == "refuse":
        raise RunExportError(
            f"the on-device train step cannot reproduce the random masks of dropout layer(s) "
            f"{list(drops)}: set their p to 0 for a model trained on devices, or export with "
            "dropout='off' (the device trains without dropout)"
        )
    try:
        with dropout_off(list(drops.values())):
            return export_train_step(model, task_kinds, path, example_x, opset, opt)
    except Exception as exc:  # torch.onnx raises many types; the message names the op
        last = (str(exc).strip().splitlines() or [""])[-1][:300]
        raise RunExportError(
            f"the on-device train step of {type(model).__name__} cannot be exported to ONNX "
            f"({type(exc).__name__}: {last}); its backbone and heads can, for inference"
        ) from exc


def check_exportable(task: Task) -> None:
    """The step graphs train each task with the default loss of its kind."""
    from export.bundle import RunExportError

    if task.kind not in TASK_KINDS:
        raise RunExportError(
            f"task {task.name!r} is a {task.kind} task; the exported step graphs train "
            f"{' and '.join(TASK_KINDS)} tasks only"
        )
    if not task.default_loss:
        raise RunExportError(
            f"task {task.name!r} has its own loss; the exported step graphs train a task "
            f"with the default loss of its kind ({task.kind}) only"
        )


def task_kinds_of(
    tasks: Mapping[str, Task | str],
) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """task -> kind, and the output names of the values that are Tasks."""
    from export.bundle import RunExportError

    kinds: dict[str, str] = {}
    names: dict[str, tuple[str, ...]] = {}
    for t, v in tasks.items():
        if isinstance(v, Task):
            if v.name != t:
                raise RunExportError(f"task_kinds[{t!r}] holds task {v.name!r}")
            check_exportable(v)
            kinds[t], names[t] = v.kind, v.output_names
        else:
            kinds[t] = v
    return kinds, names
