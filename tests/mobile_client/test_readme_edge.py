"""The README's ``fmtl-edge`` commands, as written, against a real exported bundle.

The fixture makes, in a temp working directory, what the README's commands name: a
run of the demo's client layout (``runs/demo``: clients c00-c08, c06 with
``mnist/attrs`` at width 0.25, a small MLP, one round), its export ``bundles/demo``,
the inputs ``digit.png`` and ``more.npy`` (real MNIST test images), the client's data
``local.npz`` and the server's state ``global.safetensors`` (the run's last
checkpoint, full width: ``train`` cuts it to c06's width). Every ``fmtl-edge`` line of
the README's bash blocks then runs verbatim (in process, through ``mobile_client.cli.main``).
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

from mobile_client.cli import main
from mobile_client.runtime import EdgeClient
from mobile_client.safetensors_np import load_file
from tests.test_readme_commands import readme_commands

DEMO_LIKE = {
    "name": "demo",
    "seed": 0,
    "data": {"samples_per_client": 40, "test_fraction": 0.5},
    "model": {"family": "mlp", "hidden": [32, 32], "norm": "none"},
    "clients": [
        {"count": 3, "tasks": ["mnist/digit"], "width": 1.0},
        {"count": 3, "tasks": ["mnist/parity", "mnist/ge5"], "width": 0.5},
        {"count": 3, "tasks": ["mnist/attrs"], "width": 0.25},
    ],
    "algorithm": {"name": "fedper", "slicing": "heterofl"},
    "federation": {"rounds": 1, "local_steps": 2, "batch_size": 8},
    "compare_local": False,
}


def _png(px: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(px, "L").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.run_export import export_run
    from fmtl_lightning.checkpoint import completed_rounds, round_dir
    from fmtl_lightning.data import load_dataset
    from fmtl_lightning.simulation import run_config
    from fmtl_lightning.tasks import get_task

    root = tmp_path_factory.mktemp("readme-edge")
    run = root / "runs" / "demo"
    run_config(DEMO_LIKE, run, progress=False)
    export_run(run, root / "bundles" / "demo", widths=[0.25], clients=["c06"])
    ds = load_dataset("mnist", "test")
    px = np.asarray(ds.images[:40], dtype=np.uint8)  # (40, 28, 28)
    (root / "digit.png").write_bytes(_png(px[0]))
    np.save(root / "more.npy", px[1:4])
    attrs = get_task("mnist/attrs").target(np.asarray(ds.labels[:40]))
    np.savez(root / "local.npz", x=px, y__mnist__attrs=attrs)
    last = completed_rounds(run)[-1]
    shutil.copy(round_dir(run, last) / "global.safetensors", root)  # full width
    return root


@pytest.mark.slow  # a run and an export
def test_readme_edge_commands_verbatim(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    lines = readme_commands("fmtl-edge")
    assert [shlex.split(c)[1] for c in lines] == ["info", "predict", "train"], lines
    monkeypatch.chdir(workdir)
    outs = {}
    for line in lines:
        argv = shlex.split(line)
        capsys.readouterr()
        code = main(argv[1:])
        out, err = capsys.readouterr()
        assert code == 0, f"{line}\n{err}"
        outs[argv[1]] = out

    assert "widths that fit 64 MB: 0.25\n" in outs["info"]  # measured at export
    # predict: one row per image, the labels the Python API gives for the same pixels
    ec = EdgeClient(workdir / "bundles" / "demo", "c06")
    from PIL import Image

    px = np.concatenate(
        [np.asarray(Image.open(workdir / "digit.png"))[None], np.load(workdir / "more.npy")]
    )
    logits = ec.predict("mnist/attrs", px)
    rows = [r.split("\t") for r in outs["predict"].strip().splitlines()]
    labels = ec.head("mnist/attrs").labels
    assert len(rows) == 5 and labels == ("ge5", "odd", "has_closed_loop")
    assert rows[0] == ["input", "mnist/attrs (labels with p > 0.5, comma-separated)",
                       "ge5 odd has_closed_loop"]  # fmt: skip
    want = [",".join(lb for lb, z in zip(labels, row, strict=True) if z > 0) or "-"
            for row in logits]  # fmt: skip
    assert [r[1] for r in rows[-4:]] == want
    assert [r[0] for r in rows[-4:]] == ["digit.png"] + [f"more.npy[{i}]" for i in range(3)]
    probs = np.array([[float(v) for v in r[2].split()] for r in rows[-4:]])
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits)), atol=1e-4)

    # train: the update holds c06's shared keys at width 0.25, and the round given
    arrays, meta = load_file(workdir / "update.safetensors")
    assert sorted(arrays) == sorted(ec.shared_keys)
    for k in ec.shared_keys:
        assert arrays[k].shape == ec.base_state()[k].shape
    assert meta["client_id"] == "c06" and meta["round"] == "3"
    assert (workdir / "update.local.safetensors").is_file()
