"""Hostile inputs to the edge runtime and ``fmtl-edge`` (issue 16, defects 9-11): each one
gives one typed error (one line, exit 2) naming the file/key, and leaves no file behind."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from edge_helpers import digits

from fmtl_lightning import errors as fmtl_errors
from mobile_client import errors as edge_errors
from mobile_client.cli import main
from mobile_client.errors import InputError, ManifestError, UpdateError
from mobile_client.manifest import load_manifest
from mobile_client.runtime import EdgeClient
from mobile_client.safetensors_np import save_file
from mobile_client.update import UpdateMeta, write_update

P_C00 = ["--client", "c00", "--task", "digits/digit"]


@pytest.fixture(scope="module")
def bundle(mlp_export: tuple[Path, Path]) -> Path:
    return mlp_export[1]


def _err(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run fmtl-edge; assert exit 2, nothing on stdout and one error line; return it."""
    capsys.readouterr()
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    lines = [ln for ln in cap.err.splitlines() if ln.startswith("fmtl-edge: error: ")]
    assert len(lines) == 1 and cap.err.endswith(lines[0] + "\n"), cap.err
    return lines[0]


def _rehash(b: Path) -> None:
    """Make every sha256 in ``b/manifest.json`` match the (edited) files again."""
    m = json.loads((b / "manifest.json").read_text())

    def fix(d: object) -> None:
        if isinstance(d, dict):
            if isinstance(d.get("path"), str) and "sha256" in d and (b / d["path"]).is_file():
                d["sha256"] = hashlib.sha256((b / d["path"]).read_bytes()).hexdigest()
            for v in d.values():
                fix(v)
        elif isinstance(d, list):
            for v in d:
                fix(v)

    fix(m)
    (b / "manifest.json").write_text(json.dumps(m))


def _edit_manifest(b: Path, edit) -> None:
    m = json.loads((b / "manifest.json").read_text())
    edit(m)
    (b / "manifest.json").write_text(json.dumps(m))


