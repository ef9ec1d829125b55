"""EdgeClient on a real tiny run (digits, MLP [16, 8]): predictions and SGD steps equal torch,
the CLI works, errors are typed, and the edge path runs with torch unimportable."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from edge_helpers import client_model, digits, torch_sgd

from mobile_client.batching import batch_order
from mobile_client.cli import main, memory_estimate
from mobile_client.errors import InputError, ManifestError, UpdateError
from mobile_client.manifest import load_manifest
from mobile_client.runtime import EdgeClient
from mobile_client.safetensors_np import load_file, save_file
from mobile_client.update import read_update, state_hash

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exported(mlp_export: tuple[Path, Path]) -> tuple[Path, Path]:
    return mlp_export


@pytest.fixture(scope="module")
def bundle(exported) -> Path:
    return exported[1]


def _kinds(ec: EdgeClient) -> dict[str, str]:
    return {t: ec.head(t).kind for t in ec.entry.tasks}


# ----------------------------------------------------------------------------- inference
@pytest.mark.parametrize("cid", ["c00", "c01"])
def test_predict_equals_torch(exported, cid: str) -> None:
    run_dir, bundle = exported
    ec = EdgeClient(bundle, cid)
    assert ec.widths == [{"c00": 1.0, "c01": 0.5}[cid]]
    px, x, _ = digits(33, ())
    with torch.no_grad():
        want = client_model(run_dir, cid)(torch.from_numpy(x))
    for t in ec.tasks:
        w = want[t].numpy()
        for inp in (x, px, x[:, 0], px[:, None]):  # float (B,C,H,W)/(B,H,W), uint8 pixels
            got = ec.predict(t, inp)
            assert got.shape == w.shape and got.dtype == np.float32
            np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("head_only", [False, True], ids=["full", "head_only"])
@pytest.mark.parametrize("cid", ["c00", "c01"])
def test_train_equals_torch_sgd(exported, cid: str, head_only: bool) -> None:
    run_dir, bundle = exported
    ec = EdgeClient(bundle, cid)
    _, x, ys = digits(40, ec.entry.tasks, "train")
    lr, bs, seed = 0.1, 16, 7
    res = ec.train(x, ys, batch_size=bs, steps=3, lr=lr, seed=seed, head_only=head_only)
    batches = list(batch_order(40, bs, 1, 3, seed))
    want = torch_sgd(client_model(run_dir, cid), x, ys, _kinds(ec), batches, lr, head_only)
    base = ec.base_state()
    assert set(res.state) == set(want) == set(base)
    for k in want:
        np.testing.assert_allclose(res.state[k], want[k], rtol=0, atol=1e-5, err_msg=k)
        moved = not np.array_equal(res.state[k], base[k])
        assert moved == (not (head_only and k.startswith("backbone."))), k
    assert set(res.shared) == set(ec.shared_keys) == {k for k in base if k.startswith("backbone.")}
    assert res.num_examples == 40 and res.metrics["steps"] == 3 and np.isfinite(res.metrics["loss"])
    assert res.base_hash == state_hash({k: base[k] for k in ec.shared_keys})


def test_train_from_server_arrays(exported) -> None:
    """``start_from`` overlays the server's shared arrays; the base hash is theirs."""
    run_dir, bundle = exported
    ec = EdgeClient(bundle, "c01")
    _, x, ys = digits(24, ec.entry.tasks, "train")
    server = {k: (ec.base_state()[k] * 0.5).astype(np.float32) for k in ec.shared_keys}
    res = ec.train(x, ys, batch_size=8, epochs=2, lr=0.05, start_from=server)
    model = client_model(run_dir, "c01")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in server.items()}, strict=False)
    want = torch_sgd(model, x, ys, _kinds(ec), list(batch_order(24, 8, 2, None, 0)), 0.05)
    for k in want:
        np.testing.assert_allclose(res.state[k], want[k], rtol=0, atol=1e-5, err_msg=k)
    assert res.metrics["steps"] == 6 and res.base_hash == state_hash(server)
    with pytest.raises(InputError, match="start_from: key 'backbone.layers.1.weight' expected"):
        ec.train(x, ys, start_from={"backbone.layers.1.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(InputError, match="head-only training computes features"):
        ec.train(x, ys, head_only=True, start_from=server)


def test_local_heads_kept_on_device(bundle: Path, tmp_path: Path) -> None:
    ec = EdgeClient(bundle, "c01")
    _, x, ys = digits(16, ec.entry.tasks, "train")
    res = ec.train(x, ys, batch_size=8, steps=2)
    local, md = load_file(ec.save_local(tmp_path / "heads.safetensors"))
    assert md["client_id"] == "c01"
    assert set(local) == set(res.state) - set(ec.shared_keys)
    assert all(k.startswith("heads.") for k in local)
    again = EdgeClient(bundle, "c01")
    again.load_local(tmp_path / "heads.safetensors")
    for k, v in local.items():
        np.testing.assert_array_equal(again.base_state()[k], v)


# ----------------------------------------------------------------------------- errors
def _copy(bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(bundle, out)
    return out


def test_missing_and_corrupt_onnx(bundle: Path, tmp_path: Path) -> None:
    b = _copy(bundle, tmp_path)
    m = load_manifest(b)
    head = m.heads_of("c00")[0].file.path
    data = bytearray((b / head).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / head).write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=f"file '{head}': sha256 .* does not match"):
        EdgeClient(b, "c00")
    (b / head).unlink()
    with pytest.raises(ManifestError, match=f"file '{head}' named in the manifest is missing"):
        EdgeClient(b, "c00")
    ec = EdgeClient(b, "c00", verify=False)  # without the check: fails when first needed
    with pytest.raises(ManifestError, match=f"file '{head}' named in the manifest is missing"):
        ec.predict("digits/digit", digits(2, ())[1])


def test_manifest_version_and_client_choice(bundle: Path, tmp_path: Path) -> None:
    b = _copy(bundle, tmp_path)
    with pytest.raises(ManifestError, match="2 clients \\(c00, c01\\); name one"):
        EdgeClient(b)
    with pytest.raises(ManifestError, match="client 'c99' not in the manifest"):
        EdgeClient(b, "c99")
    d = json.loads((b / "manifest.json").read_text())
    d["format_version"] = 99
    (b / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="'format_version' has unsupported value 99"):
        EdgeClient(b, "c00")


def test_bad_inputs(bundle: Path) -> None:
    ec = EdgeClient(bundle, "c01")
    px, x, ys = digits(6, ec.entry.tasks)
    t = "digits/parity"
    with pytest.raises(InputError, match=r"x has shape \(6, 1, 7, 7\); expected \(B, 1, 8, 8\)"):
        ec.predict(t, x[:, :, :7, :7])
    with pytest.raises(InputError, match="x has dtype float64; expected float32"):
        ec.predict(t, x.astype(np.float64))
    bad = x.copy()
    bad[2, 0, 3, 4] = np.nan
    with pytest.raises(InputError, match=r"x has 1 NaN/Inf values \(first at \[2, 0, 3, 4\]\)"):
        ec.predict(t, bad)
    with pytest.raises(InputError, match="x has 1 NaN/Inf"):
        ec.train(bad, ys)
    with pytest.raises(InputError, match="task 'digits/digit' has no head for client 'c01'"):
        ec.predict("digits/digit", x)
    with pytest.raises(InputError, match="runs at width 0.5, got width 1"):
        ec.predict(t, x, width=1.0)
    for change, pattern in [
        (
            {t: ys[t] + 5},
            r"targets\['digits/parity'\] has class ids in \[5, 6\]; expected \[0, 1\]",
        ),
        ({t: ys[t].astype(np.float32)}, r"targets\['digits/parity'\] has dtype float32"),
        ({"digits/attrs": ys["digits/attrs"][:, :2]}, r"has shape \(6, 2\); expected \(6, 3\)"),
        ({"digits/attrs": ys["digits/attrs"] * 2}, "values other than 0/1"),
    ]:
        with pytest.raises(InputError, match=pattern):
            ec.train(x, {**ys, **change})
    with pytest.raises(InputError, match=r"targets missing for tasks \['digits/attrs'\]"):
        ec.train(x, {t: ys[t]})


# ----------------------------------------------------------------------------- CLI
def _png(img: np.ndarray) -> bytes:
    """8-bit gray PNG with every row filter type (0..4 in turn), encoded by hand."""
    h, w = img.shape
    a = img.astype(np.int32)
    rows = []
    for r in range(h):
        f = r % 5
        cur, prev = a[r], a[r - 1] if r else np.zeros(w, np.int32)
        left = np.concatenate([[0], cur[:-1]])
        ul = np.concatenate([[0], prev[:-1]])
        if f == 0:
            pred = np.zeros(w, np.int32)
        elif f == 1:
            pred = left
        elif f == 2:
            pred = prev
        elif f == 3:
            pred = (left + prev) // 2
        else:
            p = left + prev - ul
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - ul)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, ul))
        rows.append(bytes([f]) + ((cur - pred) & 0xFF).astype(np.uint8).tobytes())

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))  # fmt: skip


