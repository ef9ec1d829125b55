"""The web edge client's modules under Node.js (no browser): batch order, float repr,
state hash and safetensors files equal numpy's / Python's, and ``cli.mjs train`` (the
same module on onnxruntime-web's WebAssembly build in Node) writes the Python edge
client's update."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from browser_helpers import TASKS, missing

from mobile_client.batching import batch_order, label_key
from mobile_client.safetensors_np import load_file
from mobile_client.update import UpdateMeta, read_update, state_hash, write_update
from mobile_client.web.serve import ORT_DIST, WEB_DIR
from tests.mobile_client.edge_helpers import digits

NODE_PRELUDE = """
import { batchOrder } from "./rng.js";
import { pyFloatRepr, pyJsonFloats, serializeSafetensors, stateHash } from "./arrays.js";
const args = JSON.parse(process.argv[1]);
"""


def node(script: str, args: object, timeout: float = 60) -> object:
    """Run an ES-module ``script`` in mobile_client/web with JSON ``args``; its JSON output."""
    exe = shutil.which("node")
    if exe is None:
        missing("Node.js (apt-get install nodejs)")
    p = subprocess.run(
        [exe, "--input-type=module", "-e", NODE_PRELUDE + script, json.dumps(args)],
        cwd=WEB_DIR, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_batch_order_equals_numpy() -> None:
    cases = [(40, 16, 1, 3, 1), (10, 3, 2, None, 0), (1, 1, 1, 2, 5), (257, 32, 1, 20, 123456789),
             (5, 5, 3, None, 2**40 + 7), (70_000, 4096, 1, 2, 3)]  # fmt: skip
    got = node("console.log(JSON.stringify(args.map((c) => batchOrder(...c))));", cases)
    for c, g in zip(cases, got, strict=True):
        assert g == [b.tolist() for b in batch_order(*c)], c


def test_float_repr_and_metrics_json_equal_python() -> None:
    xs = [1.0, 0.5, 0.25, 0.125, 1 / 3, 0.1, 1e-5, 0.0001, 2.5e-7, 123456.0, 1e16, 3.0517578125e-05,
          float(np.float32(0.1)), -0.0, 1e22, 12345678901234567.0]  # fmt: skip
    got = node(
        "console.log(JSON.stringify([args.map(pyFloatRepr), pyJsonFloats({steps: 3, loss: args[4]})]));",
        xs,
    )
    assert got[0] == [repr(x) for x in xs]
    assert got[1] == json.dumps({"steps": 3.0, "loss": xs[4]})


def test_state_hash_and_safetensors_file_equal_python(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "b.weight": rng.normal(size=(3, 4)).astype(np.float32),
        "a.bias": rng.normal(size=(5,)).astype(np.float32),
        "n": np.array(7, dtype=np.int64),
        "m.counts": np.arange(3, dtype=np.int64),
    }
    spec = {k: {"dtype": str(v.dtype), "shape": list(v.shape), "data": v.ravel().tolist()}
            for k, v in arrays.items()}  # fmt: skip
    meta = {"format": "fmtl-update", "client_id": "c00"}
    script = """
const mk = (a) => ({ dtype: a.dtype, shape: a.shape,
  data: a.dtype === "int64" ? BigInt64Array.from(a.data, BigInt) : Float32Array.from(a.data) });
