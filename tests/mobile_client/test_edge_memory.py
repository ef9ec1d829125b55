"""The per-width memory ``fmtl export`` measures (:mod:`mobile_client.memory`), its
manifest record (checked on load; manifests without it still load) and ``info``'s use."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mobile_client.cli import main, memory_estimate
from mobile_client.errors import ManifestError
from mobile_client.manifest import load_manifest


def test_export_measures_every_width(mlp_export) -> None:
    m = load_manifest(mlp_export[1])
    for w in m.widths:
        mem = w.memory
        assert mem is not None and mem.batch == 32
        assert m.client(mem.client).width == w.width  # measured with a client of the width
        assert 20 << 20 < mem.runtime_bytes < 1 << 30  # python + numpy + onnxruntime
        assert 0 < mem.predict_bytes <= mem.train_bytes < 1 << 30  # the peak only grows


def _without_memory(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "old"
    shutil.copytree(bundle, copy)
    d = json.loads((copy / "manifest.json").read_text())
    for w in d["widths"]:
        del w["memory"]
    (copy / "manifest.json").write_text(json.dumps(d))
    return copy


def test_old_manifest_falls_back_to_the_estimate(mlp_export, tmp_path: Path, capsys) -> None:
    old = _without_memory(mlp_export[1], tmp_path)
    m = load_manifest(old)
    assert all(w.memory is None for w in m.widths)
    we = m.width(0.5)
    files = {we.backbone.path} | {h.file.path for h in m.heads if h.width == 0.5}
    size = sum((old / p).stat().st_size for p in files)
    assert memory_estimate(m, old, 0.5) == 2 * size + 4 * 4 * 32 * (64 + we.feature_dim)
    assert main(["info", str(old), "--memory-mb", "64"]) == 0
    out = capsys.readouterr().out
    assert "(not measured at export)" in out and "widths that fit 64 MB: 1, 0.5" in out
    assert "runtime (Python" not in out


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda mem: mem.update(client="c01"), r"widths\[0\]\.memory\.client': 'c01' is not"),
        (lambda mem: mem.update(train_bytes=-1), r"widths\[0\]\.memory\.train_bytes' is out"),
        (lambda mem: mem.update(batch=0), r"widths\[0\]\.memory\.batch' is out of range"),
        (lambda mem: mem.pop("predict_bytes"), r"widths\[0\]\.memory\.predict_bytes' is missing"),
        (lambda mem: mem.update(runtime_bytes=1.5), r"runtime_bytes' must be int"),
    ],
)
def test_memory_record_is_checked(mlp_export, tmp_path: Path, edit, match: str) -> None:
    d = json.loads((mlp_export[1] / "manifest.json").read_text())
    assert d["widths"][0]["width"] == 1.0 and d["widths"][0]["memory"]["client"] == "c00"
    edit(d["widths"][0]["memory"])
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=match):
        load_manifest(tmp_path)
