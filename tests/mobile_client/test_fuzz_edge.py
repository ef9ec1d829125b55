"""Hypothesis fuzzing of everything a device reads from outside: update files, the bundle's
manifest (and the weights it points to), and ``fmtl-edge``'s input files (.npy, .npz, PNG,
PGM, the ``--data`` file). Each input either works or raises the project's typed error
(:class:`FMTLError`), never another exception, and the files read stay byte-identical."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mobile_client.cli import main
from mobile_client.errors import FMTLError, ManifestError, UpdateError
from mobile_client.inputs import read_client_data, read_inputs
from mobile_client.manifest import load_manifest
from mobile_client.runtime import EdgeClient
from mobile_client.update import UpdateMeta, read_update, write_update

FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,  # the same examples on every run: make test stays reproducible
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with 1-4 edits: a byte set, a cut, an insertion, a deletion."""
    b = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "cut", "insert", "delete"]))
        i = draw(st.integers(0, len(b)))
        if op == "set" and i < len(b):
            b[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del b[i:]
        elif op == "insert":
            b[i:i] = draw(st.binary(max_size=16))
        elif op == "delete":
            del b[i : i + draw(st.integers(1, 16))]
    return bytes(b)


def _digest(paths: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


def _works_or_typed(fn, *args: Any, **kw: Any) -> Any:
    try:
        return fn(*args, **kw)
    except FMTLError as exc:
        assert str(exc), "a typed error says what is wrong"
        return exc


# ----------------------------------------------------------------------------- updates
ARRAYS = {
    "backbone.w": np.arange(6, dtype=np.float32).reshape(2, 3),
    "backbone.n": np.array(4, dtype=np.int64),
}
META = UpdateMeta("c00", 3, 0.5, 12, "ab" * 32, {"loss": 0.5})


@pytest.fixture(scope="module")
def update_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    p = tmp_path_factory.mktemp("upd") / "u.safetensors"
    write_update(p, ARRAYS, META)
    return p.read_bytes()


def _read_update_file(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    before = _digest([path])
    got = _works_or_typed(read_update, path)
    assert _digest([path]) == before
    if not isinstance(got, FMTLError):
        arrays, meta = got
        assert all(a.dtype in (np.float32, np.int64) for a in arrays.values())
        assert all(np.isfinite(a).all() for a in arrays.values())
        assert meta.num_examples > 0 and meta.round >= 0 and 0 < meta.width <= 1
    else:
        assert isinstance(got, UpdateError), type(got)


def test_update_reader_mutated_bytes(update_bytes: bytes, tmp_path_factory) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "u.safetensors"

    @FUZZ
    @given(mutated(update_bytes))
    def check(data: bytes) -> None:
        _read_update_file(path, data)

    check()


_VALID_META = META.to_strings()
_META_VALUES = {
    "format": st.sampled_from(["fmtl-update", "other", ""]),
    "format_version": st.sampled_from(["1", "2", "x", "1.0", " 1", "-1"]),
    "client_id": st.text(max_size=8),
    "round": st.one_of(st.integers(-5, 10**30).map(str), st.text(max_size=6)),
    "width": st.one_of(st.floats(allow_nan=True).map(repr), st.sampled_from(["nan", "inf", "0"])),
    "num_examples": st.one_of(st.integers(-(2**70), 2**70).map(str), st.just("1e3")),
    "base_hash": st.text(max_size=8),
    "metrics": st.one_of(
        st.dictionaries(st.text(max_size=4), st.floats() | st.integers() | st.booleans()).map(
            lambda d: json.dumps(d, allow_nan=True)
        ),
        st.sampled_from(["[]", "{", "null", '{"a": "b"}', "[" * 5000]),
    ),
}
_CODES = {"F32": np.float32, "I64": np.int64, "F16": np.float16, "I32": np.int32, "F64": np.float64}


@st.composite
def update_files(draw: st.DrawFn) -> bytes:
    """A safetensors update with up to two metadata fields fuzzed or missing, and tensors
    that are well-formed (any dtype, values incl. NaN/huge) or have fuzzed entries."""
    meta = dict(_VALID_META)
    for k in draw(st.sets(st.sampled_from(list(_META_VALUES)), max_size=2)):  # fields to break
        if draw(st.booleans()):
            meta[k] = draw(_META_VALUES[k])
        else:
            del meta[k]
    header: dict[str, Any] = {"__metadata__": meta}
    chunks, offset = [], 0
    for i in range(draw(st.integers(0, 3))):
        code = draw(st.sampled_from(list(_CODES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        n = int(np.prod(shape, dtype=np.int64))
        vals = draw(st.lists(st.floats(width=16) | st.integers(-5, 5), min_size=n, max_size=n))
        with np.errstate(all="ignore"):
            raw = np.asarray(vals, dtype=np.float64).astype(_CODES[code]).tobytes()
        offs = [offset, offset + len(raw)]
        if draw(st.integers(0, 5)) == 0:  # a fuzzed entry
            shape = draw(st.lists(st.integers(-1, 2**40), max_size=3))
            offs = [offset, offset + draw(st.integers(-4, 64))]
            code = draw(st.sampled_from([code, "BF16", "BOOL", "Q7"]))
        header[f"backbone.k{i}"] = {"dtype": code, "shape": shape, "data_offsets": offs}
        chunks.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h + b"".join(chunks)


def test_update_reader_structured(tmp_path_factory) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "u.safetensors"

    @FUZZ
    @given(update_files())
    def check(data: bytes) -> None:
        _read_update_file(path, data)

    check()


# ----------------------------------------------------------------------------- manifest
def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def manifest_edits(draw: st.DrawFn, base: dict, paths: list[tuple]) -> dict:
    m = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        if not path:
            continue
        parent = m
        try:
            for p in path[:-1]:
                parent = parent[p]
            op = draw(st.sampled_from(["replace", "delete", "similar"]))
            if op == "delete":
                del parent[path[-1]]
            elif op == "similar":  # a value of the same type: a near-miss, not garbage
                old = parent[path[-1]]
                if isinstance(old, str):
                    parent[path[-1]] = draw(
                        st.sampled_from(["", "c01", "backbone.x", "../x", old + "x"])
                    )
                elif isinstance(old, (int, float)) and not isinstance(old, bool):
                    parent[path[-1]] = draw(st.sampled_from([0, -1, 0.5, 2, 10**9, old + 1, -old]))
                elif isinstance(old, list):
                    parent[path[-1]] = old[:-1] if old and draw(st.booleans()) else old + old[:1]
            else:
                parent[path[-1]] = draw(JSON_VALUES)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier edit removed the way there
    return m


@pytest.fixture(scope="module")
def bundle_copy(mlp_export, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzzb") / "bundle"
    shutil.copytree(mlp_export[1], out)
    return out


def _load_bundle(b: Path, text: bytes) -> None:
    (b / "manifest.json").write_bytes(text)
    files = sorted(p for p in b.iterdir())
    before = _digest(files)
    m = _works_or_typed(load_manifest, b)
    if not isinstance(m, FMTLError):
        for c in m.clients:  # every client predicts and trains a step, or a typed error
            ec = _works_or_typed(EdgeClient, b, c.client)
            if not isinstance(ec, FMTLError):
                _works_or_typed(_predict_and_train, ec)
    else:
        assert isinstance(m, ManifestError), type(m)
    assert _digest(files) == before


def _predict_and_train(ec: EdgeClient) -> None:
    x = (np.arange(3 * 64, dtype=np.uint8) % 200).reshape(3, 8, 8)
    ys = {}
    for t in ec.entry.tasks:
        logits = ec.predict(t, x)
        head = ec.head(t)
        assert logits.shape == (3, len(head.labels)) and np.isfinite(logits).all()
        ys[t] = np.zeros(3, np.int64) if head.kind == "multiclass" else np.zeros((3, len(head.labels)), np.float32)  # fmt: skip
    res = ec.train(x, ys, batch_size=2, steps=1)
    assert set(res.shared) == set(ec.shared_keys) and res.num_examples == 3


def test_manifest_loader_mutated_fields(bundle_copy: Path) -> None:
    base = json.loads((bundle_copy / "manifest.json").read_text())
    paths = _paths(base)

    @FUZZ
    @given(manifest_edits(base, paths))
    def check(m: dict) -> None:
        _load_bundle(bundle_copy, json.dumps(m, allow_nan=True).encode())

    check()


def test_manifest_loader_mutated_bytes(bundle_copy: Path) -> None:
    base = (bundle_copy / "manifest.json").read_bytes()

    @FUZZ
    @given(mutated(base) | st.sampled_from([b"[" * 100_000, b"{}", b"null", b"\xff\xfe"]))
    def check(text: bytes) -> None:
        _load_bundle(bundle_copy, text)

    check()


# ----------------------------------------------------------------------------- input files
def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays) if len(arrays) > 1 else np.savez(buf, **arrays)
    return buf.getvalue()


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


PX = (np.arange(64, dtype=np.uint8) * 4).reshape(8, 8)
VALID_FILES = {
    ".npy": _npy(PX.astype(np.float32)[None]),
    ".npz": _npz(x=PX[None]),
    ".png": _png(PX),
    ".pgm": b"P5\n8 8\n255\n" + PX.tobytes(),
}


@st.composite
def npy_headers(draw: st.DrawFn) -> bytes:
    """A .npy whose header dict is fuzzed (dtype, shape, order) and whose body is random."""
    descr = draw(st.sampled_from(["'<f4'", "'|u1'", "'<i8'", "'|O'", "'<c8'", "'>f4'", "'V8'",
                                  "'<U3'", "[('a', '<f4')]", "'<f2'", "'?'", "7", "'x'"]))  # fmt: skip
    shape = draw(st.lists(st.integers(0, 4) | st.integers(-2, 2**33), max_size=4))
    d = f"{{'descr': {descr}, 'fortran_order': {draw(st.booleans())}, 'shape': {tuple(shape)}, }}"
    d += " " * (-(len(d) + 11) % 64) + "\n"
    version = draw(st.sampled_from([b"\x01\x00", b"\x02\x00", b"\x03\x00", b"\x09\x00"]))
    n = len(d).to_bytes(2 if version == b"\x01\x00" else 4, "little")
    head = b"\x93NUMPY" + version + n + d.encode("latin1")
    size = 1
    for x in shape:
        size *= x
    if 0 <= size <= 64 and draw(st.booleans()):  # a body of the declared size, often
        return head + bytes(size * draw(st.sampled_from([1, 2, 4, 8])))
    return head + draw(st.binary(max_size=96))


def _read_input(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    before = _digest([path])
    got = _works_or_typed(read_inputs, path)
    if not isinstance(got, FMTLError):
        assert isinstance(got, np.ndarray) and got.dtype.kind in "biuf"
    assert _digest([path]) == before


@pytest.mark.parametrize("suffix", list(VALID_FILES))
def test_input_readers_mutated(tmp_path_factory, suffix: str) -> None:
    path = tmp_path_factory.mktemp("fuzz") / f"input{suffix}"
    base = VALID_FILES[suffix]
    _read_input(path, base)
    assert read_inputs(path).size == 64  # the unmutated file reads

    @FUZZ
    @given(mutated(base) | st.binary(max_size=64))
    def check(data: bytes) -> None:
        _read_input(path, data)

    check()


def test_npy_reader_fuzzed_headers(tmp_path_factory) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "x.npy"

    @FUZZ
    @given(npy_headers())
    def check(data: bytes) -> None:
        _read_input(path, data)

    check()


def test_data_file_reader_mutated(tmp_path_factory) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "local.npz"
    base = _npz(x=PX[None].repeat(3, 0), y__digits__digit=np.arange(3, dtype=np.int64))
    path.write_bytes(base)
    assert read_client_data(path, ["digits/digit"])[0].shape == (3, 8, 8)

    @FUZZ
    @given(mutated(base) | st.binary(max_size=64))
    def check(data: bytes) -> None:
        path.write_bytes(data)
        before = _digest([path])
        got = _works_or_typed(read_client_data, path, ["digits/digit"])
        if not isinstance(got, FMTLError):
            x, ys = got
            assert isinstance(x, np.ndarray) and set(ys) == {"digits/digit"}
        assert _digest([path]) == before

    check()


def test_predict_cli_on_mutated_inputs(mlp_export, tmp_path_factory, capsys) -> None:
    """The whole ``fmtl-edge predict`` path: exit 0 with one line per input, or exit 2 with
    one error line; never a traceback."""
    bundle = mlp_export[1]
    d = tmp_path_factory.mktemp("fuzz")

    @settings(FUZZ, max_examples=40)
    @given(st.sampled_from(list(VALID_FILES)), st.data())
    def check(suffix: str, data: st.DataObject) -> None:
        path = d / f"in{suffix}"
        path.write_bytes(data.draw(mutated(VALID_FILES[suffix])))
        capsys.readouterr()
        code = main(
            ["predict", str(bundle), "--client", "c00", "--task", "digits/digit", str(path)]
        )
        cap = capsys.readouterr()
        if code == 0:
            assert cap.out.count("\n") >= 1 and cap.err == ""
        else:
            assert code == 2 and cap.out == "" and cap.err.startswith("fmtl-edge: error: ")
            assert cap.err.count("\n") == 1

    check()
