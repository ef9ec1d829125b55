"""What an exported graph looks like from the outside, and the ONNX plumbing all graphs share.

Owns the info objects a manifest is written from (:class:`TensorInfo`,
:class:`GraphInfo`, :class:`TrainStepInfo`), the deterministic naming of graph
inputs/outputs after state-dict keys, the post-export checks (full ONNX checker,
default-domain ops only, opset) and the ``.ort`` conversion.

Every graph this package writes keeps the batch dimension dynamic, named
``"batch"`` in the info objects and in the ONNX file.
"""

from __future__ import annotations

import contextlib
import math
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

from fmtl_lightning.errors import FMTLError
from mobile_client.manifest import MANIFEST_VERSION

BATCH = "batch"
META_VERSION = "fmtl.format_version"  # metadata_props key every exported graph carries
MIN_OPSET = 18
# make_fx gives equal-sized dims one symbol (duck sizing): trace at a batch size that
# no other dim has, so the batch symbol stands for the batch alone.
_TRACE_BATCHES = (13, 17, 19, 23, 29, 31, 37, 41, 43, 47)
_ONNX_DTYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
}


class ExportError(FMTLError, RuntimeError):
    """An exported graph failed a check (names, ops, opset, ONNX checker, conversion)."""


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output: name, shape (``"batch"`` for the dynamic axis), dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str


@dataclass(frozen=True)
class GraphInfo:
    """An inference graph (backbone or head).

    ``inputs``/``outputs`` are in graph order. ``weights`` maps the name each
    state-dict tensor has in the file to its state-dict key (relative to the
    exported module): an initializer name when weights are embedded, a graph input
    name when ``weights_as_inputs`` was asked for (then those inputs precede ``x``).
    """

    path: str
    kind: str  # "backbone" | "head"
    opset: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    weights: Mapping[str, str] = field(default_factory=dict)
    weights_as_inputs: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainStepInfo:
    """One SGD step graph (momentum and weight decay: ``optimizer``).

    Inputs, in order: ``param_inputs`` (name -> state-dict key), ``buffer_inputs``,
    ``x_input``, ``target_inputs`` (task -> name, in task order), ``lr_input``.
    Outputs, in order: ``loss_output``, ``param_outputs`` (name -> key, same key
    order as the inputs), ``buffer_outputs``. Feed ``new_*`` outputs back as the
    next step's inputs by key.
    """

    path: str
    opset: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    param_inputs: Mapping[str, str]
    buffer_inputs: Mapping[str, str]
    x_input: str | None
    target_inputs: Mapping[str, str]
    task_kinds: Mapping[str, str]
    lr_input: str
    loss_output: str
    param_outputs: Mapping[str, str]
    buffer_outputs: Mapping[str, str]
    features_input: str | None = None  # head-only steps take features instead of x
    # SGD momentum buffers (graph name -> parameter key), present when optimizer's momentum
    # is not 0; inputs after the buffers, outputs last
    momentum_inputs: Mapping[str, str] = field(default_factory=dict)
    momentum_outputs: Mapping[str, str] = field(default_factory=dict)
    optimizer: Mapping[str, float] = field(default_factory=dict)  # momentum, weight_decay, nesterov

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- naming
def sanitize(text: str) -> str:
    """A C90-identifier-safe version of a key or task name ("layers.0.w" -> "layers_0_w")."""
    return re.sub(r"[^0-9A-Za-z_]", "_", text)


def unique_names(prefix: str, keys: Sequence[str]) -> dict[str, str]:
    """``{prefix + sanitize(key): key}``; raises if two keys sanitize to the same name."""
    out: dict[str, str] = {}
    for k in keys:
        name = prefix + sanitize(k)
        if name in out:
            raise ExportError(f"keys {out[name]!r} and {k!r} both map to graph name {name!r}")
        out[name] = k
    return out


# ----------------------------------------------------------------------------- checks
def _shape(vi: onnx.ValueInfoProto) -> tuple[int | str, ...]:
    dims = vi.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else BATCH for d in dims)


def describe(model: onnx.ModelProto) -> tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]]:
    """Inputs and outputs of a graph as :class:`TensorInfo`, in graph order."""

    def info(vi: onnx.ValueInfoProto) -> TensorInfo:
        elem = vi.type.tensor_type.elem_type
        return TensorInfo(vi.name, _shape(vi), _ONNX_DTYPES.get(elem, str(elem)))

    inits = {i.name for i in model.graph.initializer}
    ins = tuple(info(v) for v in model.graph.input if v.name not in inits)
    return ins, tuple(info(v) for v in model.graph.output)


