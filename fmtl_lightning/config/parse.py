"""Reading a run config: YAML or a plain mapping -> :class:`RunConfig`, and back.

Unknown keys are errors (a typo never silently drops a setting), every value is
checked against its field's type, and every error names the field, e.g.
``clients[2].width``. :func:`parse_config` then runs
:func:`~fmtl_lightning.config.checks.validate_config`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from fmtl_lightning.aggregators import AggregatorParamError, build_aggregator, is_aggregator
from fmtl_lightning.config.checks import MAX_NUMBER, validate_config
from fmtl_lightning.config.schema import (
    AlgorithmConfig,
    CheckpointConfig,
    ClientGroup,
    ConfigError,
    DataConfig,
    FederationConfig,
    ModelConfig,
    OptimizerConfig,
    PartitionConfig,
    RunConfig,
    TaskFactoryConfig,
)


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown field (known: {sorted(fields)})")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _convert(fields[name].type, value, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


_NESTED = {
    "PartitionConfig": PartitionConfig,
    "DataConfig": DataConfig,
    "ModelConfig": ModelConfig,
    "AlgorithmConfig": AlgorithmConfig,
    "FederationConfig": FederationConfig,
    "OptimizerConfig": OptimizerConfig,
    "CheckpointConfig": CheckpointConfig,
}


def _convert(type_str: Any, value: Any, where: str) -> Any:
    t = str(type_str)
    if t == "AlgorithmConfig":
        return _build(AlgorithmConfig, _migrate_algorithm(value, where), where)
    if t in _NESTED:
        return _build(_NESTED[t], value, where)
    if t == "AggregationRule":
        return _aggregator(value, where)
    if t.startswith("tuple[TaskFactoryConfig"):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of {{factory: 'package.module:callable'}}")
        return tuple(_build(TaskFactoryConfig, v, f"{where}[{i}]") for i, v in enumerate(value))
    if t.startswith("tuple[ClientGroup"):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of client groups")
        return tuple(_build(ClientGroup, v, f"{where}[{i}]") for i, v in enumerate(value))
    if t.startswith("tuple["):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = float if "float" in t else int if "int" in t else str
        return tuple(_scalar(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    if value is None:
        if "None" in t:
            return None
        raise ConfigError(f"{where}: must not be null")
    for name, py in (("bool", bool), ("float", float), ("int", int), ("str", str)):
        if t == name or t.startswith(f"{name} |") or t.startswith("Literal") and name == "str":
            return _scalar(py, value, where)
    return value


def _migrate_algorithm(raw: Any, where: str) -> Any:
    """Older configs say ``label_split: true``: that is ``aggregator: label_split``."""
    if not isinstance(raw, dict) or "label_split" not in raw:
        return raw
    raw = dict(raw)
    split = _scalar(bool, raw.pop("label_split"), f"{where}.label_split")
    if split:
        agg = raw.get("aggregator", "label_split")
        name = agg.get("name") if isinstance(agg, dict) else agg
        if name != "label_split":
            raise ConfigError(
                f"{where}.label_split: true means aggregator label_split, but "
                f"{where}.aggregator is {name!r}; keep only {where}.aggregator"
            )
        raw["aggregator"] = agg
    return raw


def _aggregator(value: Any, where: str) -> Any:
    """``name`` or ``{name: ..., <parameter>: ...}`` -> the registered aggregator."""
    try:
        return build_aggregator(value)
    except AggregatorParamError as exc:
        field = f"{where}.{exc.field}" if exc.field else where
        raise ConfigError(f"{field}: {exc.message}") from exc


def _scalar(py: type, value: Any, where: str) -> Any:
    if py is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if py is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not (-MAX_NUMBER <= value <= MAX_NUMBER):  # also NaN, inf, 10**400
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if py is int:
        if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_NUMBER:
            raise ConfigError(f"{where}: expected an integer, got {value!r} (write {int(value)})")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def parse_config(raw: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from a plain mapping (e.g. parsed YAML)."""
    cfg = _build(RunConfig, raw, "config")
    validate_config(cfg)
    return cfg


def load_config(path: str | Path) -> RunConfig:
    """Read, parse and validate a YAML config file; every error names the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {str(p)!r} does not exist") from exc
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {exc}") from exc
    if raw is None:
        raise ConfigError(f"config file {str(p)!r} is empty (or truncated before any field)")
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config file {str(p)!r}: expected a mapping of fields, got {type(raw).__name__}"
        )
    try:
        return parse_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"config file {str(p)!r}: {exc}") from exc


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain-data form (lists, not tuples) for run directories and YAML."""

    def conv(v: Any) -> Any:
        if is_aggregator(v):  # its name, then its parameters
            return {"name": v.name, **{f.name: getattr(v, f.name) for f in dataclasses.fields(v)}}
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple | list):
            return [conv(x) for x in v]
        return v

    return conv(cfg)
