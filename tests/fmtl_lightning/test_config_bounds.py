"""Configs that cannot run are refused by the validator, naming the field (issue 16, defects
9-11): out-of-range seeds and sizes, non-finite numbers, run names that escape runs/, and
empty or truncated config files. Run-directory files are written atomically."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import pytest
import yaml

from fmtl_lightning.config import ConfigError, load_config, parse_config


def _set(cfg: dict, path: str, value) -> dict:
    *parents, last = path.split(".")
    d = cfg
    for p in parents:
        d = d[int(p)] if isinstance(d, list) else d.setdefault(p, {})
    if isinstance(d, list):
        d[int(last)] = value
    else:
        d[last] = value
    return cfg


@pytest.mark.parametrize(
    "path, value, field",
    [
        ("seed", -1, "seed: must be in [0, 4294967295], got -1"),
        ("seed", 2**70, "seed: must be in [0, 4294967295]"),
        ("model.hidden", [10**9], "model.hidden[0]: must be in [1, 4096], got 1000000000"),
        ("model.hidden", [4096] * 8, "model.hidden: [4096, 4096, 4096"),
        ("clients.0.count", 10**9, "clients[0].count: must be in [1, 10000], got 1000000000"),
        ("clients.0.count", 1e9, "clients[0].count: expected an integer, got 1000000000.0"),
        ("optimizer.lr", math.inf, "optimizer.lr: expected a finite number, got inf"),
        ("optimizer.momentum", math.nan, "optimizer.momentum: expected a finite number, got nan"),
        ("optimizer.momentum", 1.5, "optimizer.momentum: must be in [0, 1), got 1.5"),
        ("federation.rounds", 1e30, "federation.rounds: expected an integer, got 1e+30"),
        ("federation.rounds", 10**30, "federation.rounds: must be in [1, 1000000]"),
        ("federation.batch_size", 2**62, "federation.batch_size: must be in [1, 1000000]"),
        ("federation.local_epochs", 10**12, "federation.local_epochs: must be in [0, 10000]"),
        ("data.samples_per_client", 10**12, "data.samples_per_client: must be in [4, 10000000]"),
        ("data.partition.alpha", math.inf, "data.partition.alpha: expected a finite number"),
        ("clients.0.lam", -math.inf, "clients[0].lam: expected a finite number"),
        (
            "algorithm.dynamic_widths",
            [0.5, math.nan],
            "algorithm.dynamic_widths[1]: expected a finite",
        ),
        ("name", "../../x", "name: '../../x' is not a valid run name"),
        ("name", "a/b", "name: 'a/b' is not a valid run name"),
        ("name", "..", "name: '..' is not a valid run name"),
        ("name", "", "name: '' is not a valid run name"),
    ],
)
def test_refused_naming_the_field(small_cfg, path: str, value, field: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(_set(small_cfg, path, value))
    assert field in str(ei.value)


def test_bounds_also_hold_for_configs_built_in_python(small_cfg) -> None:
    """validate_config checks a RunConfig made without YAML (replace) too."""
    from fmtl_lightning.config import OptimizerConfig, validate_config

    cfg = parse_config(small_cfg)
    for bad, field in [
        (cfg.replace(seed=-1), "seed"),
        (cfg.replace(optimizer=OptimizerConfig(lr=math.inf)), "optimizer.lr"),
        (cfg.replace(name="../x"), "name"),
    ]:
        with pytest.raises(ConfigError, match=f"^{field}"):
            validate_config(bad)


def test_valid_edges_still_accepted(small_cfg) -> None:
    for path, value in [("seed", 2**32 - 1), ("seed", 0), ("name", "run-1_b.2"),
                        ("optimizer.momentum", 0.9), ("model.hidden", [512, 256])]:  # fmt: skip
        parse_config(_set(copy.deepcopy(small_cfg), path, value))


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n"])
def test_empty_config_file_names_the_file(tmp_path: Path, text: str) -> None:
    """An empty (truncated) config.yaml said 'at least one client group is required'."""
    p = tmp_path / "config.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=f"config file '{p}' is empty"):
        load_config(p)


def test_truncated_and_unreadable_config_files(tmp_path: Path, small_cfg) -> None:
    p = tmp_path / "config.yaml"
    full = yaml.safe_dump(small_cfg, sort_keys=False)
    p.write_text(full[: full.index("clients:")])  # cut before the clients
    with pytest.raises(ConfigError, match=f"config file '{p}': clients: at least one"):
        load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=f"config file '{p}': expected a mapping of fields"):
        load_config(p)
    p.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match=f"config file '{p}' is not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match=f"config file '{tmp_path}' cannot be read"):
        load_config(tmp_path)  # a directory


def test_resume_with_empty_config_gives_one_line(tmp_path: Path, capsys) -> None:
    from fmtl_lightning.cli import main

    (tmp_path / "config.yaml").write_text("")
    assert main(["simulate", "--no-progress", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"fmtl: error: config file '{tmp_path / 'config.yaml'}' is empty (or truncated before any field)\n"  # fmt: skip


def test_run_dir_files_are_replaced_atomically(small_cfg, tmp_path: Path, monkeypatch) -> None:
    """A crash while writing config.yaml leaves the old file whole (it was truncated first)."""
    from fmtl_lightning.simulation import Simulation

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("old: complete\n")
    sim = Simulation(parse_config(small_cfg), run, progress=False)
    real = os.replace

    def crash(src, dst):
        if Path(dst).name == "config.yaml":
            raise OSError("killed while writing")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed while writing"):
        sim.run()
    assert (run / "config.yaml").read_text() == "old: complete\n"
    live = sim.pool.stores.root  # the pool's client states (removed when it closes)
    left = sorted(p.name for p in run.iterdir() if p != live)
    assert left == ["config.yaml"]  # no temp file left
    monkeypatch.setattr(os, "replace", real)
    writes: list[str] = []
    monkeypatch.setattr(os, "replace", lambda s, d: (writes.append(Path(d).name), real(s, d)))
    short = sim.cfg.replace(federation=sim.cfg.federation.__class__(rounds=1, batch_size=16))
    Simulation(short, run, progress=False, federation=sim.fed).run()
    for name in ("config.yaml", "spec.json", "federation.txt", "metrics.csv", "summary.json"):
        assert name in writes, name
    assert load_config(run / "config.yaml").federation.rounds == 1