@pytest.fixture
def copy(bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    return out


def _train(bundle: Path, tmp_path: Path, out: Path, *extra: str) -> list[str]:
    """``fmtl-edge train`` argv for client c00 on 12 real digits in ``tmp_path/local.npz``."""
    data = str(_data(tmp_path))
    return ["train", str(bundle), "--client", "c00", "--data", data, "--out", str(out), *extra]


def _data(tmp_path: Path, n: int = 12) -> Path:
    px, _, ys = digits(n, ("digits/digit",), "train")
    p = tmp_path / "local.npz"
    np.savez(p, x=px, y__digits__digit=ys["digits/digit"])
    return p


# ----------------------------------------------------------------------------- hierarchy
def test_one_error_base_for_every_package() -> None:
    """One base: fmtl's and the edge's errors are the same class, so every CLI catches both."""
    assert fmtl_errors.FMTLError is edge_errors.FMTLError
    assert not hasattr(edge_errors, "MobileClientError")  # no second path left behind
    from fmtl_lightning.config import ConfigError
    from mobile_client.cli import CLIError
    from mobile_client.errors import SafetensorsError

    for e in (UpdateError, ManifestError, InputError, SafetensorsError, CLIError, ConfigError):
        assert issubclass(e, fmtl_errors.FMTLError), e


def test_fmtl_cli_catches_edge_errors(monkeypatch, capsys) -> None:
    """``fmtl simulate`` with a bad edge update: one line, exit 2 (was an UpdateError traceback)."""
    from fmtl_lightning import cli, simulation

    def bad_update(*a, **k):
        raise UpdateError("runs/x/edge/update.safetensors: key 'backbone.w' has 1 NaN/Inf")

    monkeypatch.setattr(simulation, "resume_run", bad_update)
    assert cli.main(["simulate", "--resume", "runs/x", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == "fmtl: error: runs/x/edge/update.safetensors: key 'backbone.w' has 1 NaN/Inf\n"


def test_real_bugs_keep_their_traceback(bundle: Path, monkeypatch) -> None:
    """An unexpected exception is not swallowed into an error line."""
    from mobile_client import cli

    def bug(args):
        raise ValueError("a bug, not a bad input")

    monkeypatch.setattr(cli, "cmd_info", bug)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["info", str(bundle)])


# ----------------------------------------------------------------------------- 9: input files
def test_empty_and_truncated_input_files(bundle: Path, tmp_path: Path, capsys) -> None:
    p = ["predict", str(bundle), *P_C00]
    for name in ("empty.npy", "empty.npz", "empty.png", "empty.pgm"):
        (tmp_path / name).write_bytes(b"")
        assert f"{tmp_path / name}: not a readable" in _err(capsys, [*p, str(tmp_path / name)])
    np.save(tmp_path / "cut.npy", np.zeros((4, 8, 8), np.float32))
    data = (tmp_path / "cut.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-7])
    err = _err(capsys, [*p, str(tmp_path / "cut.npy")])
    assert "needs 1024 bytes of data, the file holds 1017" in err
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert "dtype object is not supported" in _err(capsys, [*p, str(tmp_path / "obj.npy")])
    # a header that claims 2**40 elements: refused before anything is allocated
    hdr = "{'descr': '<f4', 'fortran_order': False, 'shape': (1048576, 1048576), }"
    hdr += " " * (-(len(hdr) + 11) % 64) + "\n"
    (tmp_path / "huge.npy").write_bytes(
        b"\x93NUMPY\x01\x00" + struct.pack("<H", len(hdr)) + hdr.encode()
    )
    assert "more than 1073741824" in _err(capsys, [*p, str(tmp_path / "huge.npy")])
    (tmp_path / "empty_data.npz").write_bytes(b"")
    t = ["train", str(bundle), "--client", "c00", "--out", str(tmp_path / "u.safetensors")]
    err = _err(capsys, [*t, "--data", str(tmp_path / "empty_data.npz")])
    assert f"{tmp_path / 'empty_data.npz'}: not a readable .npz file" in err
    assert not (tmp_path / "u.safetensors").exists()


def _chunk(t: bytes, d: bytes) -> bytes:
    return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))


def test_png_with_cut_short_header_chunk(bundle: Path, tmp_path: Path, capsys) -> None:
    """An IHDR chunk that claims 13 bytes but holds 6 (was: struct.error traceback)."""
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + b"\0\0\0\x08\0\0"
    (tmp_path / "short.png").write_bytes(png)
    err = _err(capsys, ["predict", str(bundle), *P_C00, str(tmp_path / "short.png")])
    assert f"{tmp_path / 'short.png'}: not a readable PNG image" in err
    # a valid header whose image data is cut short
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
    idat = _chunk(b"IDAT", zlib.compress(bytes(9 * 8))[:-6])
    (tmp_path / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + ihdr + idat)
    err = _err(capsys, ["predict", str(bundle), *P_C00, str(tmp_path / "cut.png")])
    assert f"{tmp_path / 'cut.png'}: not a readable PNG image" in err


# ----------------------------------------------------------------------------- 9: bundles
def test_onnx_that_is_not_a_model(copy: Path, tmp_path: Path, capsys) -> None:
    head = load_manifest(copy).heads_of("c00")[0].file.path
    (copy / head).write_bytes(b"not a model")
    _rehash(copy)  # the manifest's hash matches: only the content is wrong
    ec = EdgeClient(copy, "c00")
    with pytest.raises(ManifestError, match=f"file '{head}': not a loadable ONNX model"):
        ec.predict("digits/digit", digits(2, ())[1])
    np.save(tmp_path / "x.npy", digits(1, ())[0][0])
    err = _err(capsys, ["predict", str(copy), *P_C00, str(tmp_path / "x.npy")])
    assert f"file '{head}': not a loadable ONNX model" in err


@pytest.mark.parametrize("content", ["no arrays", "zero bytes"])
def test_empty_weights_npz(copy: Path, tmp_path: Path, capsys, content: str) -> None:
    w = copy / "weights_c00.npz"
    if content == "no arrays":
        np.savez(w)
        match = r"weights_c00.npz: no key 'backbone\."
    else:
        w.write_bytes(b"")
        match = "weights_c00.npz: not a readable .npz file"
    _rehash(copy)
    with pytest.raises(ManifestError, match=match):
        EdgeClient(copy, "c00").base_state()
    out = tmp_path / "u.safetensors"
    argv = _train(copy, tmp_path, out)
    assert re.search(match, _err(capsys, argv))
    assert not out.exists()


def test_weights_that_contradict_the_manifest(copy: Path) -> None:
    w = copy / "weights_c00.npz"
    with np.load(w) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["backbone.layers.1.bias"] = np.zeros(3, np.float32)
    np.savez(w, **arrays)
    _rehash(copy)
    with pytest.raises(ManifestError, match=r"key 'backbone.layers.1.bias' is float32\[3\], the manifest says float32\[16\]"):  # fmt: skip
        EdgeClient(copy, "c00").base_state()


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda m: m["clients"][0]["shared_keys"].append("backbone.nope"),
            r"'clients\[0\].shared_keys' names key 'backbone.nope', which is not in the client's weights 'weights_c00.npz'",
        ),
        (
            lambda m: m["widths"][0]["train_steps"][0]["file"]["weights"].update(
                p_x="backbone.gone"
            ),
            r"'widths\[0\].train_steps\[0\].file.weights' names key 'backbone.gone'",
        ),
        (
            lambda m: m["heads"][0]["head_step"]["weight_outputs"].update(o="heads.x.weight"),
            r"'heads\[0\].head_step.weight_outputs' names key 'heads.x.weight'",
        ),
        (
            lambda m: m["clients"][0]["tasks"].append("digits/parity"),
            r"'clients\[0\].tasks': task 'digits/parity' has no head",
        ),
        (
            lambda m: m["heads"][0].update(client="c99"),
            r"'heads\[0\].client': 'c99' is not a client",
        ),
        (lambda m: m["clients"][0].update(width=0.75), r"'clients\[0\].width': 0.75 is not in"),
        (
            lambda m: m["normalisation"].update(std=float("inf")),
            r"'normalisation.std' must be a finite",
        ),
    ],
    ids=["shared_keys", "step_weights", "head_step_outputs", "task", "head_client", "width", "std"],
)
def test_manifest_cross_references(copy: Path, edit, match: str) -> None:
    """A manifest naming a key, client, task or width that does not exist fails at load."""
    _edit_manifest(copy, edit)
    with pytest.raises(ManifestError, match=match):
        load_manifest(copy)