def test_cli_info_predict(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    m = load_manifest(bundle)
    mem = {
        w["width"]: w["memory"]
        for w in json.loads((bundle / "manifest.json").read_text())["widths"]
    }
    assert [memory_estimate(m, bundle, w) for w in (1.0, 0.5)] == [mem[1.0]["train_bytes"],
                                                                  mem[0.5]["train_bytes"]]  # fmt: skip
    budget = min(mem[1.0]["train_bytes"], mem[0.5]["train_bytes"]) / 2**20
    assert main(["info", str(bundle), "--memory-mb", str(budget)]) == 0
    out = capsys.readouterr().out
    assert "width 1: feature_dim 8" in out and "width 0.5: feature_dim 4" in out
    assert "head_c01_digits_parity.onnx" in out and "backbone_w0.5.onnx" in out
    want = [f"{w:g}" for w in (1.0, 0.5) if mem[w]["train_bytes"] <= budget * 2**20]
    assert f"widths that fit {budget:g} MB: {', '.join(want)}\n" in out
    assert f"train at batch 32 {mem[0.5]['train_bytes'] / 2**20:.2f} MB" in out
    ec = EdgeClient(bundle, "c00")
    px, x, _ = digits(3, ())
    (tmp_path / "a.png").write_bytes(_png(px[0]))
    (tmp_path / "b.pgm").write_bytes(b"P5\n# digit\n8 8\n255\n" + px[1].tobytes())
    np.save(tmp_path / "c.npy", x[2])
    np.savez(tmp_path / "d.npz", x=px)
    argv = ["predict", str(bundle), "--task", "digits/digit", "--probs"]  # c00: its only head
    assert main([*argv, *(str(tmp_path / n) for n in ["a.png", "b.pgm", "c.npy", "d.npz"])]) == 0
    header, *lines = capsys.readouterr().out.strip().splitlines()
    assert header == "input\tdigits/digit\t0 1 2 3 4 5 6 7 8 9"
    want = ec.predict("digits/digit", x).argmax(1)
    assert [ln.split("\t")[1] for ln in lines] == [str(i) for i in [*want, *want]]
    assert lines[3].startswith(f"{tmp_path / 'd.npz'}[0]")
    probs = np.array([float(v) for v in lines[0].split("\t")[2].split()])
    assert probs.shape == (10,) and abs(probs.sum() - 1) < 1e-3


def _err(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fmtl-edge: error: ") and err.count("\n") == 1
    return err


def test_cli_errors(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8), "RGB").save(tmp_path / "rgb.png")
    Image.fromarray(np.zeros((8, 8, 2), np.uint8), "LA").save(tmp_path / "la.png")
    p = ["predict", str(bundle), "--client", "c00", "--task", "digits/digit"]
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(tmp_path / "i32.png")  # 16-bit gray
    assert main([*p, str(tmp_path / "rgb.png"), str(tmp_path / "la.png")]) == 0  # converted
    assert "image mode 'I;16'; supported: 8-bit" in _err(capsys, [*p, str(tmp_path / "i32.png")])
    np.save(tmp_path / "f64.npy", np.zeros((8, 8)))
    assert "dtype float64" in _err(capsys, [*p, str(tmp_path / "f64.npy")])
    err = _err(capsys, ["predict", str(bundle), "--task", "x", "a.npy"])
    assert "task 'x' has no head in this bundle; tasks: digits/attrs, digits/digit" in err
    err = _err(capsys, ["predict", str(bundle), "--task", "digits/digit", "--width", "0.5", "a"])
    assert "task 'digits/digit' has heads at width 1 only, not at --width 0.5 (clients c00)" in err
    err = _err(capsys, ["train", str(bundle), "--data", str(tmp_path / "f64.npy")])
    assert "the bundle has 2 clients (c00, c01): name one with --client" in err
    assert "the following arguments are required: --data" in _err(capsys, ["train", str(bundle)])
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 8, 8), np.uint8))
    err = _err(capsys, ["train", str(bundle), "--client", "c00", "--data", str(tmp_path / "d.npz")])
    assert "no key 'y__digits__digit' for task 'digits/digit'" in err


