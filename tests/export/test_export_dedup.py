"""``fmtl export`` writes each distinct head / head-step graph once and the rest from it
(:class:`export.graph_cache.GraphCache`): the bundle is the one a separate export per
client writes, byte for byte; progress says which; torch.onnx's known noise is dropped."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest

from export.graph_cache import HARMLESS_LOGS, quiet_export
from export.run_export import export_run
from mobile_client.manifest import sha256_file

CFG = {
    "name": "tiny-dedup",
    "seed": 0,
    "data": {"samples_per_client": 30},
    "model": {"family": "mlp", "hidden": [8, 6], "norm": "none"},
    "clients": [
        {"count": 2, "tasks": ["digits/digit"], "width": 1.0},  # c00, c01: same head shapes
        {"count": 1, "tasks": ["digits/parity", "digits/ge5"], "width": 0.5},  # both [2, F]
    ],
    "algorithm": {"name": "fedper"},
    "federation": {"rounds": 1},
    "compare_local": False,
}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[str]]]:
    from fmtl_lightning.simulation import run_config

    root = tmp_path_factory.mktemp("dedup")
    run_config(CFG, root / "run", progress=False)
    out = {}
    for name, dedup in (("dedup", True), ("each", False)):
        lines: list[str] = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            b = export_run(root / "run", root / name, progress=lines.append, dedup=dedup)
        out[name] = (b, lines, [str(w.message) for w in caught])
    return out


def _manifest(bundle: Path) -> dict:
    m = json.loads((bundle / "manifest.json").read_text())
    del m["created"]
    for w in m["widths"]:
        w.pop("memory")  # measured: differs from process to process
    return m


@pytest.mark.slow  # a run and two exports
def test_dedup_writes_the_same_bundle(bundles) -> None:
    (a, lines_a, _), (b, lines_b, _) = bundles["dedup"], bundles["each"]
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert not [f for f in files if f.startswith(".") or f.startswith("g")]  # no cache left
    for f in files:
        if f != "manifest.json":
            assert sha256_file(a / f) == sha256_file(b / f), f
    assert _manifest(a) == _manifest(b)
    # heads: c00 exported, c01 the same graph with its own weights; parity exported, ge5
    # the same graph (both [2, 3]); head steps likewise copied
    written = {ln.split()[2]: ln.split("(", 1)[1] for ln in lines_a if " s  " in ln}
    assert written["head_c00_digits_digit.onnx"] == "exported)"
    assert written["head_c01_digits_digit.onnx"].startswith("same graph as an earlier one, its own")
    assert written["head_step_c01_digits_digit.onnx"].startswith(
        "same graph as an earlier one: copied"
    )
    assert written["head_step_c02_digits_ge5.onnx"].startswith(
        "same graph as an earlier one: copied"
    )
    assert written["backbone_w0.5.onnx"] == "exported)"
    assert lines_a[-1].startswith("8 graphs exported, 4 written from an earlier export")
    assert lines_b[-1].startswith("12 graphs exported, 0 written from an earlier export")


@pytest.mark.slow
def test_export_drops_only_the_known_noise(bundles) -> None:
    for _, _, caught in bundles.values():
        assert not [m for m in caught if "LeafSpec" in m or "The axis name: batch" in m], caught


def test_quiet_export_is_specific(caplog: pytest.LogCaptureFixture) -> None:
    name = next(iter(HARMLESS_LOGS))
    log = logging.getLogger(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_export():
            _warn_and_log(log, name, caplog)
    assert [str(w.message) for w in caught] == ["something else is deprecated",
                                                "# The axis name: seq will not be used"]  # fmt: skip
    assert [r.getMessage() for r in caplog.records] == ["another registry problem"]
    assert not log.filters  # removed on exit


def _warn_and_log(log: logging.Logger, name: str, caplog: pytest.LogCaptureFixture) -> None:
    """The two harmless warnings and log line, and one of each that is not."""
    warnings.warn(
        "`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=2
    )
    warnings.warn("# The axis name: batch will not be used, since it shares the same shape "
                  "constraints with another axis: batch.", UserWarning, stacklevel=2)  # fmt: skip
    warnings.warn("something else is deprecated", FutureWarning, stacklevel=2)
    warnings.warn("# The axis name: seq will not be used", UserWarning, stacklevel=2)
    with caplog.at_level(logging.WARNING, logger=name):
        log.warning("torchvision is not installed. Skipping torchvision::nms")
        log.warning("another registry problem")
