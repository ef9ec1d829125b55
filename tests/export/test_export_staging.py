"""Export staging directories: an export killed with kill -9 leaves its temp dir behind; the
next export to the same place removes it, and never the temp dir of a running export."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from export.bundle import build_atomically

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import sys, time
from pathlib import Path
from export.bundle import build_atomically

def build(staging):
    (staging / "backbone_w1.onnx").write_bytes(b"x" * 4096)
    print(staging, flush=True)
    time.sleep(120)

build_atomically(Path(sys.argv[1]), False, build)
"""


def test_killed_export_staging_is_swept_by_the_next_export(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        staging = Path(child.stdout.readline().strip())  # type: ignore[union-attr]
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert staging.is_dir() and staging.name.startswith(f".bundle.tmp-{child.pid}-")
    assert not out.exists()
    running = tmp_path / f".bundle.tmp-{os.getpid()}-busy"  # an export still running (us)
    running.mkdir()
    other = tmp_path / ".other.tmp-1-x"  # another output's staging: not ours to touch
    other.mkdir()

    build_atomically(out, False, lambda st: (st / "manifest.json").write_text("{}"))

    assert not staging.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["bundle", running.name, other.name]
    )
    assert [p.name for p in out.iterdir()] == ["manifest.json"]
