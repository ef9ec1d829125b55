"""The initializers of an ONNX file, read without the ``onnx`` package (numpy only).

The edge runtime depends on numpy + onnxruntime + safetensors, and onnxruntime does
not list a graph's (non-overridable) initializers. :func:`read_initializers` walks
the protobuf wire format of ``ModelProto.graph.initializer`` (fields: ``ModelProto``
7 = graph; ``GraphProto`` 5 = initializer; ``TensorProto`` 1 = dims, 2 = data_type,
4 = float_data, 8 = name, 9 = raw_data, 14 = data_location) and returns the float32
initializers of the main graph by name. Tensors kept in external files are refused;
other dtypes (e.g. int64 shape constants) are skipped: they are no weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mobile_client.errors import ManifestError

FLOAT = 1  # TensorProto.DataType.FLOAT
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


def _varint(b: bytes, i: int, where: str) -> tuple[int, int]:
    out = shift = 0
    while True:
        if i >= len(b) or shift > 63:
            raise ManifestError(f"{where}: truncated or malformed protobuf varint")
        c = b[i]
        i += 1
        out |= (c & 0x7F) << shift
        if not c & 0x80:
            return out, i
        shift += 7


def _fields(b: bytes, where: str) -> list[tuple[int, int, bytes | int]]:
    """``(field number, wire type, value)`` of one protobuf message (LEN: the bytes)."""
    out: list[tuple[int, int, bytes | int]] = []
    i = 0
    while i < len(b):
        key, i = _varint(b, i, where)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(b, i, where)
            out.append((num, wt, v))
        elif wt == 2:
            n, i = _varint(b, i, where)
            if i + n > len(b):
                raise ManifestError(f"{where}: a protobuf field runs past the end of the file")
            out.append((num, wt, b[i : i + n]))
            i += n
        elif wt in (1, 5):
            i += 8 if wt == 1 else 4
        else:
            raise ManifestError(f"{where}: unsupported protobuf wire type {wt}")
    if i != len(b):
        raise ManifestError(f"{where}: truncated protobuf message")
    return out


def _tensor(b: bytes, where: str) -> tuple[str, np.ndarray | None]:
    name, dims, dtype, raw, floats, external = "", [], 0, None, b"", False
    for num, wt, v in _fields(b, where):
        if num == 1:
            if wt == 0:
                dims.append(int(v))  # type: ignore[arg-type]
            else:  # packed
                j, data = 0, v
                assert isinstance(data, bytes)
                while j < len(data):
                    d, j = _varint(data, j, where)
                    dims.append(d)
        elif num == 2 and wt == 0:
            dtype = int(v)  # type: ignore[arg-type]
        elif num == 4 and wt == 2:
            floats += v  # type: ignore[operator]
        elif num == 8 and wt == 2:
            name = bytes(v).decode("utf-8", "replace")  # type: ignore[arg-type]
        elif num == 9 and wt == 2:
            raw = v
        elif num == 14 and wt == 0 and v == EXTERNAL:
            external = True
    if dtype != FLOAT:
        return name, None
    if external:
        raise ManifestError(f"{where}: initializer {name!r} is stored in an external file")
    data = raw if raw is not None else floats
    assert isinstance(data, bytes)
    n = int(np.prod(dims)) if dims else 1
    if len(data) != 4 * n:
        raise ManifestError(f"{where}: initializer {name!r} holds {len(data)} bytes, its "
                            f"shape {dims} needs {4 * n}")  # fmt: skip
    return name, np.frombuffer(data, dtype="<f4").reshape(dims).astype(np.float32)


def read_initializers(path: str | Path) -> dict[str, np.ndarray]:
    """The float32 initializers of the main graph of the ONNX file ``path``, by name;
    :class:`ManifestError` naming the file for a file that is not one."""
    p = Path(path)
    where = str(p)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{where}: cannot read: {exc}") from exc
    graphs = [v for num, wt, v in _fields(data, where) if num == 7 and wt == 2]
    if len(graphs) != 1:
        raise ManifestError(f"{where}: not an ONNX model (found {len(graphs)} graphs)")
    out: dict[str, np.ndarray] = {}
    for num, wt, v in _fields(graphs[0], where):  # type: ignore[arg-type]
        if num == 5 and wt == 2:
            name, arr = _tensor(v, where)  # type: ignore[arg-type]
            if arr is not None:
                out[name] = arr
    return out
