"""Reading the files a device is handed: ``.npy``/``.npz`` arrays and PNG/PGM images.

Every reader takes untrusted bytes and either returns arrays or raises one typed
error (``error``, :class:`~mobile_client.errors.InputError` unless the caller says
otherwise) naming the file and, where there is one, the key. Never unpickles.

* ``.npy`` and ``.npz``: numpy parses the header (magic, version, dict); the
  declared shape and dtype (plain numbers or bool only) must account for exactly the
  bytes the file (or zip member) holds, checked *before* anything is allocated, and
  at most :data:`MAX_BYTES`.
* images: Pillow (the ``[images]`` extra) decodes PNG and binary/plain PGM, 8-bit
  gray, palette, RGB, with or without alpha; given the model's input shape (C, H, W)
  an image is converted to C channels and resized to H x W, giving ``(1, C, H, W)``:
  always a batch of one, so an RGB image is never taken for three gray ones. The size
  is checked (at most :data:`MAX_PIXELS`) before the pixels are decoded.
"""

from __future__ import annotations

import io
import os
import struct
import tokenize
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import numpy as np

from mobile_client.batching import label_key
from mobile_client.errors import FMTLError, InputError

MAX_BYTES = 1 << 30  # one array read from a file: 1 GiB
MAX_PIXELS = 4096 * 4096
IMAGE_FORMATS = {".png": "PNG", ".pgm": "PPM", ".pnm": "PPM"}
INPUT_SUFFIXES = (".npy", ".npz", *IMAGE_FORMATS)
# what a damaged file or zip member makes numpy (its header parser tokenizes and
# literal_evals the header), zipfile and zlib raise
_READ_ERRORS = (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error, struct.error,
                NotImplementedError, RuntimeError, SyntaxError, tokenize.TokenError,
                RecursionError)  # fmt: skip