# ----------------------------------------------------------------------------- 10
def test_head_with_no_labels_is_refused(copy: Path, tmp_path: Path, capsys) -> None:
    """labels: [] printed raw indices; the loader now wants one label per output."""
    _edit_manifest(copy, lambda m: m["heads"][0].update(labels=[]))
    with pytest.raises(
        ManifestError, match=r"'heads\[0\].labels': 0 label\(s\) for a head with 10"
    ):
        load_manifest(copy)
    _edit_manifest(copy, lambda m: m["heads"][0].update(labels=["a", "b"]))
    np.save(tmp_path / "x.npy", digits(1, ())[0][0])
    err = _err(capsys, ["predict", str(copy), *P_C00, str(tmp_path / "x.npy")])
    assert "'heads[0].labels': 2 label(s) for a head with 10 output(s)" in err


def test_predict_refuses_non_finite_outputs(bundle: Path, tmp_path: Path, capsys) -> None:
    """A finite but huge input whose logits overflow: refused (was class 0, NaN probs, exit 0)."""
    ec = EdgeClient(bundle, "c00")
    w = ec.base_state()["backbone.layers.1.weight"]  # (16, 64): the first Linear
    row = np.abs(w).sum(axis=1).argmax()
    x = (np.float32(3e38) * np.sign(w[row])).astype(np.float32).reshape(1, 1, 8, 8)
    assert np.isfinite(x).all()
    with pytest.raises(InputError, match="features has .* NaN/Inf values"):
        ec.predict("digits/digit", x)
    np.save(tmp_path / "big.npy", x[0])
    err = _err(capsys, ["predict", str(bundle), *P_C00, "--probs", str(tmp_path / "big.npy")])
    assert f"{tmp_path / 'big.npy'}: features has" in err