const arrays = Object.fromEntries(Object.entries(args.arrays).map(([k, a]) => [k, mk(a)]));
const bytes = serializeSafetensors(arrays, args.meta);
console.log(JSON.stringify({ hash: await stateHash(arrays), file: Buffer.from(bytes).toString("base64") }));
"""
    got = node(script, {"arrays": spec, "meta": meta})
    assert got["hash"] == state_hash(arrays)
    path = tmp_path / "js.safetensors"
    path.write_bytes(__import__("base64").b64decode(got["file"]))
    back, md = load_file(path)
    assert md == meta and back.keys() == arrays.keys()
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v)
    py = tmp_path / "py.safetensors"
    from mobile_client.safetensors_np import save_file

    save_file(arrays, py, meta)
    # the same layout as the safetensors package's: header (but for metadata order) and data
    n_js = int.from_bytes(path.read_bytes()[:8], "little")
    n_py = int.from_bytes(py.read_bytes()[:8], "little")
    h_js, h_py = (
        json.loads(path.read_bytes()[8 : 8 + n_js]),
        json.loads(py.read_bytes()[8 : 8 + n_py]),
    )
    assert list(h_js) == list(h_py) and h_js == h_py
    assert path.read_bytes()[8 + n_js :] == py.read_bytes()[8 + n_py :]


def test_node_cli_trains_like_the_python_edge_client(exported, tmp_path: Path) -> None:
    from mobile_client.runtime import EdgeClient

    exe = shutil.which("node")
    if exe is None:
        missing("Node.js (apt-get install nodejs)")
    if not (ORT_DIST / "ort.wasm.min.mjs").is_file():
        missing(f"onnxruntime-web in {ORT_DIST} (cd mobile_client/web && npm ci)")
    _, bundle = exported
    px, _, ys = digits(20, TASKS, "train")
    data = tmp_path / "local.npz"
    np.savez(data, x=px, **{label_key(t): y for t, y in ys.items()})  # type: ignore[arg-type]
    ec = EdgeClient(bundle)
    start = {k: ec.base_state()[k] * np.float32(1.1) if ec.base_state()[k].dtype == np.float32
             else ec.base_state()[k] for k in ec.shared_keys}  # fmt: skip
    glob = tmp_path / "global.safetensors"
    write_update(glob, start, UpdateMeta("server", 5, 0.5, 1, state_hash(start), {}))
    out = tmp_path / "update.safetensors"
    cmd = [exe, str(WEB_DIR / "cli.mjs"), "train", str(bundle), "--data", str(data), "--steps", "3",
           "--batch-size", "8", "--lr", "0.1", "--seed", "2", "--start-from", str(glob), "--out", str(out)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"wrote {out} (") and "20 examples" in p.stdout

    res = ec.train(px, ys, batch_size=8, steps=3, lr=0.1, seed=2, start_from=start)
    shared, meta = read_update(out, expected_base_hash=state_hash(start))
    kept, _ = load_file(tmp_path / "update.local.safetensors")
    assert (meta.client_id, meta.round, meta.width, meta.num_examples) == ("c00", 5, 0.5, 20)
    got = {**shared, **kept}
    assert got.keys() == res.state.keys()
    for k, want in res.state.items():
        np.testing.assert_allclose(got[k], want, rtol=0, atol=1e-5, err_msg=k)

    bad = subprocess.run(cmd[:5] + [str(tmp_path / "nope.npz")], capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert bad.returncode == 2
    assert (
        bad.stderr.strip() == f"fmtl-edge-web: error: --data {tmp_path / 'nope.npz'}: no such file"
    )


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_node_reads_npz_like_numpy(tmp_path: Path, dtype: str) -> None:
    """np.savez and np.savez_compressed (stored / deflated zip members, zip64 headers)."""
    rng = np.random.default_rng(1)
    x = (rng.random((3, 2, 5)) * 255).astype(dtype)
    y = np.arange(6, dtype=np.int64).reshape(2, 3)
    out = {}
    for name, save in (("plain", np.savez), ("compressed", np.savez_compressed)):
        save(tmp_path / f"{name}.npz", x=x, y=y)  # type: ignore[operator]
        out[name] = str(tmp_path / f"{name}.npz")
    script = """
import { readNpz } from "./arrays.js";
import { readFileSync } from "node:fs";
const res = {};
for (const [name, p] of Object.entries(args)) {
  const a = await readNpz(readFileSync(p), ["x", "y"], p);
  res[name] = Object.fromEntries(Object.entries(a).map(([k, v]) =>
    [k, { dtype: v.dtype, shape: v.shape, data: Array.from(v.data, Number) }]));
}
console.log(JSON.stringify(res));
"""
    got = node(script, out)
    for name in out:
        for k, want in (("x", x), ("y", y)):
            g = got[name][k]
            assert g["dtype"] == str(want.dtype) and g["shape"] == list(want.shape)
            assert np.array_equal(np.asarray(g["data"]).reshape(want.shape), want)
