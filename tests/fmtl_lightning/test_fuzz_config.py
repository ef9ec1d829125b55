"""Hypothesis fuzzing of the config loader: random mappings, valid configs with one or more
fields replaced, and YAML files as random/mutated bytes. Each either gives a RunConfig that
satisfies the documented bounds or a ConfigError naming a field or the file; never another
exception, and the file read stays byte-identical."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fmtl_lightning.config import ConfigError, RunConfig, load_config, parse_config
from fmtl_lightning.errors import FMTLError

FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
FIELD_NAMES = ["name", "seed", "clients", "data", "model", "algorithm", "federation",
               "optimizer", "compare_local", "tasks", "count", "width", "lam", "edge",
               "hidden", "family", "norm", "rounds", "lr", "momentum", "partition", "kind",
               "alpha", "samples_per_client", "batch_size", "local_steps"]  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats()
    | st.text(max_size=10)
    | st.sampled_from(["fedper", "fedavg", "mlp", "cnn", "batch", "digits/digit", "../x", "1e9"])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=8,
)


def _parse(raw: Any) -> RunConfig | ConfigError:
    try:
        cfg = parse_config(raw)
    except ConfigError as exc:
        assert str(exc)
        return exc
    _check_bounds(cfg)
    return cfg


def _check_bounds(cfg: RunConfig) -> None:
    """What an accepted config promises (independent of how the validator checks it)."""
    assert 0 <= cfg.seed < 2**32 and "/" not in cfg.name and not cfg.name.startswith(".")
    assert 1 <= sum(g.count for g in cfg.clients) <= 10_000
    assert all(1 <= h <= 4096 for h in cfg.model.hidden)
    o, f = cfg.optimizer, cfg.federation
    assert math.isfinite(o.lr) and o.lr > 0 and 0 <= o.momentum < 1
    assert 1 <= f.rounds <= 1_000_000 and 1 <= f.batch_size <= 1_000_000
    assert all(0 < g.width <= 1 for g in cfg.clients)


def test_random_mappings() -> None:
    @FUZZ
    @given(
        st.dictionaries(
            st.sampled_from(FIELD_NAMES) | st.text(max_size=5) | st.integers(0, 3),
            VALUES,
            max_size=6,
        )
    )
    def check(raw: dict) -> None:
        _parse(raw)

    check()


def _leaf_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _leaf_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _leaf_paths(v, (*prefix, i))
    return out


def test_mutated_valid_configs(small_cfg: dict) -> None:
    small_cfg["clients"][0]["lam"] = 0.5
    small_cfg["algorithm"].update(dynamic_widths=[1.0, 0.5], rep_head_epochs=1)
    paths = _leaf_paths(small_cfg)
    assert isinstance(_parse(small_cfg), RunConfig)
    near = st.sampled_from([0, -1, 1, 2**31, 2**32, 2**70, 0.5, 1.5, -0.0, math.inf, math.nan,
                            1e30, 10**9, "", "../../x", [], {}, None, True])  # fmt: skip

    @FUZZ
    @given(st.lists(st.tuples(st.sampled_from(paths), near | VALUES), min_size=1, max_size=3))
    def check(edits: list) -> None:
        raw = copy.deepcopy(small_cfg)
        for path, value in edits:
            d = raw
            try:
                for p in path[:-1]:
                    d = d[p]
                d[path[-1]] = value
            except (KeyError, IndexError, TypeError):
                pass
        _parse(raw)

    check()


def test_yaml_files_as_bytes(small_cfg: dict, tmp_path_factory: pytest.TempPathFactory) -> None:
    path: Path = tmp_path_factory.mktemp("fuzz") / "cfg.yaml"
    base = yaml.safe_dump(small_cfg, sort_keys=False).encode()

    @st.composite
    def mutated(draw: st.DrawFn) -> bytes:
        b = bytearray(base)
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(b)))
            op = draw(st.sampled_from(["set", "cut", "insert"]))
            if op == "set" and i < len(b):
                b[i] = draw(st.sampled_from(b"\x00\xff:-[]{}&*!|>'\"#%@` \n\t0123456789.e"))
            elif op == "cut":
                del b[i:]
            else:
                b[i:i] = draw(st.binary(max_size=8))
        return bytes(b)

    @FUZZ
    @given(mutated() | st.binary(max_size=40) | st.sampled_from([b"&a [*a, *a]", b"[" * 2000]))
    def check(data: bytes) -> None:
        path.write_bytes(data)
        try:
            cfg = load_config(path)
        except FMTLError as exc:
            assert isinstance(exc, ConfigError) and str(path) in str(exc)
        else:
            _check_bounds(cfg)
        assert path.read_bytes() == data

    check()