def test_start_from_lacking_a_key(bundle: Path, tmp_path: Path, capsys) -> None:
    """--start-from without one shared key trained that key from the bundle; now refused."""
    ec = EdgeClient(bundle, "c00")
    server = {k: ec.base_state()[k] for k in ec.shared_keys}
    server.pop("backbone.layers.3.bias")
    save_file(server, tmp_path / "global.safetensors", {"round": "2"})
    out = tmp_path / "u.safetensors"
    argv = _train(bundle, tmp_path, out, "--start-from", str(tmp_path / "global.safetensors"))
    err = _err(capsys, argv)
    assert "lacks 1 shared key(s) ['backbone.layers.3.bias']" in err
    assert f"--start-from {tmp_path / 'global.safetensors'}" in err
    assert not out.exists()
    with pytest.raises(InputError, match="start_from lacks 1 shared key"):
        ec.train(*digits(4, ("digits/digit",))[1:], start_from=server)


def test_negative_round_refused(bundle: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "u.safetensors"
    argv = _train(bundle, tmp_path, out, "--round", "-3")
    assert "--round must be >= 0, got -3" in _err(capsys, argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local.npz"]
    meta = UpdateMeta("c00", -3, 1.0, 12, "h", {})
    with pytest.raises(UpdateError, match="round=-3"):  # the writer obeys the reader's rules
        write_update(out, {"a": np.zeros(2, np.float32)}, meta)
    assert not out.exists()


# ----------------------------------------------------------------------------- 11
def test_out_into_missing_directory_fails_before_training(
    bundle: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "missing" / "u.safetensors"
    argv = _train(bundle, tmp_path, out)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"fmtl-edge: error: --out {out}: directory {out.parent} does not exist\n"
    assert "epoch" not in err  # no training happened first


def test_local_state_path_is_a_directory(bundle: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "u.local.safetensors").mkdir()
    out = tmp_path / "u.safetensors"
    argv = _train(bundle, tmp_path, out)
    err = _err(capsys, argv)
    assert f"local-state file {tmp_path / 'u.local.safetensors'} is a directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local.npz", "u.local.safetensors"]


def test_failed_local_write_leaves_no_update(
    bundle: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """A failure writing the heads after the update: neither file is left behind."""
    from mobile_client import runtime

    def full_disk(self, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(runtime.EdgeClient, "save_local", full_disk)
    out = tmp_path / "u.safetensors"
    argv = _train(bundle, tmp_path, out)
    assert "No space left on device" in _err(capsys, argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local.npz"]


def test_images_without_pillow_name_the_extra(tmp_path: Path, monkeypatch) -> None:
    """The base install has no Pillow: a PNG input says which extra to install."""
    import sys

    from mobile_client.inputs import read_inputs

    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL -> ImportError
    with pytest.raises(InputError, match=r"needs Pillow: pip install 'fmtl-lightning\[images\]'"):
        read_inputs(tmp_path / "a.png")


# ----------------------------------------------------------------------------- sweep findings
def _x_npy(tmp_path: Path) -> str:
    np.save(tmp_path / "x.npy", digits(1, ())[0][0])
    return str(tmp_path / "x.npy")


@pytest.mark.parametrize("w", ["nan", "inf", "-inf", "-1", "0", "1.5"])
def test_predict_width_out_of_range(bundle: Path, tmp_path: Path, capsys, w: str) -> None:
    """--width nan was accepted (NaN compared with the client's width is never 'different')."""
    err = _err(capsys, ["predict", str(bundle), *P_C00, f"--width={w}", _x_npy(tmp_path)])
    assert f"--width must be a finite number in (0, 1], got {float(w):g}" in err
    with pytest.raises(InputError, match="width must be a finite number in"):
        EdgeClient(bundle, "c00").predict("digits/digit", digits(1, ())[1], float(w))


def test_predict_width_of_another_client(bundle: Path, tmp_path: Path, capsys) -> None:
    err = _err(capsys, ["predict", str(bundle), *P_C00, "--width", "0.5", _x_npy(tmp_path)])
    assert err.startswith("fmtl-edge: error: --width 0.5: client 'c00' runs at width 1")


@pytest.mark.parametrize("mb", ["nan", "inf", "-1"])
def test_info_memory_mb_out_of_range(bundle: Path, capsys, mb: str) -> None:
    err = _err(capsys, ["info", str(bundle), "--memory-mb", mb])
    assert f"--memory-mb must be a finite number >= 0, got {float(mb):g}" in err


def _snapshot(*roots: Path) -> dict[str, bytes]:
    files = [p for r in roots for p in ([r] if r.is_file() else sorted(r.rglob("*")))]
    return {str(p): p.read_bytes() for p in files if p.is_file()}


@pytest.mark.parametrize(
    "target", ["data", "data symlink", "local = data", "start-from", "weights", "manifest", "onnx"]
)
def test_out_onto_an_input_is_refused(copy: Path, tmp_path: Path, capsys, target: str) -> None:
    """--out (or its .local file) resolving to an input overwrote it after training; now
    refused before training, every file byte-identical."""
    data = _data(tmp_path)
    ec = EdgeClient(copy, "c00")
    save_file({k: ec.base_state()[k] for k in ec.shared_keys}, tmp_path / "g.safetensors")
    m = load_manifest(copy)
    out = {
        "data": data,
        "start-from": tmp_path / "g.safetensors",
        "weights": copy / m.client("c00").weights.path,
        "manifest": copy / "manifest.json",
        "onnx": copy / m.heads_of("c00")[0].file.path,
    }.get(target)
    if target == "data symlink":
        (tmp_path / "link.npz").symlink_to(data)
        out = tmp_path / "link.npz"
    if target == "local = data":  # u.safetensors -> u.local.safetensors, which is --data
        data = data.rename(tmp_path / "u.local.safetensors")
        out = tmp_path / "u.safetensors"
    assert out is not None
    before = _snapshot(tmp_path)
    argv = ["train", str(copy), "--client", "c00", "--data", str(data), "--out", str(out),
            "--start-from", str(tmp_path / "g.safetensors")]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "epoch" not in err  # refused before training
    assert err.startswith("fmtl-edge: error: ") and err.count("\n") == 1, err
    assert " is an input (" in err and "choose another path" in err
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"mean": 1e308}, r"'normalisation.mean' must be in \[-1e\+06, 1e\+06\], got 1e\+308"),
        ({"mean": -2e6}, r"'normalisation.mean' must be in"),
        ({"std": 1e-30}, r"'normalisation.std' must be in \[1e-06, 1e\+06\]"),
        ({"std": 1e308}, r"'normalisation.std' must be in"),
        ({"scale": 1e308}, r"'normalisation.scale' must be in \(0, 1e\+06\]"),
        (
            {"mean": 0.0, "scale": 1.0, "std": 1e-4},  # each in range, 255 / 1e-4 is not
            r"'normalisation': \(pixels \* scale - mean\) / std reaches 2.55e\+06",
        ),
    ],
    ids=["mean 1e308", "mean -2e6", "std 1e-30", "std 1e308", "scale 1e308", "range"],
)
def test_normalisation_is_bounded(copy: Path, capsys, edit: dict, match: str) -> None:
    """mean 1e308 passed ``info``; (pixels * scale - mean) / std must stay finite in float32."""
    _edit_manifest(copy, lambda m: m["normalisation"].update(edit))
    with pytest.raises(ManifestError, match=match):
        load_manifest(copy)
    assert re.search(match, _err(capsys, ["info", str(copy)]))
    # a client's own normalisation is bounded the same way
    _edit_manifest(copy, lambda m: m["normalisation"].update(m["clients"][1]["normalisation"]))
    load_manifest(copy)
    _edit_manifest(copy, lambda m: m["clients"][1]["normalisation"].update(edit))
    with pytest.raises(ManifestError, match=match.replace("'normalisation", r"'clients\[1\].normalisation")):  # fmt: skip
        load_manifest(copy)


def test_normalisation_at_the_bound_stays_finite(copy: Path) -> None:
    """Just inside the rule, every pixel 0..255 gives a finite float32 x with |x| <= 1e6."""
    edit = {"mean": 0.0, "scale": 1.0, "std": 2.56e-4}
    _edit_manifest(copy, lambda m: [n.update(edit) for n in (m["normalisation"], *(c["normalisation"] for c in m["clients"]))])  # fmt: skip
    ec = EdgeClient(copy, "c00")
    px = np.arange(256, dtype=np.uint8)[:64].reshape(1, 1, 8, 8)
    px[0, 0, 7, 7] = 255
    x = ec.prepare_x(px)
    want = px.astype(np.float64) / 2.56e-4  # independent, float64
    assert x.dtype == np.float32 and np.isfinite(x).all()
    np.testing.assert_allclose(x, want, rtol=1e-6)
    assert np.abs(x).max() == pytest.approx(255 / 2.56e-4, rel=1e-6) and np.abs(x).max() <= 1e6


def _step(m: dict) -> dict:
    return m["widths"][0]["train_steps"][0]["file"]


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda m: _step(m)["target_inputs"].update(
                {next(iter(_step(m)["target_inputs"])): "y_missing"}
            ),  # fmt: skip
            r"'widths\[0\].train_steps\[0\].file.target_inputs.digits/\w+' names graph input 'y_missing'",
        ),
        (
            lambda m: _step(m).update(lr_input="eta"),
            r"'widths\[0\].train_steps\[0\].file.lr_input' names graph input 'eta'",
        ),
        (
            lambda m: m["heads"][0]["head_step"].update(loss_output="total"),
            r"'heads\[0\].head_step.loss_output' names graph output 'total'",
        ),
        (
            lambda m: m["heads"][0]["file"].update(features_input="h"),
            r"'heads\[0\].file.features_input' names graph input 'h'",
        ),
        (
            lambda m: _step(m)["weights"].update(p_nope="backbone.layers.1.bias"),
            r"'widths\[0\].train_steps\[0\].file.weights.p_nope' names graph input 'p_nope'",
        ),
    ],
    ids=["target_inputs", "lr_input", "loss_output", "features_input", "weights"],
)
def test_graph_names_checked_at_load(copy: Path, edit, match: str) -> None:
    """A train step whose target_inputs named a missing graph input loaded fine (and
    predict ran); every name must be one of the inputs/outputs the entry lists."""
    _edit_manifest(copy, edit)
    with pytest.raises(ManifestError, match=match):
        load_manifest(copy)