# ----------------------------------------------------------------------------- .npy / .npz
def _read_npy_stream(fp: IO[bytes], size: int) -> np.ndarray:
    """One ``.npy`` of ``size`` bytes from ``fp``; ValueError (plain) when malformed."""
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported")
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biuf":
        raise ValueError(f"dtype {dtype} is not supported (numbers or bool only)")
    if any(s < 0 for s in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    count = 1
    for s in shape:
        count *= s
    nbytes = count * dtype.itemsize
    header = fp.tell()
    if nbytes > MAX_BYTES:
        raise ValueError(f"shape {shape} of {dtype} is {nbytes} bytes, more than {MAX_BYTES}")
    if header + nbytes != size:
        raise ValueError(
            f"shape {shape} of {dtype} needs {nbytes} bytes of data, the file holds {size - header}"
        )
    data = fp.read(nbytes)
    if len(data) != nbytes:
        raise ValueError(f"truncated: {len(data)} of {nbytes} bytes of data")
    a = np.frombuffer(data, dtype=dtype, count=count)
    return a.reshape(shape, order="F" if fortran else "C").copy(order="C")


def read_npy_bytes(data: bytes, where: str, *, error: type[FMTLError] = InputError) -> np.ndarray:
    """The array in one serialised ``.npy`` (e.g. a Flower ``Array``'s bytes)."""
    try:
        return _read_npy_stream(io.BytesIO(data), len(data))
    except _READ_ERRORS as exc:
        raise error(f"{where}: not an .npy array ({len(data)} bytes): {exc}") from exc


def _file(path: str | os.PathLike[str], error: type[FMTLError]) -> Path:
    p = Path(path)
    if not p.is_file():
        raise error(f"{p}: no such file")
    return p


def read_npy(path: str | os.PathLike[str], *, error: type[FMTLError] = InputError) -> np.ndarray:
    """The array in a ``.npy`` file."""
    p = _file(path, error)
    try:
        with open(p, "rb") as f:
            return _read_npy_stream(f, os.fstat(f.fileno()).st_size)
    except _READ_ERRORS as exc:
        raise error(f"{p}: not a readable .npy file: {exc}") from exc


def npz_keys(path: str | os.PathLike[str], *, error: type[FMTLError] = InputError) -> list[str]:
    """The array names in a ``.npz`` file (its ``*.npy`` members, without the suffix)."""
    p = _file(path, error)
    try:
        with zipfile.ZipFile(p) as z:
            return [n.removesuffix(".npy") for n in z.namelist() if n.endswith(".npy")]
    except _READ_ERRORS as exc:
        raise error(f"{p}: not a readable .npz file: {exc}") from exc


def read_npz(
    path: str | os.PathLike[str],
    keys: Sequence[str] | None = None,
    *,
    error: type[FMTLError] = InputError,
) -> dict[str, np.ndarray]:
    """Arrays ``keys`` (default: all) of a ``.npz`` file; a missing key raises naming it."""
    p = _file(path, error)
    out: dict[str, np.ndarray] = {}
    key = ""
    try:
        with zipfile.ZipFile(p) as z:
            have = {n.removesuffix(".npy"): n for n in z.namelist() if n.endswith(".npy")}
            for key in have if keys is None else keys:
                if key not in have:
                    raise error(f"{p}: no key {key!r} (keys: {', '.join(have) or 'none'})")
                info = z.getinfo(have[key])
                if info.file_size > MAX_BYTES + 4096:
                    raise ValueError(f"{info.file_size} bytes, more than {MAX_BYTES}")
                with z.open(info) as f:
                    out[key] = _read_npy_stream(f, info.file_size)
    except FMTLError:
        raise
    except _READ_ERRORS as exc:
        where = f"key {key!r}: " if key else ""
        raise error(f"{p}: not a readable .npz file: {where}{exc}") from exc
    return out


def client_labels(
    arrays: Mapping[str, np.ndarray],
    tasks: Sequence[str],
    source: str | os.PathLike[str],
    *,
    test: bool = False,
    error: type[FMTLError] = InputError,
) -> dict[str, np.ndarray]:
    """The labels of ``tasks`` among the arrays of a client's data file ``source``
    (``label_key(task, test=test)`` each); a missing one raises ``error`` naming key and task."""
    require_labels(list(arrays), tasks, source, test=test, error=error)
    return {t: arrays[label_key(t, test=test)] for t in tasks}


def require_labels(
    keys: Sequence[str],
    tasks: Sequence[str],
    source: str | os.PathLike[str],
    *,
    test: bool = False,
    error: type[FMTLError] = InputError,
) -> None:
    """Raise ``error`` naming the key and task if a label key of ``tasks`` is not in ``keys``."""
    for t in tasks:
        k = label_key(t, test=test)
        if k not in keys:
            raise error(
                f"{source}: no key {k!r} for task {t!r} (keys: {', '.join(keys) or 'none'})"
            )


def read_client_data(
    path: str | os.PathLike[str], tasks: Sequence[str]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A client's training data file: ``x`` and one ``label_key(task)`` per task."""
    p = Path(path)
    have = npz_keys(p)
    if "x" not in have:
        raise InputError(f"{p}: no key 'x' (keys: {', '.join(have) or 'none'})")
    require_labels(have, tasks, p)  # names a missing key before reading any
    arrays = read_npz(p, ["x", *(label_key(t) for t in tasks)])
    return arrays["x"], client_labels(arrays, tasks, p)


# ----------------------------------------------------------------------------- images
IMAGE_MODES = ("L", "LA", "P", "RGB", "RGBA")  # 8-bit: gray, gray+alpha, palette, colour


def read_image(path: str | os.PathLike[str], shape: Sequence[int] | None = None) -> np.ndarray:
    """A PNG/PGM image -> a uint8 batch of one.

    ``shape`` ``(C, H, W)`` (the bundle's ``input_shape``, C 1 or 3): the image is
    converted to C channels (Pillow's ``L`` luma or ``RGB``; an alpha channel is
    composited over black, i.e. transparent pixels are 0) and resized to H x W
    (bilinear, aspect ratio not kept), giving ``(1, C, H, W)``. Without ``shape``: 8-bit
    grayscale gives ``(1, H, W)``, RGB ``(1, 3, H, W)``, as stored (other modes refused).
    """
    p = _file(path, InputError)
    fmt = IMAGE_FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise InputError(f"{p}: unknown image type {p.suffix!r} ({', '.join(IMAGE_FORMATS)})")
    if shape is not None and not (len(shape) == 3 and shape[0] in (1, 3)):
        raise InputError(f"{p}: an image, but the model's input shape is {list(shape)}, "
                         "not [C, H, W] with C 1 or 3")  # fmt: skip
    try:
        from PIL import Image
    except ImportError as exc:
        raise InputError(
            f"{p}: reading {p.suffix} images needs Pillow: pip install 'fmtl-lightning[images]'"
        ) from exc
    modes = IMAGE_MODES if shape is not None else ("L", "RGB")
    try:
        with Image.open(p, formats=[fmt]) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise InputError(f"{p}: image is {w}x{h} pixels, more than {MAX_PIXELS}")
            if im.mode not in modes:
                raise InputError(
                    f"{p}: image mode {im.mode!r}; supported: 8-bit {', '.join(modes)} "
                    "(grayscale, palette, RGB, with or without alpha): convert it first"
                )
            im.load()
            px = _to_model(im, shape) if shape is not None else np.asarray(im, dtype=np.uint8)
    except InputError:
        raise
    except (*_READ_ERRORS, Image.DecompressionBombError) as exc:
        raise InputError(f"{p}: not a readable {fmt} image: {exc}") from exc
    if shape is not None:
        return px[None]
    if px.shape[:2] != (h, w) or px.ndim not in (2, 3):
        raise InputError(f"{p}: decoded to shape {px.shape}, expected ({h}, {w}[, 3])")
    return px[None] if px.ndim == 2 else px.transpose(2, 0, 1)[None].copy()


def _to_model(im, shape: Sequence[int]) -> np.ndarray:  # im: PIL.Image.Image
    """A decoded image -> uint8 ``shape`` (C, H, W): channels, alpha over black, size."""
    from PIL import Image

    c, h, w = shape
    has_alpha = im.mode in ("LA", "RGBA") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)  # (H, W, 4)
        rgb = rgba[..., :3] * (rgba[..., 3:] / 255.0)  # over black
        im = Image.fromarray(np.rint(rgb).astype(np.uint8), "RGB")
    im = im.convert("L" if c == 1 else "RGB")
    if im.size != (w, h):
        im = im.resize((w, h), Image.Resampling.BILINEAR)
    px = np.asarray(im, dtype=np.uint8)
    return px[None].copy() if c == 1 else px.transpose(2, 0, 1).copy()


def read_inputs(
    path: str | os.PathLike[str], image_shape: Sequence[int] | None = None
) -> np.ndarray:
    """One input file -> an array: uint8 pixels or float32 normalised inputs.

    ``.npy``: the array; ``.npz``: its key ``x``; an image: a batch of one, converted
    and resized to ``image_shape`` (C, H, W) when given (:func:`read_image`).
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such input file")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        return read_npy(p)
    if suffix == ".npz":
        return read_npz(p, ["x"])["x"]
    if suffix in IMAGE_FORMATS:
        return read_image(p, image_shape)
    raise InputError(f"{p}: unknown input type {suffix!r} ({', '.join(INPUT_SUFFIXES)})")
