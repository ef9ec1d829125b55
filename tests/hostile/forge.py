"""Byte-level writers of the file formats the sweep attacks, independent of the project's own.

The project's writers refuse to write what is invalid (NaN arrays, unknown dtypes,
lying headers); a hostile sender has no such scruples, so the sweep builds its files
here, from the format specifications: safetensors (8-byte header length, JSON header,
raw little-endian data), ``.npy``/``.npz`` (numpy's format module, or a hand-made
header), PNG (chunks with CRCs, zlib data) and binary PGM.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

# safetensors dtype codes of the numpy dtypes (BF16/F8 have no numpy dtype: raw bytes)
ST_CODES = {
    "<f8": "F64",
    "<f4": "F32",
    "<f2": "F16",
    "<i8": "I64",
    "<i4": "I32",
    "<i2": "I16",
    "|i1": "I8",
    "<u8": "U64",
    "<u4": "U32",
    "<u2": "U16",
    "|u1": "U8",
    "|b1": "BOOL",
}


def st_code(a: np.ndarray) -> str:
    return ST_CODES[np.dtype(a.dtype).newbyteorder("<").str]


def st_header(
    arrays: Mapping[str, np.ndarray], metadata: Mapping[str, Any] | None
) -> tuple[dict[str, Any], list[bytes]]:
    """Header dict and data chunks of a well-formed file (arrays in the given order)."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    chunks, off = [], 0
    for k, a in arrays.items():
        b = np.ascontiguousarray(a, dtype=np.dtype(a.dtype).newbyteorder("<")).tobytes()
        header[k] = {
            "dtype": st_code(a),
            "shape": list(a.shape),
            "data_offsets": [off, off + len(b)],
        }
        chunks.append(b)
        off += len(b)
    return header, chunks


def st_bytes(
    header: Any, data: bytes, *, header_text: str | None = None, pad: bool = True
) -> bytes:
    """``len(header) (u64 LE) + header JSON (space-padded to 8) + data``."""
    h = (header_text if header_text is not None else json.dumps(header)).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h + data


def safetensors(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, Any] | None) -> bytes:
    header, chunks = st_header(arrays, metadata)
    return st_bytes(header, b"".join(chunks))


def st_split(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """(header dict, data bytes) of a well-formed file written by :func:`safetensors`."""
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


# ----------------------------------------------------------------------------- numpy files
def npy(a: np.ndarray, *, fortran: bool = False, version: tuple[int, int] | None = None) -> bytes:
    buf = io.BytesIO()
    arr = np.asfortranarray(a) if fortran else a
    np.lib.format.write_array(buf, arr, version=version, allow_pickle=True)
    return buf.getvalue()


def npy_forged(
    descr: str,
    shape: tuple[int, ...] | str,
    data: bytes,
    *,
    fortran: bool = False,
    magic: bytes = b"\x93NUMPY\x01\x00",
) -> bytes:
    """A v1.0 ``.npy`` whose header says whatever it is told (shape may be any text)."""
    shape_txt = shape if isinstance(shape, str) else repr(tuple(shape))
    h = f"{{'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {shape_txt}, }}"
    h += " " * (-(len(magic) + 2 + len(h) + 1) % 64) + "\n"
    return magic + struct.pack("<H", len(h)) + h.encode("latin1") + data


def npz(arrays: Mapping[str, np.ndarray | bytes]) -> bytes:
    """A zip of ``name.npy`` members; a ``bytes`` value is stored as the member verbatim."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        for k, v in arrays.items():
            z.writestr(f"{k}.npy", v if isinstance(v, bytes) else npy(v))
    return buf.getvalue()


# ----------------------------------------------------------------------------- images
def png_chunk(ctype: bytes, body: bytes, *, crc_ok: bool = True) -> bytes:
    crc = zlib.crc32(ctype + body) ^ (0 if crc_ok else 0xFFFF)
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", crc & 0xFFFFFFFF)


def png(
    px: np.ndarray,
    *,
    depth: int = 8,
    color: int = 0,
    interlace: int = 0,
    filt: int = 0,
    ihdr_wh: tuple[int, int] | None = None,
    crc_ok: bool = True,
    raw: bytes | None = None,
    chunks_after: bytes = b"",
) -> bytes:
    """A PNG of uint8 ``px`` (H, W) or (H, W, C), each row with filter type ``filt``
    (0 none, 1 sub, 2 up: encoded for real); ``ihdr_wh``/``raw`` forge the header/data."""
    h, w = px.shape[:2]
    rows = px.reshape(h, -1).astype(np.int32)
    bpp = 1 if px.ndim == 2 else px.shape[2]
    lines = []
    for r in range(h):
        line = rows[r]
        if filt == 1:
            enc = (line - np.concatenate([np.zeros(bpp, np.int32), line[:-bpp]])) & 0xFF
        elif filt == 2:
            enc = (line - (rows[r - 1] if r else 0)) & 0xFF
        else:
            enc = line
        lines.append(bytes([filt]) + enc.astype(np.uint8).tobytes())
    data = zlib.compress(b"".join(lines)) if raw is None else raw
    W, H = ihdr_wh or (w, h)
    ihdr = struct.pack(">IIBBBBB", W, H, depth, color, 0, 0, interlace)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr, crc_ok=crc_ok)
        + png_chunk(b"IDAT", data)
        + chunks_after
        + png_chunk(b"IEND", b"")
    )


def pgm(px: np.ndarray, *, header: bytes | None = None) -> bytes:
    h, w = px.shape
    return (header if header is not None else f"P5\n{w} {h}\n255\n".encode()) + px.tobytes()