def name_batch_axis(model: onnx.ModelProto) -> None:
    """Name the one dynamic axis ``batch`` on every graph input and output that has it."""
    for vi in [*model.graph.input, *model.graph.output]:
        for d in vi.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.dim_param = BATCH


def check_graph(model: onnx.ModelProto, path: Path | str) -> None:
    """Full ONNX checker, opset >= 18, and only default-domain ops (no aten/custom ops)."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path}: ONNX checker failed: {exc}") from exc
    opsets = {o.domain: o.version for o in model.opset_import}
    if opsets.get("", 0) < MIN_OPSET:
        raise ExportError(f"{path}: default opset {opsets.get('')} < {MIN_OPSET}")
    if model.functions:
        names = sorted({f"{f.domain}::{f.name}" for f in model.functions})
        raise ExportError(f"{path}: local functions left in the graph: {names}")
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in _all_nodes(model.graph) if n.domain})
    if foreign:
        raise ExportError(f"{path}: non-standard ops {foreign}")


def _all_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            for g in attr.graphs:
                yield from _all_nodes(g)


def op_types(path: Path | str) -> set[str]:
    """``domain::op`` of every node in a saved graph (empty domain = default ONNX)."""
    model = onnx.load(str(path))
    return {f"{n.domain}::{n.op_type}" for n in _all_nodes(model.graph)}


def set_metadata(model: onnx.ModelProto, props: Mapping[str, str]) -> None:
    """Add (or overwrite) ``metadata_props`` entries of ``model``; the others stay."""
    merged = {p.key: p.value for p in model.metadata_props}
    merged.update({str(k): str(v) for k, v in props.items()})
    onnx.helper.set_model_props(model, merged)


def save_checked(model: onnx.ModelProto, path: Path | str) -> None:
    """Run :func:`check_graph` and write ``model`` as one self-contained file, stamped
    with ``metadata_props`` ``fmtl.format_version`` (the manifest's format version)."""
    check_graph(model, path)
    set_metadata(model, {META_VERSION: str(MANIFEST_VERSION)})
    onnx.save_model(model, str(path), save_as_external_data=False)


def stamp_file(path: Path | str, props: Mapping[str, str]) -> None:
    """Add ``props`` to the ``metadata_props`` of the saved graph at ``path`` (rewritten)."""
    model = onnx.load(str(path))
    set_metadata(model, {META_VERSION: str(MANIFEST_VERSION), **props})
    onnx.save_model(model, str(path), save_as_external_data=False)


def trace_batch(tensors: Iterable[torch.Tensor], extra: Iterable[int] = ()) -> int:
    """A batch size for tracing that equals no dim of ``tensors`` (nor ``extra``)."""
    avoid = {int(d) for t in tensors for d in t.shape} | {int(d) for d in extra}
    for b in _TRACE_BATCHES:
        if b not in avoid:
            return b
    raise ExportError(f"no trace batch size free of the dims {sorted(avoid)}")


def _fake_args(args: Sequence[torch.Tensor], batch_args: set[int]) -> list[torch.Tensor]:
    """Fake tensors whose only symbolic dim is the batch axis of ``batch_args``.

    ``make_fx(tracing_mode="symbolic")`` alone makes every dim of every weight a
    symbol; the shape reasoning then dominates the trace (a GroupNorm CNN step took
    ~16 s instead of ~2 s).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import (
        DimDynamic,
        ShapeEnv,
        StatelessSymbolicContext,
    )

    mode = FakeTensorMode(shape_env=ShapeEnv())

    def fake(i: int, t: torch.Tensor) -> torch.Tensor:
        sizes = [
            DimDynamic.DYNAMIC if (i in batch_args and d == 0) else DimDynamic.STATIC
            for d in range(t.dim())
        ]
        ctx: Any = StatelessSymbolicContext(dynamic_sizes=sizes)  # type: ignore[arg-type]
        return mode.from_tensor(t, symbolic_context=ctx)

    return [fake(i, t) for i, t in enumerate(args)]


_REGISTRIES: dict[int, Any] = {}  # opset -> torch.onnx's ATen -> ONNX function registry
_REGISTRY_LOCK = threading.RLock()


@contextlib.contextmanager
def shared_torchlib_registry() -> Iterator[None]:
    """Within this block, ``torch.onnx.export`` reuses one registry of ATen -> ONNX
    functions per opset instead of building it anew for every graph.

    torch 2.13 rebuilds the registry on every call (``ONNXRegistry.from_torchlib``:
    0.4-0.8 s here, most of it re-reading the source of some 500 onnxscript functions),
    and a bundle exports four graphs or more. Our exports never register custom
    translations, the only thing that writes to a registry after it is built, so a
    shared one gives the same graphs (``tests/export/test_export_registry.py``). The
    patch lives only for the block, under a lock, so a caller's own exports with a
    ``custom_translation_table`` never see the shared registry. Without the torch
    internal it patches, the block changes nothing."""
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:  # another torch: every export builds its own, as before
        yield
        return
    cls = _registration.ONNXRegistry
    original = cls.__dict__.get("from_torchlib")
    if not isinstance(original, classmethod):
        yield
        return

    def from_torchlib(klass: type, opset_version: int = MIN_OPSET) -> Any:
        if opset_version not in _REGISTRIES:
            _REGISTRIES[opset_version] = original.__func__(klass, opset_version)
        return _REGISTRIES[opset_version]

    with _REGISTRY_LOCK:
        cls.from_torchlib = classmethod(from_torchlib)  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            cls.from_torchlib = original  # type: ignore[method-assign,assignment]


def export_pure_function(
    fn: Callable[..., Any],
    args: Sequence[torch.Tensor],
    batch_args: set[int],
    input_names: list[str],
    output_names: list[str],
    path: Path | str,
    opset: int,
) -> onnx.ModelProto:
    """Trace ``fn(*args)`` to aten ops and export it as a checked ONNX file at ``path``.

    ``make_fx`` (symbolic shapes, functionalized, :func:`training_decompositions`)
    then ``torch.onnx.export(dynamo=True)`` of the traced graph module. Arguments
    whose index is in ``batch_args`` get a dynamic first axis named ``batch``.
    Weights are never baked in: every tensor the function reads is an input.
    """
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from export.decompositions import SymbolicLinear, training_decompositions

    pure = torch.func.functionalize(fn, remove="mutations")
    table: Any = training_decompositions()
    tracer = make_fx(pure, decomposition_table=table, tracing_mode="symbolic")
    # attention as its math (matmul, softmax): the fused CPU kernel's backward has no
    # ONNX translation, the math's backward is plain ops (same numbers to ~1e-7)
    # and Linear over (batch, tokens, dim) by shape symbols (:class:`SymbolicLinear`)
    with sdpa_kernel([SDPBackend.MATH]), SymbolicLinear():
        gm = tracer(*_fake_args(args, batch_args))
    gm.graph.eliminate_dead_code()
    gm.recompile()
    gm.eval()  # the step's own train/eval behaviour is already in the traced ops
    batch = torch.export.Dim("batch", min=1)
    dynamic = tuple({0: batch} if i in batch_args else None for i in range(len(args)))
    with shared_torchlib_registry():
        program = torch.onnx.export(
            gm,
            tuple(args),
            dynamo=True,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic,
            optimize=True,
            verbose=False,
        )
    if program is None:
        raise ExportError(f"{path}: torch.onnx.export returned no program")
    model = program.model_proto
    got_in = [v.name for v in model.graph.input]
    got_out = [v.name for v in model.graph.output]
    if got_in != input_names or got_out != output_names:
        raise ExportError(
            f"exported names differ from the requested ones: inputs {got_in} vs "
            f"{input_names}, outputs {got_out} vs {output_names}"
        )
    if model.graph.initializer:
        # constants (shapes, 0-d scalars) are fine; a float tensor would be a baked weight
        big = [
            f"{i.name}{tuple(i.dims)}"
            for i in model.graph.initializer
            if i.data_type == onnx.TensorProto.FLOAT and math.prod(i.dims) > 1
        ]
        if big:  # a weight, or a constant whose shape fixed the batch size of the trace
            raise ExportError(f"weights leaked into initializers: {big}")
    name_batch_axis(model)
    save_checked(model, path)
    return model


# ----------------------------------------------------------------------------- .ort
def to_ort_format(paths: Sequence[Path | str]) -> list[Path]:
    """Convert ``.onnx`` files to ORT format next to them; returns the ``.ort`` paths in order.

    Uses ``python -m onnxruntime.tools.convert_onnx_models_to_ort`` (what ORT Mobile loads).
    """
    srcs = [Path(p) for p in paths]
    for p in srcs:
        if p.suffix != ".onnx" or not p.is_file():
            raise ExportError(f"not an .onnx file: {p}")
    cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort"]
    outs = []
    for p in srcs:
        res = subprocess.run([*cmd, str(p)], capture_output=True, text=True, check=False)
        out = p.with_suffix(".ort")
        if res.returncode != 0 or not out.is_file():
            raise ExportError(
                f"ORT conversion of {p} failed (exit {res.returncode}): {res.stderr[-2000:]}"
            )
        outs.append(out)
    return outs
