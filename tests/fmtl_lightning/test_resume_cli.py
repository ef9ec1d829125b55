"""`fmtl simulate` as a real process: kill it between rounds, resume, compare."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from fmtl_lightning.checkpoint import completed_rounds, read_round
from fmtl_lightning.config import ConfigError
from fmtl_lightning.simulation import Simulation

ROUNDS = 12


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fmtl_lightning.cli", "simulate", "--no-progress", *args]


@pytest.fixture
def cfg_file(small_cfg, tmp_path):
    small_cfg["federation"]["rounds"] = ROUNDS
    small_cfg["algorithm"] = {"name": "ditto", "lam": 0.5}  # global + personal state both resume
    small_cfg["federation"]["fraction"] = 0.67  # sampling must replay too
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(small_cfg))
    return p


def _final_arrays(run_dir):
    ck = run_dir / "checkpoints" / f"round_{ROUNDS:04d}"
    out = {f"global/{k}": v for k, v in load_file(str(ck / "global.safetensors")).items()}
    for f in sorted((ck / "clients").glob("*.safetensors")):
        out.update({f"{f.stem}/{k}": v for k, v in load_file(str(f)).items()})
    return out


def test_killed_run_resumes_to_the_identical_result(cfg_file, tmp_path):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    proc = subprocess.Popen(_cmd("--config", str(cfg_file), "--run-dir", str(killed)))
    deadline = time.time() + 120
    while completed_rounds(killed)[-1:] < [3] and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = completed_rounds(killed)
    assert 3 <= done[-1] < ROUNDS, f"kill landed outside the run: {done}"
    # retention (default: the last round) is on; a kill between a write and its prune
    # leaves the round before too
    assert len(done) <= 2 and done == list(range(done[-1] - len(done) + 1, done[-1] + 1))
    assert not (killed / "summary.json").exists()

    subprocess.run(_cmd("--resume", str(killed)), check=True, capture_output=True)
    subprocess.run(
        _cmd("--config", str(cfg_file), "--run-dir", str(straight)), check=True, capture_output=True
    )
    assert completed_rounds(killed) == completed_rounds(straight) == [ROUNDS]
    a, b = _final_arrays(killed), _final_arrays(straight)
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert (killed / "metrics.csv").read_text() == (straight / "metrics.csv").read_text()
    assert len((killed / "metrics.csv").read_text().splitlines()) == 1 + ROUNDS * 4


@pytest.mark.parametrize(
    "edit,field",
    [
        (lambda c: c["clients"][0].update(tasks=["mnist/nope"]), "clients[0].tasks"),
        (lambda c: c["clients"][1].update(width=1.5), "clients[1].width"),
        (lambda c: c["clients"][1].update(width=0), "clients[1].width"),
        (lambda c: c["data"].update(samples_per_client=2), "data.samples_per_client"),
        (lambda c: c["algorithm"].update(name="ditto", lam=-1.0), "algorithm.lam"),
        (lambda c: c["clients"][0].update(lam=-0.1), "clients[0].lam"),
        (lambda c: c["federation"].update(rounnds=3), "federation.rounnds"),
        (lambda c: c["clients"][0].update(count=100), "data.samples_per_client"),
        (lambda c: c.update(checkpoints={"keep_last": 0}), "checkpoints.keep_last"),
        (lambda c: c.update(checkpoints={"keep_every": -1}), "checkpoints.keep_every"),
    ],
)
def test_invalid_config_fails_before_training_naming_the_field(
    small_cfg, tmp_path, capsys, edit, field
):
    from fmtl_lightning.cli import main

    edit(small_cfg)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(small_cfg))
    run_dir = tmp_path / "run"
    code = main(["simulate", "--no-progress", "--config", str(p), "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert field in err and err.startswith("fmtl: error:")
    assert not (run_dir / "checkpoints").exists()


def test_run_directory_contents(small_cfg, tmp_path):
    from fmtl_lightning.simulation import run_config

    small_cfg["compare_local"] = True
    out = run_config(small_cfg, tmp_path / "r", progress=False)
    r = tmp_path / "r"
    for f in ("metrics.csv", "summary.json", "config.yaml", "spec.json", "federation.txt"):
        assert (r / f).is_file(), f
    pngs = sorted(p.name for p in (r / "plots").glob("*.png"))
    assert pngs == ["accuracy_by_round.png", "final_vs_local.png"]
    assert all((r / "plots" / p).stat().st_size > 5000 for p in pngs)
    assert completed_rounds(r) == [2] and completed_rounds(r / "local_baseline") == [2]
    accs = [c["acc"] for c in out["clients"].values()]
    assert out["mean_acc"] == pytest.approx(np.mean(accs)) and out["worst_acc"] == min(accs)
    assert set(out["local_baseline"]["clients"]) == set(out["clients"])
    assert list((r / "lightning_logs").rglob("metrics.csv")), "Lightning's CSVLogger wrote nothing"


def test_rounds_flag_overrides_the_config_and_is_validated(small_cfg, tmp_path, capsys):
    from fmtl_lightning.cli import main
    from fmtl_lightning.config import load_config

    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(small_cfg))  # rounds: 2
    run = tmp_path / "run"
    argv = ["simulate", "--no-progress", "--config", str(p), "--run-dir", str(run)]
    assert main([*argv, "--rounds", "3"]) == 0
    assert completed_rounds(run) == [3]
    assert load_config(run / "config.yaml").federation.rounds == 3  # a resume keeps it
    capsys.readouterr()
    assert main([*argv, "--overwrite", "--rounds", "0"]) == 2
    assert "federation.rounds" in capsys.readouterr().err
    # --resume --rounds takes the finished run further: as one straight 5-round run
    assert main(["simulate", "--no-progress", "--resume", str(run), "--rounds", "5"]) == 0
    assert completed_rounds(run) == [5]
    assert load_config(run / "config.yaml").federation.rounds == 5
    straight = tmp_path / "straight"
    assert main([*argv[:-1], str(straight), "--rounds", "5"]) == 0
    for got, want in zip(read_round(run, 5)[:2], read_round(straight, 5)[:2], strict=True):
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_equal(got[k], want[k], err_msg=k)
    capsys.readouterr()
    assert main(["simulate", "--resume", str(run), "--rounds", "4"]) == 2
    assert "federation.rounds: 4 is fewer than the 5 rounds" in capsys.readouterr().err
    for bad, words in (("5", "expected an integer, got '5'"), (0, "must be in [1, ")):
        with pytest.raises(ConfigError, match=re.escape(f"federation.rounds: {words}")):
            Simulation.resume(run, rounds=bad)
    assert completed_rounds(run) == [5]
