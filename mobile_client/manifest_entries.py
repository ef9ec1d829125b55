"""The entries of ``manifest.json``: one frozen record per JSON object, each with a
validating ``from_dict`` (numpy-free, stdlib only).

:mod:`mobile_client.manifest` documents the layout and owns the top-level
:class:`~mobile_client.manifest.Manifest`; this module owns the records it is made
of (tensor specs, file entries, normalisation, widths, heads, clients) and the
field readers that turn a wrong JSON value into a :class:`ManifestError` naming
the field (``widths[0].backbone.path``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mobile_client.errors import ManifestError

MAX_DIM = 1 << 20  # bound on a declared input / feature dimension
MAX_INPUT_DIMS = 4  # input_shape: [F] features, [L, F] sequences, [C, H, W] images, ...
# the task kinds a bundle's heads and step graphs hold (fmtl_lightning.tasks.Task.kind)
TASK_KINDS = ("multiclass", "multilabel", "regression")
NORM_BOUND = 1e6  # bound on normalisation parameters and on |x| (see mobile_client.manifest)


# ----------------------------------------------------------------------------- field readers
def get_field(d: Any, key: str, where: str, types: type | tuple[type, ...], optional: bool = False):
    if not isinstance(d, dict):
        raise ManifestError(f"manifest field {where!r} must be an object, got {type(d).__name__}")
    name = f"{where}.{key}" if where else key
    if key not in d or (d[key] is None and not optional):
        if optional:
            return None
        raise ManifestError(f"manifest field {name!r} is missing")
    v = d[key]
    if v is None:
        return None
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ManifestError(f"manifest field {name!r} has type bool")
    if not isinstance(v, types):
        want = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise ManifestError(f"manifest field {name!r} must be {want}, got {type(v).__name__}")
    return v


def str_map_field(d: Any, key: str, where: str) -> dict[str, str]:
    m = get_field(d, key, where, dict, optional=True) or {}
    for k, v in m.items():
        if not isinstance(v, str):
            raise ManifestError(f"manifest field '{where}.{key}.{k}' must be str")
    return dict(m)


def list_field(d: Any, key: str, where: str) -> list:
    return list(get_field(d, key, where, list))


def str_list_field(d: Any, key: str, where: str, optional: bool = False) -> tuple[str, ...]:
    v = get_field(d, key, where, list, optional=optional) or []
    for i, s in enumerate(v):
        if not isinstance(s, str):
            raise ManifestError(f"manifest field '{where}.{key}[{i}]' must be str")
    return tuple(v)


def num_field(d: Any, key: str, where: str, optional: bool = False) -> float | None:
    """A finite number (JSON allows NaN, Infinity and integers too big for a float)."""
    v = get_field(d, key, where, (int, float), optional=optional)
    if v is None:
        return None
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise ManifestError(f"manifest field '{where}.{key}' must be a finite number, got {v!r}")
    return f


def width_field(d: Any, key: str, where: str) -> float:
    w = num_field(d, key, where)
    assert w is not None
    if not 0 < w <= 1:
        raise ManifestError(f"manifest field '{where}.{key}' must be in (0, 1], got {w}")
    return w


# ----------------------------------------------------------------------------- records
@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]
    dtype: str

    @classmethod
    def from_dict(cls, d: Any, where: str) -> TensorSpec:
        shape = list_field(d, "shape", where)
        for i, s in enumerate(shape):
            if not (isinstance(s, str) or (isinstance(s, int) and not isinstance(s, bool))):
                raise ManifestError(f"manifest field '{where}.shape[{i}]' must be int or str")
        return cls(
            get_field(d, "name", where, str), tuple(shape), get_field(d, "dtype", where, str)
        )


@dataclass(frozen=True)
class FileRef:
    path: str
    sha256: str

    @classmethod
    def from_dict(cls, d: Any, where: str) -> FileRef:
        return cls(get_field(d, "path", where, str), get_field(d, "sha256", where, str))


@dataclass(frozen=True)
class FileEntry:
    """One file the device loads: a graph (backbone/head/train_step/head_step) or weights."""

    path: str
    sha256: str
    kind: str
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    weights: dict[str, str] = field(default_factory=dict)  # graph input name -> key
    weight_outputs: dict[str, str] = field(default_factory=dict)  # graph output -> key
    lr_input: str | None = None
    loss_output: str | None = None
    x_input: str | None = None
    features_input: str | None = None
    target_inputs: dict[str, str] = field(default_factory=dict)
    task_kinds: dict[str, str] = field(default_factory=dict)
    ort: FileRef | None = None
    # a step graph's SGD momentum buffers (graph name -> parameter key) and its optimiser
    momentum_inputs: dict[str, str] = field(default_factory=dict)
    momentum_outputs: dict[str, str] = field(default_factory=dict)
    optimizer: dict[str, float] = field(default_factory=dict)  # momentum, weight_decay, nesterov

    @classmethod
    def from_dict(cls, d: Any, where: str) -> FileEntry:
        ort = get_field(d, "ort", where, dict, optional=True)
        opt = get_field(d, "optimizer", where, dict, optional=True) or {}
        for k in opt:
            if k not in ("momentum", "weight_decay", "nesterov"):
                raise ManifestError(f"manifest field '{where}.optimizer' has unknown key {k!r}")
            v = num_field(opt, k, f"{where}.optimizer")
            if not (0 <= v < 1 if k == "momentum" else v >= 0):  # type: ignore[operator]
                raise ManifestError(f"manifest field '{where}.optimizer.{k}' is out of range: {v}")
        return cls(
            path=get_field(d, "path", where, str),
            sha256=get_field(d, "sha256", where, str),
            kind=get_field(d, "kind", where, str),
            inputs=tuple(
                TensorSpec.from_dict(t, f"{where}.inputs[{i}]")
                for i, t in enumerate(get_field(d, "inputs", where, list, optional=True) or [])
            ),
            outputs=tuple(
                TensorSpec.from_dict(t, f"{where}.outputs[{i}]")
                for i, t in enumerate(get_field(d, "outputs", where, list, optional=True) or [])
            ),
            weights=str_map_field(d, "weights", where),
            weight_outputs=str_map_field(d, "weight_outputs", where),
            lr_input=get_field(d, "lr_input", where, str, optional=True),
            loss_output=get_field(d, "loss_output", where, str, optional=True),
            x_input=get_field(d, "x_input", where, str, optional=True),
            features_input=get_field(d, "features_input", where, str, optional=True),
            target_inputs=str_map_field(d, "target_inputs", where),
            task_kinds=str_map_field(d, "task_kinds", where),
            ort=None if ort is None else FileRef.from_dict(ort, f"{where}.ort"),
            momentum_inputs=str_map_field(d, "momentum_inputs", where),
            momentum_outputs=str_map_field(d, "momentum_outputs", where),
            optimizer={k: float(opt[k]) for k in opt},
        )


@dataclass(frozen=True)
class Normalisation:
    """``x = (pixels * scale - mean) / std``, shape ``(batch, *input_shape)``.

    ``input_shape`` is one example without the batch axis: ``[C, H, W]`` for images
    (the only shape a PNG/PGM input fits), ``[F]`` for tabular features, ``[L, F]`` for
    sequences; 1 to ``MAX_INPUT_DIMS`` dims."""

    @property
    def is_image(self) -> bool:
        """An image input ``[C, H, W]`` with C 1 (grayscale) or 3 (RGB)."""
        return len(self.input_shape) == 3 and self.input_shape[0] in (1, 3)

    mean: float
    std: float
    input_shape: tuple[int, ...]
    scale: float = 1.0 / 255.0
    domain: str = ""

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Normalisation:
        shape = list_field(d, "input_shape", where)
        if not 1 <= len(shape) <= MAX_INPUT_DIMS or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 < s <= MAX_DIM for s in shape
        ):
            raise ManifestError(
                f"manifest field '{where}.input_shape' must be 1 to {MAX_INPUT_DIMS} dims such as "
                f"[C, H, W] or [F] (each in 1..{MAX_DIM}), got {shape!r}"
            )
        if math.prod(shape) > MAX_DIM:
            raise ManifestError(
                f"manifest field '{where}.input_shape' {shape} holds {math.prod(shape)} "
                f"values per example, more than {MAX_DIM}"
            )
        b = NORM_BOUND
        std = num_field(d, "std", where)
        assert std is not None
        if not 1 / b <= std <= b:
            raise ManifestError(f"manifest field '{where}.std' must be in [{1 / b:g}, {b:g}], "
                                f"got {std!r}")  # fmt: skip
        scale = num_field(d, "scale", where, optional=True)
        if scale is not None and not 0 < scale <= b:
            raise ManifestError(f"manifest field '{where}.scale' must be in (0, {b:g}], "
                                f"got {scale!r}")  # fmt: skip
        scale = scale or 1.0 / 255.0
        mean = num_field(d, "mean", where)
        assert mean is not None
        if not abs(mean) <= b:
            raise ManifestError(f"manifest field '{where}.mean' must be in [-{b:g}, {b:g}], "
                                f"got {mean!r}")  # fmt: skip
        top = max(abs(mean), abs(255 * scale - mean)) / std
        if top > b:
            raise ManifestError(
                f"manifest field '{where}': (pixels * scale - mean) / std reaches {top:.3g} "
                f"for pixels in 0..255, more than {b:g} (mean {mean!r}, std {std!r}, "
                f"scale {scale!r})"
            )
        return cls(
            mean=mean,
            std=std,
            input_shape=tuple(shape),
            scale=scale,
            domain=get_field(d, "domain", where, str, optional=True) or "",
        )


@dataclass(frozen=True)
class TrainStepEntry:
    """A full training step (backbone + the heads of ``tasks``) at one width."""

    tasks: tuple[str, ...]
    clients: tuple[str, ...]
    file: FileEntry

    @classmethod
    def from_dict(cls, d: Any, where: str) -> TrainStepEntry:
        return cls(
            str_list_field(d, "tasks", where),
            str_list_field(d, "clients", where),
            FileEntry.from_dict(get_field(d, "file", where, dict), f"{where}.file"),
        )


@dataclass(frozen=True)
class MemoryEntry:
    """Measured at export (:mod:`mobile_client.memory`): peak RSS of the runtime alone,
    and its growth to predict one example / to also take one step at ``batch``."""

    runtime_bytes: int
    predict_bytes: int
    train_bytes: int | None  # None: no step graph for the client (it cannot train)
    batch: int
    client: str

    @classmethod
    def from_dict(cls, d: Any, where: str) -> MemoryEntry:
        vals = {k: get_field(d, k, where, int, optional=k == "train_bytes") for k in
                ("runtime_bytes", "predict_bytes", "train_bytes", "batch")}  # fmt: skip
        for k, v in vals.items():
            if v is not None and not (1 if k == "batch" else 0) <= v <= 1 << 50:
                raise ManifestError(f"manifest field '{where}.{k}' is out of range: {v}")
        return cls(**vals, client=get_field(d, "client", where, str))


@dataclass(frozen=True)
class WidthEntry:
    width: float
    feature_dim: int
    backbone: FileEntry
    train_steps: tuple[TrainStepEntry, ...] = ()
    memory: MemoryEntry | None = None  # optional: manifests before it still load

    @classmethod
    def from_dict(cls, d: Any, where: str) -> WidthEntry:
        fdim = get_field(d, "feature_dim", where, int)
        mem = get_field(d, "memory", where, dict, optional=True)
        if not 0 < fdim <= MAX_DIM:
            raise ManifestError(f"manifest field '{where}.feature_dim' must be in 1..{MAX_DIM}")
        return cls(
            width=width_field(d, "width", where),
            feature_dim=fdim,
            backbone=FileEntry.from_dict(
                get_field(d, "backbone", where, dict), f"{where}.backbone"
            ),
            train_steps=tuple(
                TrainStepEntry.from_dict(t, f"{where}.train_steps[{i}]")
                for i, t in enumerate(get_field(d, "train_steps", where, list, optional=True) or [])
            ),
            memory=None if mem is None else MemoryEntry.from_dict(mem, f"{where}.memory"),
        )


@dataclass(frozen=True)
class HeadEntry:
    client: str
    task: str
    kind: str
    labels: tuple[str, ...]
    width: float
    file: FileEntry
    head_step: FileEntry | None = None
    columns: tuple[int, int] | None = None  # FedAvg union head: this task's logit columns

    @classmethod
    def from_dict(cls, d: Any, where: str) -> HeadEntry:
        step = get_field(d, "head_step", where, dict, optional=True)
        cols = get_field(d, "columns", where, list, optional=True)
        if cols is not None and (
            len(cols) != 2
            or not all(isinstance(c, int) and not isinstance(c, bool) for c in cols)
            or not 0 <= cols[0] < cols[1]
        ):
            raise ManifestError(
                f"manifest field '{where}.columns' must be [start, end], 0 <= start < end"
            )
        kind = get_field(d, "kind", where, str)
        if kind not in TASK_KINDS:
            raise ManifestError(f"manifest field '{where}.kind' has unknown value {kind!r}")
        return cls(
            client=get_field(d, "client", where, str),
            task=get_field(d, "task", where, str),
            kind=kind,
            labels=str_list_field(d, "labels", where),
            width=width_field(d, "width", where),
            file=FileEntry.from_dict(get_field(d, "file", where, dict), f"{where}.file"),
            head_step=None if step is None else FileEntry.from_dict(step, f"{where}.head_step"),
            columns=None if cols is None else (cols[0], cols[1]),
        )


@dataclass(frozen=True)
class ClientEntry:
    client: str
    width: float
    tasks: tuple[str, ...]
    weights: FileEntry  # .npz of the client's state at its width, state-dict keys
    normalisation: Normalisation
    domain: str = ""
    backbone: FileEntry | None = None  # only when it differs from the width's shared one
    shared_keys: tuple[str, ...] = ()  # keys that travel to the server (the spec's roles)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> ClientEntry:
        bb = get_field(d, "backbone", where, dict, optional=True)
        shared = str_list_field(d, "shared_keys", where)  # required: roles come from the spec
        return cls(
            client=get_field(d, "client", where, str),
            width=width_field(d, "width", where),
            tasks=str_list_field(d, "tasks", where),
            weights=FileEntry.from_dict(get_field(d, "weights", where, dict), f"{where}.weights"),
            normalisation=Normalisation.from_dict(
                get_field(d, "normalisation", where, dict), f"{where}.normalisation"
            ),
            domain=get_field(d, "domain", where, str, optional=True) or "",
            backbone=None if bb is None else FileEntry.from_dict(bb, f"{where}.backbone"),
            shared_keys=shared,
        )
