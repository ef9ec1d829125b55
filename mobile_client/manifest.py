"""The edge contract: ``manifest.json`` of an exported federation (numpy + stdlib only).

``export`` writes it through :func:`write_manifest`; a device reads it through
:func:`load_manifest` and checks the files with :func:`verify_files`. Nothing else
is read on the device: every graph, its input/output names and shapes, the map
from graph names to state-dict keys, normalisation and labels are here.

Layout (``format_version`` 1; paths are relative to the manifest's directory)::

    {
      "format_version": 1, "opset": 18, "created": "2026-...Z",
      "algorithm": "fedper", "source_run": "...", "round": 3,
      "normalisation": {"domain", "mean", "std", "scale", "input_shape": [C, H, W] | [F] | ...},
      "widths": [{"width", "feature_dim", "backbone": FILE,
                  "train_steps": [{"tasks": [...], "clients": [...], "file": FILE}],
                  "memory": {"runtime_bytes", "predict_bytes", "train_bytes", "batch",
                             "client"} | null}],   # optional: mobile_client.memory
      "heads": [{"client", "task", "kind", "labels", "width", "file": FILE,
                 "head_step": FILE | null, "columns": [start, end] | null}],
      "clients": [{"client", "width", "tasks", "domain", "normalisation",
                   "weights": FILE, "backbone": FILE | null, "shared_keys": [KEY]}],
      "slicing": {"mode", "groups", "segments", "keys"}     # optional: mobile_client.slicing
    }

A FILE entry: ``{"path", "sha256", "kind", "inputs": [TENSOR], "outputs": [TENSOR],
"weights": {graph input name: state-dict key}, "weight_outputs": {graph output
name: state-dict key}, "lr_input", "loss_output", "x_input", "features_input",
"target_inputs": {task: input name}, "task_kinds": {task: kind}, "ort": {"path",
"sha256"} | null, "momentum_inputs" / "momentum_outputs": {graph name: parameter key}
(a step's SGD momentum buffers, optional), "optimizer": {"momentum", "weight_decay",
"nesterov"} (optional)}``; a TENSOR: ``{"name", "shape" (ints, "batch" for the dynamic
axis), "dtype"}``.

Input normalisation: ``x = (pixels * scale - mean) / std`` with shape
``(batch, *input_shape)``. The loader bounds it so that every uint8 pixel gives a
finite float32 ``x``: ``scale``, ``mean`` and ``std`` are finite, ``0 < scale <=
NORM_BOUND``, ``|mean| <= NORM_BOUND``, ``1/NORM_BOUND <= std <= NORM_BOUND`` and
``max(|mean|, |255 * scale - mean|) / std <= NORM_BOUND`` (``NORM_BOUND`` = 1e6, in
:mod:`mobile_client.manifest_entries`), so ``|x| <= 1e6``; ``input_shape`` (1 to 4 dims:
``[C, H, W]`` images, ``[F]`` features, ``[L, F]`` sequences) must match the
``[batch, *input_shape]`` the client's backbone declares for its input. Every graph name a FILE entry gives (``weights``,
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

This module owns the top-level :class:`Manifest` and its files on disk; the records
it is made of live in :mod:`mobile_client.manifest_entries`, the cross-reference
checks in :mod:`mobile_client.manifest_checks`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mobile_client.errors import ManifestError
from mobile_client.manifest_checks import check_references
from mobile_client.manifest_entries import (
    ClientEntry,
    FileEntry,
    FileRef,
    HeadEntry,
    Normalisation,
    WidthEntry,
    get_field,
    list_field,
)
from mobile_client.slicing import Slicing

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
SUPPORTED_VERSIONS = (1,)
MAX_MANIFEST_BYTES = 64 << 20


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
    slicing: Slicing | None = None  # how the server's shared keys are cut to a width

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["slicing"] is None:  # a bundle of one model (export_model): no server state
            del d["slicing"]
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
            opset=get_field(d, "opset", "", int),
            created=get_field(d, "created", "", str),
            normalisation=Normalisation.from_dict(
                get_field(d, "normalisation", "", dict), "normalisation"
            ),
            widths=tuple(
                WidthEntry.from_dict(w, f"widths[{i}]")
                for i, w in enumerate(list_field(d, "widths", ""))
            ),
            heads=tuple(
                HeadEntry.from_dict(h, f"heads[{i}]")
                for i, h in enumerate(list_field(d, "heads", ""))
            ),
            clients=tuple(
                ClientEntry.from_dict(c, f"clients[{i}]")
                for i, c in enumerate(get_field(d, "clients", "", list, optional=True) or [])
            ),
            algorithm=get_field(d, "algorithm", "", str, optional=True) or "",
            source_run=get_field(d, "source_run", "", str, optional=True) or "",
            round=get_field(d, "round", "", int, optional=True) or 0,
            slicing=None if d.get("slicing") is None else Slicing.from_dict(d["slicing"]),
        )
        check_references(m)
        return m

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
