"""Export reads a run directory through RunArtifacts: no Simulation, no dataset."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from export.bundle import RunExportError
from export.run_export import export_run

CFG = {
    "name": "artifacts",
    "seed": 1,
    "data": {"samples_per_client": 30, "test_fraction": 0.25, "partition": {"kind": "iid"}},
    "model": {"family": "mlp", "hidden": [8], "norm": "none"},
    "clients": [
        {"count": 1, "tasks": ["mnist/digit"], "width": 1.0},
        {"count": 1, "tasks": ["mnist/parity", "mnist/attrs"], "width": 0.5},
    ],
    "algorithm": {"name": "fedper"},
    "federation": {"rounds": 1, "local_epochs": 1, "batch_size": 16},
    "optimizer": {"name": "sgd", "lr": 0.1},
    "compare_local": False,
}


def _simulate(cfg: dict, run_dir: Path):
    from fmtl_lightning.config import parse_config
    from fmtl_lightning.simulation import Simulation

    sim = Simulation(parse_config(cfg), run_dir, progress=False)
    sim.run()
    return sim


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory: pytest.TempPathFactory):
    from fmtl_lightning.data import load_dataset

    try:
        ds = load_dataset("mnist", "train")
    except Exception as exc:  # noqa: BLE001 - the dataset cache is optional
        pytest.skip(f"MNIST is not cached: {exc}")
    run_dir = tmp_path_factory.mktemp("art") / "run"
    sim = _simulate(copy.deepcopy(CFG), run_dir)
    return run_dir, sim, (float(ds.mean), float(ds.std))


@pytest.mark.slow  # exports four graphs
def test_export_run_needs_no_dataset(mnist_run, tmp_path, monkeypatch) -> None:
    from fmtl_lightning.data import load_dataset

    run_dir, _, (mean, std) = mnist_run
    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.setenv("FMTL_DATA_DIR", str(empty))
    with pytest.raises(Exception, match="mnist"):  # the dataset is really not there
        load_dataset("mnist", "train")
    out = export_run(run_dir, tmp_path / "bundle", widths=[1.0])
    m = json.loads((out / "manifest.json").read_text())
    assert [c["client"] for c in m["clients"]] == ["c00"]
    norm = m["clients"][0]["normalisation"]
    assert (norm["mean"], norm["std"], norm["domain"]) == (mean, std, "mnist")  # exact floats
    assert m["normalisation"]["mean"] == mean


def test_export_run_without_normalisation_file_is_a_typed_error(mnist_run, tmp_path) -> None:
    import shutil

    run_dir, _, _ = mnist_run
    old = tmp_path / "old_run"
    shutil.copytree(run_dir, old)
    (old / "normalisation.json").unlink()
    with pytest.raises(RunExportError, match=r"normalisation\.json is missing"):
        export_run(old, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
    (old / "normalisation.json").write_text('{"image_size": 28, "domains": {"mnist": {"mean": 0}}}')
    with pytest.raises(RunExportError, match=r"normalisation\.json is malformed"):
        export_run(old, tmp_path / "bundle")