def test_graph_names_checked_at_session_when_not_listed(copy: Path) -> None:
    """Without ``inputs``/``outputs`` lists the loader cannot check: session creation does,
    against the graph itself, naming the field (was ORT's 'invalid feed' at run time)."""

    def edit(m: dict) -> None:
        for w in m["widths"]:
            for s in w["train_steps"]:
                s["file"].update(inputs=[], outputs=[])
                s["file"]["target_inputs"]["digits/digit"] = "y_missing"

    _edit_manifest(copy, edit)
    load_manifest(copy)
    ec = EdgeClient(copy, "c00")
    with pytest.raises(
        ManifestError,
        match=r"'widths\[\d\].train_steps\[\d\].file.target_inputs.digits/digit' names graph "
        r"input 'y_missing', which '[^']+' does not have \(inputs: ",
    ):
        ec.train(*digits(4, ("digits/digit",))[1:])


def test_input_shape_contradicting_the_backbone(copy: Path, tmp_path: Path, capsys) -> None:
    """input_shape [1, 8, 9] against an (8, 8) backbone was blamed on the input ("x has
    shape"); it is the manifest that contradicts itself."""

    def edit(m: dict) -> None:
        for n in (m["normalisation"], *(c["normalisation"] for c in m["clients"])):
            n["input_shape"] = [1, 8, 9]

    _edit_manifest(copy, edit)
    match = (r"'clients\[0\].normalisation.input_shape' is \[1, 8, 9\], but widths\[\d\].backbone "
             r"\('[^']+'\) input 'x' has shape \['batch', 1, 8, 8\]")  # fmt: skip
    with pytest.raises(ManifestError, match=match):
        load_manifest(copy)
    assert re.search(match, _err(capsys, ["predict", str(copy), *P_C00, _x_npy(tmp_path)]))