def test_cli_train_writes_update(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ec = EdgeClient(bundle, "c01")
    px, _, ys = digits(20, ec.entry.tasks, "train")
    np.savez(
        tmp_path / "local.npz", x=px, **{"y__" + t.replace("/", "__"): y for t, y in ys.items()}
    )
    server = {k: ec.base_state()[k] + np.float32(0.01) for k in ec.shared_keys}
    save_file(server, tmp_path / "global.safetensors", {"round": "7"})
    out = tmp_path / "update.safetensors"
    argv = ["train", str(bundle), "--client", "c01", "--data", str(tmp_path / "local.npz"),
            "--epochs", "2", "--batch-size", "8", "--lr", "0.05",
            "--start-from", str(tmp_path / "global.safetensors"), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert "epoch 1: 3 steps" in cap.err and "epoch 2: 6 steps" in cap.err
    arrays, meta = read_update(out, expected_base_hash=state_hash(server))
    assert set(arrays) == set(ec.shared_keys)
    assert (meta.client_id, meta.round, meta.width, meta.num_examples) == ("c01", 7, 0.5, 20)
    assert set(meta.metrics) >= {"loss", "steps"}
    want = ec.train(px, ys, epochs=2, batch_size=8, lr=0.05, start_from=server)
    for k, v in arrays.items():
        np.testing.assert_array_equal(v, want.shared[k])
    local, _ = load_file(tmp_path / "update.local.safetensors")
    assert set(local) == {k for k in want.state if k.startswith("heads.")}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "global.safetensors", "local.npz", "update.local.safetensors", "update.safetensors"
    ]  # fmt: skip
    with pytest.raises(UpdateError, match="'base_hash'"):
        read_update(out, expected_base_hash=state_hash(ec.base_state()))


# ----------------------------------------------------------------------------- torch-free
BLOCK = """
import sys
BLOCKED = ("torch", "lightning", "onnx", "fmtl_lightning", "export", "onnxscript")
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
from mobile_client.cli import main, memory_estimate
codes = [main(a) for a in ARGS]
assert all(m.split(".")[0] not in BLOCKED for m in sys.modules), sorted(sys.modules)
print("codes", codes, "torch" in sys.modules)
"""


def test_edge_path_without_torch(bundle: Path, tmp_path: Path) -> None:
    px, _, ys = digits(12, ("digits/digit",), "train")
    np.save(tmp_path / "x.npy", px[:4])
    np.savez(tmp_path / "local.npz", x=px, y__digits__digit=ys["digits/digit"])
    args = [
        ["predict", str(bundle), "--client", "c00", "--task", "digits/digit", str(tmp_path / "x.npy")],
        ["train", str(bundle), "--client", "c00", "--data", str(tmp_path / "local.npz"),
         "--epochs", "2", "--out", str(tmp_path / "u.safetensors")],
        ["train", str(bundle), "--client", "c00", "--data", str(tmp_path / "local.npz"),
         "--head-only", "--out", str(tmp_path / "h.safetensors")],
    ]  # fmt: skip
    child = BLOCK.replace("ARGS", repr(args))
    # a wrapper whose only child is the edge process: its RUSAGE_CHILDREN is that process
    wrapper = (
        "import resource, subprocess, sys\n"
        f"r = subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True)\n"
        "sys.stdout.write(r.stdout); sys.stderr.write(r.stderr)\n"
        "print('maxrss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.exit(r.returncode)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", wrapper], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stderr
    assert "codes [0, 0, 0] False" in res.stdout, res.stdout + res.stderr
    rss_mb = int(res.stdout.split("maxrss_kb")[1].split()[0]) / 1024
    print(f"edge subprocess peak RSS: {rss_mb:.1f} MB")
    assert rss_mb < 200
    _, meta = read_update(tmp_path / "u.safetensors")
    assert meta.client_id == "c00" and meta.num_examples == 12 and meta.metrics["steps"] == 2
    assert (tmp_path / "h.local.safetensors").is_file()


def test_predict_client_picks_the_one_head_or_names_the_candidates(bundle: Path) -> None:
    """``predict`` without ``--client``: the only client with a head for the task (at the
    width), else an error naming every candidate and ``--client`` (FedPer: one head each)."""
    from dataclasses import replace

    from mobile_client.cli import CLIError, predict_client
    from mobile_client.manifest import load_manifest

    m = load_manifest(bundle)
    assert predict_client(m, "digits/digit", None) == "c00"
    assert predict_client(m, "digits/parity", 0.5) == "c01"
    c00 = m.client("c00")
    twin = replace(m, clients=(*m.clients, replace(c00, client="c09")),
                   heads=(*m.heads, *(replace(h, client="c09") for h in m.heads_of("c00"))))  # fmt: skip
    with pytest.raises(
        CLIError, match=r"2 heads, one per client.*\(c00, c09\): name one with --client"
    ):
        predict_client(twin, "digits/digit", 1.0)
    with pytest.raises(InputError, match="has heads at width 1 only, not at --width 0.25"):
        predict_client(twin, "digits/digit", 0.25)
