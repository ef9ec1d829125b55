"""Wire formats of the edge runtime: safetensors (through the package), batch order, updates."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as stn
from safetensors import safe_open

from mobile_client import safetensors_np as snp
from mobile_client.batching import batch_order, num_batches
from mobile_client.errors import SafetensorsError, UpdateError
from mobile_client.update import UpdateMeta, read_update, state_hash, write_update


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for d in ["f8", "f4", "f2", "i8", "i4", "i2", "i1", "u8", "u4", "u2", "u1", "bool"]:
        out[f"t_{d}"] = (rng.standard_normal((2, 3)) * 9).astype(d)
    out["empty"] = np.zeros((0, 4), np.float32)
    out["scalar"] = np.array(3.5, np.float32)
    out["backbone.layers.1.weight"] = rng.standard_normal((16, 64)).astype(np.float32)
    return out


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k])


# ----------------------------------------------------------------------------- safetensors
@pytest.mark.parametrize("metadata", [None, {"round": "3"}])
def test_safetensors_bytes_identical_to_package(tmp_path: Path, metadata) -> None:
    """Byte-identical (the package orders several metadata entries at random)."""
    arrs = _arrays()
    assert snp.serialize(arrs, metadata) == stn.save(arrs, metadata=metadata)
    snp.save_file(arrs, tmp_path / "ours.safetensors", metadata)
    stn.save_file(arrs, str(tmp_path / "theirs.safetensors"), metadata=metadata)
    assert (tmp_path / "ours.safetensors").read_bytes() == (
        tmp_path / "theirs.safetensors"
    ).read_bytes()


def test_safetensors_both_directions(tmp_path: Path) -> None:
    arrs = _arrays()
    stn.save_file(arrs, str(tmp_path / "theirs.safetensors"), metadata={"a": "1"})
    got, md = snp.load_file(tmp_path / "theirs.safetensors")
    _same(got, arrs)
    assert md == {"a": "1"}
    assert got["t_f4"].flags.writeable
    snp.save_file(arrs, tmp_path / "ours.safetensors", {"b": "2"})
    _same(stn.load_file(str(tmp_path / "ours.safetensors")), arrs)
    with safe_open(str(tmp_path / "ours.safetensors"), "np") as f:
        assert f.metadata() == {"b": "2"}


def _file(tmp_path: Path, header: dict, body: bytes) -> Path:
    h = json.dumps(header).encode()
    p = tmp_path / "bad.safetensors"
    p.write_bytes(len(h).to_bytes(8, "little") + h + body)
    return p


def test_safetensors_malformed(tmp_path: Path) -> None:
    """The safetensors package parses; every refusal is one SafetensorsError naming the file."""
    body = np.arange(4, dtype=np.float32).tobytes()
    ok = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    for header, data, pattern in [
        ({"w": {**ok["w"], "dtype": "Q7"}}, body, r"unknown variant `Q7`"),
        ({"w": {**ok["w"], "dtype": "BF16", "shape": [8]}}, body, r"key 'w' has dtype BF16"),
        ({"w": {**ok["w"], "data_offsets": [0, 32]}}, body, r"invalid shape, data type, or offset"),
        ({"w": {**ok["w"], "shape": [3]}}, body, r"invalid shape, data type, or offset"),
        ({"w": {**ok["w"], "shape": [-1]}}, body, r"invalid value: integer `-1`"),
        (ok, body + b"xx", "file not fully covered"),
        ({"__metadata__": {"a": 1}, **ok}, body, "expected a string"),
    ]:
        p = _file(tmp_path, header, data)
        with pytest.raises(SafetensorsError, match=pattern) as e:
            snp.load_file(p)
        assert str(p) in str(e.value)
    p = tmp_path / "bad.safetensors"
    p.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(SafetensorsError, match="invalid header length"):
        snp.load_file(p)
    p.write_bytes((2).to_bytes(8, "little") + b"{x")
    with pytest.raises(SafetensorsError, match="invalid JSON"):
        snp.load_file(p)
    with pytest.raises(SafetensorsError, match="key 'c' has unsupported dtype complex64"):
        snp.save_file({"c": np.zeros(2, np.complex64)}, tmp_path / "c.safetensors")


def test_safetensors_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "w.safetensors"
    snp.save_file({"a": np.ones(3, np.float32)}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        snp.save_file({"a": np.zeros(3, np.float32)}, tmp_path / "new.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no target, no temp


# ----------------------------------------------------------------------------- batching
def test_batch_order_epochs() -> None:
    got = list(batch_order(10, 4, epochs=2, seed=3))
    rng = np.random.default_rng(3)
    p1, p2 = rng.permutation(10), rng.permutation(10)
    want = [p1[0:4], p1[4:8], p1[8:10], p2[0:4], p2[4:8], p2[8:10]]
    assert len(got) == 6 == num_batches(10, 4, 2)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.int64
        np.testing.assert_array_equal(g, w)


def test_batch_order_steps_reshuffles() -> None:
    got = list(batch_order(5, 2, epochs=1, steps=4, seed=0))
    rng = np.random.default_rng(0)
    p1, p2 = rng.permutation(5), rng.permutation(5)
    assert [g.tolist() for g in got] == [
        p1[0:2].tolist(), p1[2:4].tolist(), p1[4:5].tolist(), p2[0:2].tolist()
    ]  # fmt: skip
    assert list(batch_order(5, 2, steps=0)) == []
    with pytest.raises(ValueError, match="batch_size must be > 0, got 0"):
        list(batch_order(5, 0))


# ----------------------------------------------------------------------------- updates
def _meta(**kw) -> UpdateMeta:
    base = {"client_id": "c01", "round": 4, "width": 0.5, "num_examples": 40,
            "base_hash": "ab" * 32, "metrics": {"loss": 0.25}}  # fmt: skip
    return UpdateMeta(**{**base, **kw})


def test_state_hash() -> None:
    a = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.zeros(2, np.int64)}
    h = state_hash(a)
    assert h == state_hash(dict(reversed(list(a.items()))))
    assert h != state_hash({**a, "x": a["x"].reshape(3, 2)})
    assert h != state_hash({**a, "y": a["y"].astype(np.int32)})
    assert h != state_hash({**a, "x": a["x"] + 1})
    assert len(h) == 64 and h == state_hash({k: v.copy() for k, v in a.items()})


def test_update_round_trip_with_package(tmp_path: Path) -> None:
    arrs = {"backbone.w": np.ones((4, 2), np.float32), "backbone.n": np.array(3, np.int64)}
    p = write_update(tmp_path / "u.safetensors", arrs, _meta())
    assert [q.name for q in tmp_path.iterdir()] == ["u.safetensors"]
    got, meta = read_update(p, expected_base_hash="ab" * 32)
    _same(got, arrs)
    assert meta == _meta()
    _same(stn.load_file(str(p)), arrs)
    with safe_open(str(p), "np") as f:
        md = f.metadata()
    assert md["client_id"] == "c01" and md["round"] == "4" and md["num_examples"] == "40"
    assert json.loads(md["metrics"]) == {"loss": 0.25}
    # a file written by the package reads back as an update
    stn.save_file(arrs, str(tmp_path / "pkg.safetensors"), metadata=_meta().to_strings())
    assert read_update(tmp_path / "pkg.safetensors")[1] == _meta()


def test_update_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrs = {"backbone.w": np.ones(2, np.float32)}
    p = write_update(tmp_path / "u.safetensors", arrs, _meta())
    with pytest.raises(UpdateError, match="'base_hash' is abab.*expected 0000") as e:
        read_update(p, expected_base_hash="0" * 64)
    assert str(p) in str(e.value)
    with pytest.raises(UpdateError, match="key 'backbone.w' has 1 NaN/Inf"):
        write_update(
            tmp_path / "n.safetensors", {"backbone.w": np.array([1, np.nan], "f4")}, _meta()
        )
    with pytest.raises(UpdateError, match="key 'b' has dtype float64"):
        write_update(tmp_path / "d.safetensors", {"b": np.ones(2)}, _meta())
    md = _meta().to_strings()
    for drop, pattern in [("round", "'round' is missing"), ("metrics", "'metrics' is missing")]:
        q = tmp_path / f"no_{drop}.safetensors"
        stn.save_file(arrs, str(q), metadata={k: v for k, v in md.items() if k != drop})
        with pytest.raises(UpdateError, match=pattern):
            read_update(q)
    q = tmp_path / "typed.safetensors"
    stn.save_file(arrs, str(q), metadata={**md, "num_examples": "many"})
    with pytest.raises(UpdateError, match="'num_examples' is malformed: 'many'"):
        read_update(q)
    stn.save_file({"w": np.ones(2, np.int32)}, str(q), metadata=md)
    with pytest.raises(UpdateError, match="key 'w' has dtype int32"):
        read_update(q)
    q.write_bytes(b"garbage")
    with pytest.raises(UpdateError, match="not a readable update.*header too small"):
        read_update(q)
    # a failed replace leaves neither the target nor a temp file
    monkeypatch.setattr(os, "replace", lambda s, d: (_ for _ in ()).throw(OSError("boom")))
    before = sorted(x.name for x in tmp_path.iterdir())
    with pytest.raises(OSError, match="boom"):
        write_update(tmp_path / "late.safetensors", arrs, _meta())
    assert sorted(x.name for x in tmp_path.iterdir()) == before
