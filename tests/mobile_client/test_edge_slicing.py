"""``fmtl-edge train --start-from`` a full-width server checkpoint: the device cuts it to
its width with numpy alone (:mod:`mobile_client.slicing`, from the manifest's ``slicing``
record), exactly as the server engine does (``fmtl_lightning.slicing.slice_state``, what
``ServerEngine.assign`` sends a client)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from export.bundle import slicing_record
from fmtl_lightning.roles import ModelSpec, ParamSpec, WidthSpec
from fmtl_lightning.slicing import slice_state
from mobile_client.cli import main
from mobile_client.errors import InputError, ManifestError
from mobile_client.manifest import load_manifest
from mobile_client.runtime import EdgeClient
from mobile_client.safetensors_np import load_file, save_file
from mobile_client.slicing import Slicing

WIDTHS = (1.0, 0.5, 0.3, 0.25, 0.1)
ROUNDS = (0, 1, 7, 199)


def _builtin_spec(family: str) -> ModelSpec:
    from tests.export.export_helpers import make_model

    return make_model(family, "batch" if family != "mlp" else "none", 1.0).role_spec("fedper")


def _cat_spec() -> ModelSpec:
    """A hand-made spec: a concatenated group (a:3, an unscaled 2, b:5) and a flattened map."""
    return ModelSpec(
        groups={"a": 3, "b": 5, "cat": 10},
        params=(
            ParamSpec("l1.weight", "backbone", (3, 4), ("a", None)),
            ParamSpec("l2.weight", "backbone", (5, 3), ("b", "a")),
            ParamSpec("fc.weight", "backbone", (7, 40), (None, "cat"), blocks=(1, 4)),
            ParamSpec("fc.bias", "backbone", (7,), (None,)),
        ),
        segments={"cat": (("a", 3), (None, 2), ("b", 5))},
    )


def _random_state(spec: ModelSpec, keys) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(spec[k].shape).astype(spec[k].dtype) for k in keys}


@pytest.mark.parametrize("which", ["mlp", "cnn", "fedavgcnn", "concat"])
@pytest.mark.parametrize("mode", ["heterofl", "fedrolex"])
def test_device_slice_equals_the_engines(which: str, mode: str) -> None:
    spec = _cat_spec() if which == "concat" else _builtin_spec(which)
    keys = [k for k in spec.shared_keys() if spec[k].is_float]
    full = _random_state(spec, keys)
    # through the manifest's JSON, as a device reads it
    record = json.loads(json.dumps({"s": slicing_record(spec, mode, keys)}, default=vars))["s"]
    dev = Slicing.from_dict(record)
    for w in WIDTHS:
        for r in ROUNDS:
            want = slice_state(full, spec, WidthSpec(w, mode, r))
            got = dev.slice_state(full, w, r, "test")
            assert list(got) == list(want)
            for k in want:
                assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), (k, w, r)
            # a state already at the width is kept as is
            again = dev.slice_state(want, w, r, "test")
            assert all(again[k] is want[k] for k in want)


def test_train_from_a_full_width_checkpoint(mlp_export, tmp_path: Path, capsys) -> None:
    """c01 (width 0.5) from the run's last global.safetensors (full width) trains exactly as
    from the engine's slice of it; a shape that is neither is refused naming the key."""
    from fmtl_lightning.checkpoint import completed_rounds, round_dir

    run, bundle = mlp_export
    last = completed_rounds(run)[-1]
    ckpt = round_dir(run, last) / "global.safetensors"
    full, md = load_file(ckpt)
    spec = ModelSpec.from_json((run / "spec.json").read_text())
    sliced = slice_state(full, spec, WidthSpec(0.5, "heterofl", last))
    save_file(sliced, tmp_path / "sliced.safetensors", md)
    shutil.copy(ckpt, tmp_path / "global.safetensors")
    ec = EdgeClient(bundle, "c01")
    x = np.zeros((6, 8, 8), np.uint8)
    x[:, 2:6, 3:5] = 200
    np.savez(tmp_path / "d.npz", x=x, y__digits__parity=np.array([0, 1] * 3),
             y__digits__attrs=np.zeros((6, 3), np.float32))  # fmt: skip
    outs = {}
    for name in ("global", "sliced"):
        out = tmp_path / f"u_{name}.safetensors"
        argv = ["train", str(bundle), "--client", "c01", "--data", str(tmp_path / "d.npz"),
                "--start-from", str(tmp_path / f"{name}.safetensors"), "--out", str(out)]  # fmt: skip
        assert main(argv) == 0, capsys.readouterr().err
        outs[name] = load_file(out)
    assert sorted(outs["global"][0]) == sorted(ec.shared_keys)
    for k in ec.shared_keys:
        assert np.array_equal(outs["global"][0][k], outs["sliced"][0][k]), k
    assert outs["global"][1] == outs["sliced"][1]  # same base hash, round, metrics
    k0 = ec.shared_keys[0]
    with pytest.raises(InputError, match=rf"key {k0!r} has shape \(3,"):
        ec.slice_global({k0: np.zeros((3,) * full[k0].ndim, np.float32)})


def test_old_manifest_without_slicing(mlp_export, tmp_path: Path) -> None:
    """A manifest without ``slicing`` (older exports) still loads; a full-width state then
    says what is missing instead of a bare shape mismatch."""
    from fmtl_lightning.checkpoint import completed_rounds, round_dir

    run, bundle = mlp_export
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    assert m["slicing"]["mode"] == "heterofl"
    del m["slicing"]
    (copy / "manifest.json").write_text(json.dumps(m))
    assert load_manifest(copy).slicing is None
    full, _ = load_file(round_dir(run, completed_rounds(run)[-1]) / "global.safetensors")
    with pytest.raises(InputError, match="manifest has no 'slicing' record"):
        EdgeClient(copy, "c01").slice_global(full)


def test_manifest_slicing_is_checked(mlp_export, tmp_path: Path) -> None:
    bundle = mlp_export[1]
    m = json.loads((bundle / "manifest.json").read_text())
    key = next(iter(m["slicing"]["keys"]))
    bad = json.loads(json.dumps(m))
    bad["slicing"]["keys"][key]["shape"][0] += 1
    with pytest.raises(ManifestError, match=rf"slicing\.keys\.{key}\.shape\[0\]"):
        load_manifest_dict(bad, tmp_path)
    bad = json.loads(json.dumps(m))
    bad["slicing"]["mode"] = "random"
    with pytest.raises(ManifestError, match="slicing.mode"):
        load_manifest_dict(bad, tmp_path)


def load_manifest_dict(d: dict, tmp_path: Path):
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    return load_manifest(tmp_path)
