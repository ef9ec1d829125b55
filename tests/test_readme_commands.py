"""The README's `fmtl simulate` commands, as written, in a fresh clone without $FMTL_DATA_DIR.

`make setup` fetches the datasets into the checkout's `.data/`; every command run from
that checkout must read them there, and a missing dataset must name a command that
fills the dir the commands read. The clone's `.data` links to the data this test
session uses (what `make setup` would have fetched), so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fmtl_lightning.data import resolve_data_dir

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--rounds", "2"]  # a documented flag of `fmtl simulate`; the demo config has 60


def readme_commands(prefix: str) -> list[str]:
    """Lines of the README's ```bash blocks that start with ``prefix``, comments removed."""
    text = (REPO / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith(prefix):
                lines.append(line)
    return lines


def _run(line: str, clone: Path, extra: list[str] = ()) -> subprocess.CompletedProcess:
    argv = shlex.split(line)
    assert argv[0] == "fmtl", line  # the console script is `fmtl_lightning.cli:main`
    env = {k: v for k, v in os.environ.items() if k != "FMTL_DATA_DIR"}
    env["PYTHONPATH"] = str(clone)  # the clone's code, not an installed copy
    cmd = [sys.executable, "-m", "fmtl_lightning.cli", *argv[1:], *extra]
    return subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def clone(tmp_path) -> Path:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    dest = tmp_path / "fmtl-lightning"
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    subprocess.run(["git", "-C", str(dest), "checkout", "-q", head], check=True)
    return dest


@pytest.mark.slow
def test_readme_simulate_commands_in_a_fresh_clone(clone):
    simulate = readme_commands("fmtl simulate")
    assert [c.split()[2] for c in simulate] == ["--config", "--resume"], simulate
    first, resume = simulate
    makefile = (clone / "Makefile").read_text()
    assert not re.search(r"^[^#]*FMTL_DATA_DIR", makefile, flags=re.M), "make has its own data dir"

    # before setup: one line naming the dir the commands read and a command that fills it
    res = _run(first, clone, QUICK)
    assert res.returncode == 2, res.stderr[-2000:]
    err = res.stderr.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    assert f"not in the data dir {clone / '.data'} " in err, err
    assert f"`make data` (in {clone})" in err, err
    fetch = re.findall(r"`([^`]*-m fmtl_lightning\.data\.fetch[^`]*)`", err)
    assert len(fetch) == 1, err

    # "make setup" (the data this session already has), then the named command agrees
    (clone / ".data").symlink_to(resolve_data_dir(), target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "FMTL_DATA_DIR"}
    env["PYTHONPATH"] = str(clone)
    got = subprocess.run(
        shlex.split(fetch[0]), cwd=clone, env=env, capture_output=True, text=True, check=True
    )
    assert got.stdout.strip() == f"mnist: cached, 4 files verified in {clone / '.data' / 'mnist'}"

    # the README's commands, as written
    res = _run(first, clone, QUICK)
    assert res.returncode == 0, res.stderr[-2000:]
    run_dir = clone / shlex.split(first)[shlex.split(first).index("--run-dir") + 1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and len(summary["clients"]) == 9
    assert set(summary["local_baseline"]["clients"]) == set(summary["clients"])
    res2 = _run(resume, clone)
    assert res2.returncode == 0, res2.stderr[-2000:]
    assert json.loads((run_dir / "summary.json").read_text())["mean_acc"] == summary["mean_acc"]
    table = res.stdout.split("\nrun directory:")[0].strip().splitlines()[-11:]
    assert table == res2.stdout.split("\nrun directory:")[0].strip().splitlines()[-11:]
