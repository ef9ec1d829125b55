"""Pure-numpy safetensors read/write (the update wire format; no torch, no pickle).

Layout (https://github.com/huggingface/safetensors): an 8-byte little-endian header
length ``N``, ``N`` bytes of JSON ``{"__metadata__": {str: str}, key: {"dtype",
"shape", "data_offsets": [start, end]}}`` padded with spaces to a multiple of 8,
then the raw little-endian tensor bytes, offsets relative to the end of the header.
Tensors are laid out as the Rust writer does (larger dtypes first, then by name), so
a file written here is byte-identical to ``safetensors.numpy.save_file`` when there
is at most one metadata entry; the Rust writer orders several metadata entries by a
randomly seeded hash map, here they are sorted by key (same content, deterministic
bytes).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mobile_client.errors import SafetensorsError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_CODES = {(d.kind, d.itemsize): c for c, d in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # as the reference reader
# the Rust writer orders tensors by its Dtype enum, descending, then by name
_RANK = {c: i for i, c in enumerate(
    ["BOOL", "U8", "I8", "I16", "U16", "F16", "I32", "U32", "F32", "F64", "I64", "U64"]
)}  # fmt: skip


def _code(key: str, a: np.ndarray, path: str) -> str:
    code = _CODES.get((a.dtype.kind, a.dtype.itemsize))
    if code is None:
        raise SafetensorsError(f"{path}: key {key!r} has unsupported dtype {a.dtype}")
    return code


def serialize(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file holding ``arrays`` and string ``metadata``."""
    arrs = {str(k): np.asarray(v) for k, v in arrays.items()}
    header: dict[str, object] = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise SafetensorsError(f"metadata {k!r}: keys and values must be str")
        header["__metadata__"] = dict(sorted(metadata.items()))
    if "__metadata__" in arrs:
        raise SafetensorsError("key '__metadata__' is reserved")
    codes = {k: _code(k, a, "<memory>") for k, a in arrs.items()}
    chunks, offset = [], 0
    for k in sorted(arrs, key=lambda k: (-_RANK[codes[k]], k)):
        a, code = arrs[k], codes[k]
        b = np.ascontiguousarray(a, dtype=DTYPES[code]).tobytes()
        header[k] = {
            "dtype": code,
            "shape": list(a.shape),
            "data_offsets": [offset, offset + len(b)],
        }
        chunks.append(b)
        offset += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h + b"".join(chunks)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temp file next to ``path``, fsync, then ``os.replace`` it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_file(
    arrays: Mapping[str, np.ndarray],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``arrays`` (+ string ``metadata``) to ``path`` atomically."""
    return atomic_write_bytes(path, serialize(arrays, metadata))


def deserialize(data: bytes, path: str = "<bytes>") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes -> ``(arrays, metadata)``; arrays are writable copies."""
    if len(data) < 8:
        raise SafetensorsError(f"{path}: file too short ({len(data)} bytes) for a header")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER or 8 + n > len(data):
        raise SafetensorsError(f"{path}: header length {n} exceeds the file ({len(data)} bytes)")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(f"{path}: header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header must be a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise SafetensorsError(f"{path}: '__metadata__' must map str to str")
    body = memoryview(data)[8 + n :]
    arrays: dict[str, np.ndarray] = {}
    spans = []
    for key, info in header.items():
        if not isinstance(info, dict):
            raise SafetensorsError(f"{path}: key {key!r}: entry must be an object")
        code, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if code not in DTYPES:
            raise SafetensorsError(f"{path}: key {key!r}: unknown dtype {code!r}")
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise SafetensorsError(f"{path}: key {key!r}: bad shape {shape!r}")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            or not 0 <= offs[0] <= offs[1] <= len(body)
        ):
            raise SafetensorsError(
                f"{path}: key {key!r}: bad data_offsets {offs!r} (data is {len(body)} bytes)"
            )
        dt = DTYPES[code]
        want = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if offs[1] - offs[0] != want:
            raise SafetensorsError(
                f"{path}: key {key!r}: data_offsets {offs} hold {offs[1] - offs[0]} bytes, "
                f"shape {shape} of {code} needs {want}"
            )
        spans.append((offs[0], offs[1], key))
        arrays[key] = np.frombuffer(body[offs[0] : offs[1]], dtype=dt).reshape(shape).copy()
    spans.sort()
    end = 0
    for start, stop, key in spans:
        if start != end:
            raise SafetensorsError(f"{path}: key {key!r}: data_offsets overlap or leave a gap")
        end = stop
    if end != len(body):
        raise SafetensorsError(f"{path}: {len(body) - end} trailing bytes after the last tensor")
    return arrays, dict(meta)


def load_file(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read ``path`` -> ``(arrays, metadata)`` (never unpickles anything)."""
    p = Path(path)
    if not p.is_file():
        raise SafetensorsError(f"{p}: no such file")
    return deserialize(p.read_bytes(), str(p))
