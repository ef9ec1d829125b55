"""safetensors files as ``(arrays, metadata)``: the ``safetensors`` package, typed errors.

The update wire format and every other ``.safetensors`` file the project reads or
writes go through here. Parsing is done by the audited ``safetensors`` package (its
Rust reader checks the header length, JSON, dtypes, shapes and that the data
offsets cover the file exactly, with no overlap or gap); it needs numpy only, never
torch. This module adds what the package leaves to its callers:

* a whitelist of dtypes (those numpy has; ``BF16``/``F8`` tensors are refused with a
  message instead of failing inside numpy);
* every failure as one :class:`~mobile_client.errors.SafetensorsError` naming the
  file (and the key);
* writable copies of the arrays (the package returns views of a read buffer);
* atomic writes (:func:`mobile_client.fileio.atomic_write_bytes`), and arrays made
  C-contiguous first (the package serialises the memory behind a pointer).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import safetensors.numpy as stn
from safetensors import SafetensorError, safe_open

from mobile_client.errors import SafetensorsError
from mobile_client.fileio import atomic_write_bytes

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
_SUPPORTED = {(d.kind, d.itemsize) for d in DTYPES.values()}


def serialize(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file holding ``arrays`` and string ``metadata``."""
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise SafetensorsError(f"metadata {dict(metadata)!r}: keys and values must be str")
    arrs: dict[str, np.ndarray] = {}
    for k, v in arrays.items():
        if not isinstance(k, str) or k == "__metadata__":
            raise SafetensorsError(f"key {k!r}: keys must be str other than '__metadata__'")
        a = np.asarray(v, order="C")  # keeps 0-d arrays 0-d (ascontiguousarray would not)
        if (a.dtype.kind, a.dtype.itemsize) not in _SUPPORTED:
            raise SafetensorsError(f"key {k!r} has unsupported dtype {a.dtype}")
        arrs[k] = a
    try:
        return stn.save(arrs, metadata=dict(metadata) if metadata else None)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise SafetensorsError(f"cannot serialise: {exc}") from exc


def save_file(
    arrays: Mapping[str, np.ndarray],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``arrays`` (+ string ``metadata``) to ``path`` atomically."""
    return atomic_write_bytes(path, serialize(arrays, metadata))


def load_file(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read ``path`` -> ``(arrays, metadata)``; arrays are writable copies (never unpickles)."""
    p = Path(path)
    if not p.is_file():
        raise SafetensorsError(f"{p}: no such file")
    arrays: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(p), framework="np") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                code = f.get_slice(key).get_dtype()
                if code not in DTYPES:
                    raise SafetensorsError(
                        f"{p}: key {key!r} has dtype {code}; supported: {', '.join(DTYPES)}"
                    )
                arrays[key] = np.array(f.get_tensor(key), dtype=DTYPES[code], copy=True)
    except SafetensorError as exc:
        raise SafetensorsError(f"{p}: not a valid safetensors file: {exc}") from exc
    except OSError as exc:
        raise SafetensorsError(f"{p}: cannot be read: {exc}") from exc
    return arrays, metadata
