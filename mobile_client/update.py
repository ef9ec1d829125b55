"""The client update file: the shared arrays a client sends back, with its metadata.

A safetensors file (:mod:`mobile_client.safetensors_np`) whose string metadata holds
``format`` ("fmtl-update"), ``format_version``, ``client_id``, ``round``, ``width``,
``num_examples``, ``base_hash`` (:func:`state_hash` of the weights training started
from) and ``metrics`` (JSON object of floats). Arrays are float32 or int64 and
finite. Written atomically; the server reads it through :func:`read_update`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mobile_client.errors import SafetensorsError, UpdateError
from mobile_client.safetensors_np import load_file, save_file

UPDATE_FORMAT = "fmtl-update"
UPDATE_VERSION = 1
ALLOWED_DTYPES = (np.dtype(np.float32), np.dtype(np.int64))


def state_hash(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over sorted keys, each key's dtype, shape and little-endian bytes."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.asarray(arrays[k])
        a = np.asarray(a, dtype=a.dtype.newbyteorder("<"), order="C")  # 0-d stays 0-d
        h.update(k.encode() + b"\0")
        h.update(a.dtype.str.encode() + b"\0")
        h.update(json.dumps(list(a.shape)).encode() + b"\0")
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class UpdateMeta:
    client_id: str
    round: int
    width: float
    num_examples: int
    base_hash: str
    metrics: dict[str, float] = field(default_factory=dict)

    def to_strings(self) -> dict[str, str]:
        return {
            "format": UPDATE_FORMAT,
            "format_version": str(UPDATE_VERSION),
            "client_id": self.client_id,
            "round": str(int(self.round)),
            "width": repr(float(self.width)),
            "num_examples": str(int(self.num_examples)),
            "base_hash": self.base_hash,
            "metrics": json.dumps({k: float(v) for k, v in self.metrics.items()}),
        }


def _check_arrays(arrays: Mapping[str, np.ndarray], where: str) -> None:
    for k, a in arrays.items():
        if a.dtype not in ALLOWED_DTYPES:
            raise UpdateError(f"{where}: key {k!r} has dtype {a.dtype}; expected float32 or int64")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise UpdateError(f"{where}: key {k!r} has {int((~np.isfinite(a)).sum())} NaN/Inf")


def _check_meta(meta: UpdateMeta, where: str) -> None:
    """The rules every update's metadata obeys (the writer and the reader share them)."""
    if not meta.client_id:
        raise UpdateError(f"{where}: metadata field 'client_id' is empty")
    if meta.num_examples <= 0 or meta.round < 0 or not 0 < meta.width <= 1:
        raise UpdateError(
            f"{where}: metadata fields out of range: num_examples={meta.num_examples}, "
            f"round={meta.round}, width={meta.width}"
        )
    for m, v in meta.metrics.items():
        if not math.isfinite(float(v)):
            raise UpdateError(f"{where}: metadata field 'metrics.{m}' is not finite: {v}")


def write_update(
    path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray], meta: UpdateMeta
) -> Path:
    """Validate and write an update atomically (temp file + ``os.replace``)."""
    arrs = {k: np.asarray(v) for k, v in arrays.items()}
    _check_arrays(arrs, str(path))
    _check_meta(meta, str(path))
    return save_file(arrs, path, meta.to_strings())


def _field(md: Mapping[str, str], name: str, conv, where: str):
    if name not in md:
        raise UpdateError(f"{where}: metadata field {name!r} is missing")
    try:
        return conv(md[name])
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise UpdateError(f"{where}: metadata field {name!r} is malformed: {md[name]!r}") from exc


def _metrics(text: str) -> dict[str, float]:
    d = json.loads(text)
    if not isinstance(d, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in d.values()
    ):
        raise ValueError("metrics must be a JSON object of numbers")
    return {str(k): float(v) for k, v in d.items()}


def read_update(
    path: str | os.PathLike[str], *, expected_base_hash: str | None = None
) -> tuple[dict[str, np.ndarray], UpdateMeta]:
    """Read and validate an update; a base hash other than ``expected_base_hash`` raises."""
    where = str(path)
    try:
        arrays, md = load_file(path)
    except SafetensorsError as exc:
        raise UpdateError(f"not a readable update: {exc}") from exc
    if md.get("format") != UPDATE_FORMAT:
        raise UpdateError(f"{where}: metadata field 'format' is {md.get('format')!r}, "
                          f"expected {UPDATE_FORMAT!r}")  # fmt: skip
    version = _field(md, "format_version", int, where)
    if version != UPDATE_VERSION:
        raise UpdateError(f"{where}: metadata field 'format_version' is {version}, "
                          f"supported: {UPDATE_VERSION}")  # fmt: skip
    meta = UpdateMeta(
        client_id=_field(md, "client_id", str, where),
        round=_field(md, "round", int, where),
        width=_field(md, "width", float, where),
        num_examples=_field(md, "num_examples", int, where),
        base_hash=_field(md, "base_hash", str, where),
        metrics=_field(md, "metrics", _metrics, where),
    )
    _check_meta(meta, where)
    _check_arrays(arrays, where)
    if expected_base_hash is not None and meta.base_hash != expected_base_hash:
        raise UpdateError(
            f"{where}: metadata field 'base_hash' is {meta.base_hash}, expected "
            f"{expected_base_hash} (the update was trained from other weights)"
        )
    return arrays, meta