@pytest.mark.parametrize("opt", ["--epochs", "--batch-size"])
def test_zero_steps_refused(bundle: Path, tmp_path: Path, capsys, opt: str) -> None:
    """--epochs 0 exited 0, wrote an untrained update and printed 'loss nan'."""
    out = tmp_path / "u.safetensors"
    err = _err(capsys, _train(bundle, tmp_path, out, opt, "0"))
    assert f"{opt} must be >= 1 (there would be no training step), got 0" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local.npz"]
    x, ys = digits(4, ("digits/digit",))[1:]
    for kw in ({"epochs": 0}, {"steps": 0}, {"epochs": 0, "head_only": True}):
        with pytest.raises(InputError, match="give no training step"):
            EdgeClient(bundle, "c00").train(x, ys, **kw)


def test_option_errors_name_the_option(bundle: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "u.safetensors"
    for v in ("nan", "inf", "0", "-1"):
        err = _err(capsys, _train(bundle, tmp_path, out, "--lr", v))
        assert f"--lr must be a finite number > 0, got {float(v):g}" in err
    err = _err(capsys, _train(bundle, tmp_path, out, "--seed", "-1"))
    assert "--seed must be >= 0, got -1" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local.npz"]


@pytest.mark.parametrize(
    "bad, what",
    [
        (lambda d: d.update(x=d["x"][:, :, :7]), r"x has shape \(12, 1, 8, 7\)"),
        (lambda d: d.update(x=d["x"].astype(np.float64)), "x has dtype float64"),
        (
            lambda d: d["y__digits__digit"].__setitem__(0, 10),
            r"targets\['digits/digit'\] has class ids",
        ),  # fmt: skip
    ],
    ids=["shape", "dtype", "labels"],
)
def test_data_errors_name_the_file(bundle: Path, tmp_path: Path, capsys, bad, what: str) -> None:
    p = _data(tmp_path)
    with np.load(p) as z:
        d = {k: z[k] for k in z.files}
    bad(d)
    np.savez(p, **d)
    out = tmp_path / "u.safetensors"
    argv = ["train", str(bundle), "--client", "c00", "--data", str(p), "--out", str(out)]
    err = _err(capsys, argv)
    assert re.search(f"error: --data {re.escape(str(p))}: {what}", err), err


def test_manifest_not_an_object_names_the_file(copy: Path) -> None:
    (copy / "manifest.json").write_text("[1, 2]")
    with pytest.raises(
        ManifestError,
        match=f"{re.escape(str(copy / 'manifest.json'))}: the manifest must be a JSON object, got list",  # fmt: skip
    ):
        load_manifest(copy)


def test_start_from_past_the_magnitude_bound(bundle: Path, tmp_path: Path, capsys) -> None:
    """--start-from holding 3e38 trained and wrote an update the server rejects."""
    ec = EdgeClient(bundle, "c00")
    server = {k: ec.base_state()[k].copy() for k in ec.shared_keys}
    server["backbone.layers.3.bias"][0] = 3e38
    save_file(server, tmp_path / "g.safetensors")
    out = tmp_path / "u.safetensors"
    argv = _train(bundle, tmp_path, out, "--start-from", str(tmp_path / "g.safetensors"))
    err = _err(capsys, argv)
    bound = float(np.sqrt(np.float64(np.finfo(np.float32).max)))
    assert f"key 'backbone.layers.3.bias' has |x| 3e+38, past the bound sqrt(finfo.max) = {bound:.3g}" in err  # fmt: skip
    assert not out.exists()
