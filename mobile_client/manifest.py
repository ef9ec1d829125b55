"""The edge contract: ``manifest.json`` of an exported federation (numpy + stdlib only).

``export`` writes it through :func:`write_manifest`; a device reads it through
:func:`load_manifest` and checks the files with :func:`verify_files`. Nothing else
is read on the device: every graph, its input/output names and shapes, the map
from graph names to state-dict keys, normalisation and labels are here.

Layout (``format_version`` 1; paths are relative to the manifest's directory)::

    {
      "format_version": 1, "opset": 18, "created": "2026-...Z",
      "algorithm": "fedper", "source_run": "...", "round": 3,
      "normalisation": {"domain", "mean", "std", "scale", "input_shape": [C, H, W]},
      "widths": [{"width", "feature_dim", "backbone": FILE,
                  "train_steps": [{"tasks": [...], "clients": [...], "file": FILE}]}],
      "heads": [{"client", "task", "kind", "labels", "width", "file": FILE,
                 "head_step": FILE | null, "columns": [start, end] | null}],
      "clients": [{"client", "width", "tasks", "domain", "normalisation",
                   "weights": FILE, "backbone": FILE | null, "shared_keys": [KEY]}]
    }

A FILE entry: ``{"path", "sha256", "kind", "inputs": [TENSOR], "outputs": [TENSOR],
"weights": {graph input name: state-dict key}, "weight_outputs": {graph output
name: state-dict key}, "lr_input", "loss_output", "x_input", "features_input",
"target_inputs": {task: input name}, "task_kinds": {task: kind}, "ort": {"path",
"sha256"} | null}``; a TENSOR: ``{"name", "shape" (ints, "batch" for the dynamic
axis), "dtype"}``.

Input normalisation: ``x = (pixels * scale - mean) / std`` with shape
``(batch, *input_shape)``. The loader bounds it so that every uint8 pixel gives a
finite float32 ``x``: ``scale``, ``mean`` and ``std`` are finite, ``0 < scale <=
NORM_BOUND``, ``|mean| <= NORM_BOUND``, ``1/NORM_BOUND <= std <= NORM_BOUND`` and
``max(|mean|, |255 * scale - mean|) / std <= NORM_BOUND`` (:data:`NORM_BOUND` = 1e6),
so ``|x| <= 1e6``; ``input_shape`` must match the ``[batch, C, H, W]`` the client's
backbone declares for its input. Every graph name a FILE entry gives (``weights``,
``x_input``, ``features_input``, ``lr_input``, ``target_inputs`` / ``weight_outputs``,
``loss_output``) must be one of the ``inputs`` / ``outputs`` it lists (checked at
load, and against the graph itself when a session is created). A head entry with ``columns`` (FedAvg: one union head
per client) reads its task's logits as ``logits[:, start:end]``. A client entry's
``backbone`` is set only when the client's backbone differs from the width's
shared one (personal models, local norms); its ``weights`` (``.npz``, state-dict
keys, the client's width) feed the training-step graphs; its ``shared_keys`` (required;
written by ``export`` from the run's ModelSpec, empty when nothing is shared) are the
state-dict keys the client sends back to the server in an update (the rest, e.g. its
heads or FedBN's local norms, stay on the device). The device never guesses a key's
role from its name.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mobile_client.errors import ManifestError

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
SUPPORTED_VERSIONS = (1,)
BATCH = "batch"
MAX_DIM = 1 << 20  # bound on a declared input / feature dimension
MAX_MANIFEST_BYTES = 64 << 20
NORM_BOUND = 1e6  # bound on normalisation parameters and on |x| (module docstring)


# ----------------------------------------------------------------------------- parsing helpers
def _get(d: Any, key: str, where: str, types: type | tuple[type, ...], optional: bool = False):
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


def _str_map(d: Any, key: str, where: str) -> dict[str, str]:
    m = _get(d, key, where, dict, optional=True) or {}
    for k, v in m.items():
        if not isinstance(v, str):
            raise ManifestError(f"manifest field '{where}.{key}.{k}' must be str")
    return dict(m)


def _list(d: Any, key: str, where: str) -> list:
    return list(_get(d, key, where, list))


def _str_list(d: Any, key: str, where: str, optional: bool = False) -> tuple[str, ...]:
    v = _get(d, key, where, list, optional=optional) or []
    for i, s in enumerate(v):
        if not isinstance(s, str):
            raise ManifestError(f"manifest field '{where}.{key}[{i}]' must be str")
    return tuple(v)


def _num(d: Any, key: str, where: str, optional: bool = False) -> float | None:
    """A finite number (JSON allows NaN, Infinity and integers too big for a float)."""
    v = _get(d, key, where, (int, float), optional=optional)
    if v is None:
        return None
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise ManifestError(f"manifest field '{where}.{key}' must be a finite number, got {v!r}")
    return f


def _width(d: Any, key: str, where: str) -> float:
    w = _num(d, key, where)
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
        shape = _list(d, "shape", where)
        for i, s in enumerate(shape):
            if not (isinstance(s, str) or (isinstance(s, int) and not isinstance(s, bool))):
                raise ManifestError(f"manifest field '{where}.shape[{i}]' must be int or str")
        return cls(_get(d, "name", where, str), tuple(shape), _get(d, "dtype", where, str))


@dataclass(frozen=True)
class FileRef:
    path: str
    sha256: str

    @classmethod
    def from_dict(cls, d: Any, where: str) -> FileRef:
        return cls(_get(d, "path", where, str), _get(d, "sha256", where, str))


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

    @classmethod
    def from_dict(cls, d: Any, where: str) -> FileEntry:
        ort = _get(d, "ort", where, dict, optional=True)
        return cls(
            path=_get(d, "path", where, str),
            sha256=_get(d, "sha256", where, str),
            kind=_get(d, "kind", where, str),
            inputs=tuple(
                TensorSpec.from_dict(t, f"{where}.inputs[{i}]")
                for i, t in enumerate(_get(d, "inputs", where, list, optional=True) or [])
            ),
            outputs=tuple(
                TensorSpec.from_dict(t, f"{where}.outputs[{i}]")
                for i, t in enumerate(_get(d, "outputs", where, list, optional=True) or [])
            ),
            weights=_str_map(d, "weights", where),
            weight_outputs=_str_map(d, "weight_outputs", where),
            lr_input=_get(d, "lr_input", where, str, optional=True),
            loss_output=_get(d, "loss_output", where, str, optional=True),
            x_input=_get(d, "x_input", where, str, optional=True),
            features_input=_get(d, "features_input", where, str, optional=True),
            target_inputs=_str_map(d, "target_inputs", where),
            task_kinds=_str_map(d, "task_kinds", where),
            ort=None if ort is None else FileRef.from_dict(ort, f"{where}.ort"),
        )


@dataclass(frozen=True)
class Normalisation:
    """``x = (pixels * scale - mean) / std``, shape ``(batch, *input_shape)``."""

    mean: float
    std: float
    input_shape: tuple[int, ...]
    scale: float = 1.0 / 255.0
    domain: str = ""

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Normalisation:
        shape = _list(d, "input_shape", where)
        if len(shape) != 3 or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 < s <= MAX_DIM for s in shape
        ):
            raise ManifestError(
                f"manifest field '{where}.input_shape' must be [C, H, W] (each in 1..{MAX_DIM})"
            )
        b = NORM_BOUND
        std = _num(d, "std", where)
        assert std is not None
        if not 1 / b <= std <= b:
            raise ManifestError(f"manifest field '{where}.std' must be in [{1 / b:g}, {b:g}], "
                                f"got {std!r}")  # fmt: skip
        scale = _num(d, "scale", where, optional=True)
        if scale is not None and not 0 < scale <= b:
            raise ManifestError(f"manifest field '{where}.scale' must be in (0, {b:g}], "
                                f"got {scale!r}")  # fmt: skip
        scale = scale or 1.0 / 255.0
        mean = _num(d, "mean", where)
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
            domain=_get(d, "domain", where, str, optional=True) or "",
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
            _str_list(d, "tasks", where),
            _str_list(d, "clients", where),
            FileEntry.from_dict(_get(d, "file", where, dict), f"{where}.file"),
        )


@dataclass(frozen=True)
class WidthEntry:
    width: float
    feature_dim: int
    backbone: FileEntry
    train_steps: tuple[TrainStepEntry, ...] = ()

    @classmethod
    def from_dict(cls, d: Any, where: str) -> WidthEntry:
        fdim = _get(d, "feature_dim", where, int)
        if not 0 < fdim <= MAX_DIM:
            raise ManifestError(f"manifest field '{where}.feature_dim' must be in 1..{MAX_DIM}")
        return cls(
            width=_width(d, "width", where),
            feature_dim=fdim,
            backbone=FileEntry.from_dict(_get(d, "backbone", where, dict), f"{where}.backbone"),
            train_steps=tuple(
                TrainStepEntry.from_dict(t, f"{where}.train_steps[{i}]")
                for i, t in enumerate(_get(d, "train_steps", where, list, optional=True) or [])
            ),
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
        step = _get(d, "head_step", where, dict, optional=True)
        cols = _get(d, "columns", where, list, optional=True)
        if cols is not None and (
            len(cols) != 2
            or not all(isinstance(c, int) and not isinstance(c, bool) for c in cols)
            or not 0 <= cols[0] < cols[1]
        ):
            raise ManifestError(
                f"manifest field '{where}.columns' must be [start, end], 0 <= start < end"
            )
        kind = _get(d, "kind", where, str)
        if kind not in ("multiclass", "multilabel"):
            raise ManifestError(f"manifest field '{where}.kind' has unknown value {kind!r}")
        return cls(
            client=_get(d, "client", where, str),
            task=_get(d, "task", where, str),
            kind=kind,
            labels=_str_list(d, "labels", where),
            width=_width(d, "width", where),
            file=FileEntry.from_dict(_get(d, "file", where, dict), f"{where}.file"),
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
        bb = _get(d, "backbone", where, dict, optional=True)
        shared = _str_list(d, "shared_keys", where)  # required: roles come from the spec
        return cls(
            client=_get(d, "client", where, str),
            width=_width(d, "width", where),
            tasks=_str_list(d, "tasks", where),
            weights=FileEntry.from_dict(_get(d, "weights", where, dict), f"{where}.weights"),
            normalisation=Normalisation.from_dict(
                _get(d, "normalisation", where, dict), f"{where}.normalisation"
            ),
            domain=_get(d, "domain", where, str, optional=True) or "",
            backbone=None if bb is None else FileEntry.from_dict(bb, f"{where}.backbone"),
            shared_keys=shared,
        )


@dataclass(frozen=True)
class Manifest:
    opset: int
    created: str
    normalisation: Normalisation
    widths: tuple[WidthEntry, ...]
    heads: tuple[HeadEntry, ...]
    clients: tuple[ClientEntry, ...] = ()
    algorithm: str = ""
    source_run: str = ""
    round: int = 0
    format_version: int = MANIFEST_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"format_version": d.pop("format_version"), **d}

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        if not isinstance(d, dict):
            raise ManifestError("manifest must be a JSON object")
        if "format_version" not in d:
            raise ManifestError(
                f"manifest field 'format_version' is missing (supported: {SUPPORTED_VERSIONS})"
            )
        v = d["format_version"]
        if v not in SUPPORTED_VERSIONS or isinstance(v, bool):
            raise ManifestError(
                f"manifest field 'format_version' has unsupported value {v!r} "
                f"(supported: {SUPPORTED_VERSIONS})"
            )
        m = cls(
            format_version=v,
            opset=_get(d, "opset", "", int),
            created=_get(d, "created", "", str),
            normalisation=Normalisation.from_dict(
                _get(d, "normalisation", "", dict), "normalisation"
            ),
            widths=tuple(
                WidthEntry.from_dict(w, f"widths[{i}]")
                for i, w in enumerate(_list(d, "widths", ""))
            ),
            heads=tuple(
                HeadEntry.from_dict(h, f"heads[{i}]") for i, h in enumerate(_list(d, "heads", ""))
            ),
            clients=tuple(
                ClientEntry.from_dict(c, f"clients[{i}]")
                for i, c in enumerate(_get(d, "clients", "", list, optional=True) or [])
            ),
            algorithm=_get(d, "algorithm", "", str, optional=True) or "",
            source_run=_get(d, "source_run", "", str, optional=True) or "",
            round=_get(d, "round", "", int, optional=True) or 0,
        )
        m.check_references()
        return m

    def check_references(self) -> None:
        """Every name one entry gives another resolves: clients, widths, heads, keys.

        A client's ``shared_keys`` and every state-dict key a graph of that client
        reads or writes (``weights`` / ``weight_outputs``) must be a key of the
        client's weights file; each client task has a head; each head has one label
        per output column. Raises :class:`ManifestError` naming the field and the key.
        """
        if self.round < 0:
            raise ManifestError(f"manifest field 'round' must be >= 0, got {self.round}")
        widths = [w.width for w in self.widths]
        if not widths:
            raise ManifestError("manifest field 'widths' names no width")
        if len({round(w, 9) for w in widths}) != len(widths):
            raise ManifestError(f"manifest field 'widths' repeats a width: {widths}")
        ids = [c.client for c in self.clients]
        if len(set(ids)) != len(ids):
            raise ManifestError(f"manifest field 'clients' repeats a client id: {ids}")

        def has_width(w: float) -> bool:
            return any(abs(w - x) < 1e-9 for x in widths)

        for i, h in enumerate(self.heads):
            where = f"heads[{i}]"
            if self.clients and h.client not in ids:
                raise ManifestError(
                    f"manifest field '{where}.client': {h.client!r} is not a client"
                )
            if not has_width(h.width):
                raise ManifestError(
                    f"manifest field '{where}.width': {h.width:g} is not in 'widths'"
                )
            outs = h.file.outputs[0].shape if h.file.outputs else ()
            n = outs[-1] if outs and isinstance(outs[-1], int) else None
            if h.columns is not None:
                if n is not None and h.columns[1] > n:
                    raise ManifestError(
                        f"manifest field '{where}.columns': {list(h.columns)} exceeds the "
                        f"head's {n} outputs"
                    )
                n = h.columns[1] - h.columns[0]
            if not h.labels or (n is not None and len(h.labels) != n):
                raise ManifestError(
                    f"manifest field '{where}.labels': {len(h.labels)} label(s) for a head "
                    f"with {n if n is not None else 'at least one'} output(s)"
                )
        for i, c in enumerate(self.clients):
            self._check_client(c, f"clients[{i}]")
        for f, where in self.graph_entries():
            ins = {t.name for t in f.inputs} if f.inputs else None  # None: not listed
            check_graph_names(f, ins, {t.name for t in f.outputs} if f.outputs else None, where)

    def graph_entries(self) -> list[tuple[FileEntry, str]]:
        """Every ONNX graph entry with its field path (``widths[0].backbone``, ...)."""
        out: list[tuple[FileEntry, str]] = []
        for i, w in enumerate(self.widths):
            out.append((w.backbone, f"widths[{i}].backbone"))
            out += [(t.file, f"widths[{i}].train_steps[{j}].file")
                    for j, t in enumerate(w.train_steps)]  # fmt: skip
        for i, h in enumerate(self.heads):
            out.append((h.file, f"heads[{i}].file"))
            if h.head_step is not None:
                out.append((h.head_step, f"heads[{i}].head_step"))
        for i, c in enumerate(self.clients):
            if c.backbone is not None:
                out.append((c.backbone, f"clients[{i}].backbone"))
        return out

    def _check_client(self, c: ClientEntry, where: str) -> None:
        if not any(abs(c.width - w.width) < 1e-9 for w in self.widths):
            raise ManifestError(f"manifest field '{where}.width': {c.width:g} is not in 'widths'")
        keys = set(c.weights.weights.values())
        if not keys:
            raise ManifestError(f"manifest field '{where}.weights.weights' names no key")
        src = c.weights.path

        def need(names, field: str) -> None:
            for k in names:
                if k not in keys:
                    raise ManifestError(
                        f"manifest field {field!r} names key {k!r}, which is not in the "
                        f"client's weights {src!r}"
                    )

        need(c.shared_keys, f"{where}.shared_keys")
        heads = {h.task: (i, h) for i, h in enumerate(self.heads) if h.client == c.client}
        for t in c.tasks:
            if t not in heads:
                raise ManifestError(f"manifest field '{where}.tasks': task {t!r} has no head")
        for i, h in heads.values():
            for f, name in ((h.file, "file"), (h.head_step, "head_step")):
                if f is not None:
                    need(f.weights.values(), f"heads[{i}].{name}.weights")
                    need(f.weight_outputs.values(), f"heads[{i}].{name}.weight_outputs")
        if c.backbone is not None:
            need(c.backbone.weights.values(), f"{where}.backbone.weights")
        wi = next(i for i, w in enumerate(self.widths) if abs(c.width - w.width) < 1e-9)
        bb, bb_where = (
            (c.backbone, f"{where}.backbone")
            if c.backbone is not None
            else (self.widths[wi].backbone, f"widths[{wi}].backbone")
        )
        xin = bb.x_input or (bb.inputs[0].name if bb.inputs else None)
        spec = next((t for t in bb.inputs if t.name == xin), None)
        shape = list(c.normalisation.input_shape)
        if spec is not None and all(isinstance(s, int) for s in spec.shape[1:]):
            if list(spec.shape[1:]) != shape:
                raise ManifestError(
                    f"manifest field '{where}.normalisation.input_shape' is {shape}, but "
                    f"{bb_where} ({bb.path!r}) input {xin!r} has shape {list(spec.shape)}"
                )
        for i, w in enumerate(self.widths):
            if abs(w.width - c.width) >= 1e-9:
                continue
            for j, step in enumerate(w.train_steps):
                if c.client in step.clients or set(step.tasks) == set(c.tasks):
                    at = f"widths[{i}].train_steps[{j}].file"
                    need(step.file.weights.values(), f"{at}.weights")
                    need(step.file.weight_outputs.values(), f"{at}.weight_outputs")
                    _need_targets(step.file, tuple(step.file.task_kinds), at)
        for i, h in heads.values():
            if h.head_step is not None:
                _need_targets(h.head_step, ("task",), f"heads[{i}].head_step")

    # ------------------------------------------------------------------ lookups
    def width(self, width: float) -> WidthEntry:
        for w in self.widths:
            if abs(w.width - width) < 1e-9:
                return w
        raise ManifestError(f"width {width} not in the manifest; widths: {self.width_values()}")

    def width_values(self) -> list[float]:
        return [w.width for w in self.widths]

    def heads_of(self, client: str) -> list[HeadEntry]:
        return [h for h in self.heads if h.client == client]

    def client(self, client: str) -> ClientEntry:
        for c in self.clients:
            if c.client == client:
                return c
        raise ManifestError(
            f"client {client!r} not in the manifest; clients: {[c.client for c in self.clients]}"
        )

    def file_entries(self) -> list[FileEntry]:
        out: list[FileEntry] = []
        for w in self.widths:
            out.append(w.backbone)
            out.extend(t.file for t in w.train_steps)
        for h in self.heads:
            out.append(h.file)
            if h.head_step is not None:
                out.append(h.head_step)
        for c in self.clients:
            out.append(c.weights)
            if c.backbone is not None:
                out.append(c.backbone)
        return out


def check_graph_names(
    f: FileEntry, inputs: set[str] | None, outputs: set[str] | None, where: str
) -> None:
    """Every graph input/output name ``f`` gives is in ``inputs`` / ``outputs`` (those the
    manifest lists, or the loaded graph's; None: unknown, not checked); a
    :class:`ManifestError` names the field."""
    named_in: list[tuple[str, str | None]] = [(f"weights.{n}", n) for n in f.weights]
    named_in += [(k, getattr(f, k)) for k in ("x_input", "features_input", "lr_input")]
    named_in += [(f"target_inputs.{t}", n) for t, n in f.target_inputs.items()]
    named_out: list[tuple[str, str | None]] = [(f"weight_outputs.{n}", n) for n in f.weight_outputs]
    named_out.append(("loss_output", f.loss_output))
    for side, named, have in (("input", named_in, inputs), ("output", named_out, outputs)):
        for fld, name in named:
            if have is not None and name is not None and name not in have:
                raise ManifestError(
                    f"manifest field '{where}.{fld}' names graph {side} {name!r}, which "
                    f"{f.path!r} does not have ({side}s: {', '.join(sorted(have or ())) or 'none'})"
                )


def _need_targets(f: FileEntry, tasks: tuple[str, ...], where: str) -> None:
    """A training-step graph names a target input for each task it trains."""
    if not tasks:
        raise ManifestError(f"manifest field '{where}.task_kinds' names no task")
    for t in tasks:
        if t not in f.target_inputs:
            raise ManifestError(f"manifest field '{where}.target_inputs' has no entry {t!r}")
    for t, kind in f.task_kinds.items():
        if kind not in ("multiclass", "multilabel"):
            raise ManifestError(
                f"manifest field '{where}.task_kinds.{t}' has unknown value {kind!r}"
            )


# ----------------------------------------------------------------------------- I/O
def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write ``directory/manifest.json`` (atomically: temp file then rename)."""
    path = Path(directory) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def load_manifest(directory: str | os.PathLike[str]) -> Manifest:
    """Read and validate ``directory/manifest.json`` (or a path to the file itself)."""
    p = Path(directory)
    path = p if p.is_file() else p / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"no manifest at {path}")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ManifestError(f"{path}: not valid JSON: {exc}") from exc
    except OSError as exc:
        raise ManifestError(f"{path}: cannot be read: {exc}") from exc
    if not isinstance(data, dict):
        raise ManifestError(
            f"{path}: the manifest must be a JSON object, got {type(data).__name__}"
        )
    return Manifest.from_dict(data)


def _refs(manifest: Manifest) -> list[FileRef]:
    refs = []
    for e in manifest.file_entries():
        refs.append(FileRef(e.path, e.sha256))
        if e.ort is not None:
            refs.append(e.ort)
    return refs


def verify_files(directory: str | os.PathLike[str], manifest: Manifest) -> None:
    """Every file the manifest names exists under ``directory`` with its sha256."""
    root = Path(directory)
    if root.is_file():
        root = root.parent
    seen: set[str] = set()
    for ref in _refs(manifest):
        if ref.path in seen:
            continue
        seen.add(ref.path)
        rel = Path(ref.path)
        if rel.is_absolute() or ".." in rel.parts:
            raise ManifestError(f"file {ref.path!r}: paths must be relative to the manifest")
        f = root / rel
        if not f.is_file():
            raise ManifestError(f"file {ref.path!r} named in the manifest is missing ({f})")
        got = sha256_file(f)
        if got != ref.sha256:
            raise ManifestError(
                f"file {ref.path!r}: sha256 {got} does not match the manifest's {ref.sha256}"
            )
