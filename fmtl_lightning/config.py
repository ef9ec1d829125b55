"""Run configuration: frozen dataclasses read from YAML, checked before any training.

Every field has a default and a documented meaning (see README "Config fields").
Unknown keys are errors (a typo never silently drops a setting), and every
error names the field, e.g. ``clients[2].width``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fmtl_lightning.aggregators import (
    AGGREGATORS,
    AggregationRule,
    AggregatorParamError,
    Mean,
    build_aggregator,
    is_aggregator,
)
from fmtl_lightning.algorithms import ALGORITHMS
from fmtl_lightning.errors import FMTLError


class ConfigError(FMTLError, ValueError):
    """An invalid config; the message names the offending field."""


@dataclass(frozen=True)
class PartitionConfig:
    kind: Literal["iid", "dirichlet", "shards"] = "dirichlet"
    alpha: float = 0.3  # dirichlet concentration
    classes_per_client: int = 2  # shards


@dataclass(frozen=True)
class DataConfig:
    samples_per_client: int = 300  # train + test samples drawn for each client
    test_fraction: float = 0.25  # share of each client's own samples held out
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    data_dir: str | None = None  # default: fmtl_lightning.data.resolve_data_dir()


@dataclass(frozen=True)
class ModelConfig:
    family: Literal["mlp", "cnn", "dwcnn", "fedavgcnn"] = "cnn"
    hidden: tuple[int, ...] = ()  # full-width channels per layer; () = family default
    norm: Literal["group", "batch", "static_batch", "none"] = "group"
    scaler: bool = False  # HeteroFL scaler: divide activations by width while training


@dataclass(frozen=True)
class ClientGroup:
    tasks: tuple[str, ...]
    count: int = 1
    width: float = 1.0  # the width this client can run (max width when dynamic)
    lam: float | None = None  # per-client Ditto lambda (overrides algorithm.lam)
    edge: bool = False  # train through the edge runtime (ONNX Runtime step graphs, files)


@dataclass(frozen=True)
class AlgorithmConfig:
    name: str = "fedper"  # a registered algorithm (fmtl_lightning.algorithms.ALGORITHMS)
    lam: float = 1.0  # Ditto: lambda/2 ||v - w_t||^2 on the shared parameters
    rep_head_epochs: int = 1  # FedRep: head-only epochs before the body epochs
    finetune_epochs: int = 1  # FedBABU / FedAvg+FT: fine-tune epochs before evaluation
    policy: Literal["fedper", "fedbn"] = "fedper"  # fedbn keeps norm params/stats local
    masked_ce: bool = False  # cross-entropy over the labels the client holds
    # the server's rule (fmtl_lightning.aggregators); YAML: a name or {name: ..., params}
    aggregator: AggregationRule = field(default_factory=Mean)
    slicing: Literal["heterofl", "fedrolex"] = "heterofl"
    width_assignment: Literal["fixed", "dynamic"] = "fixed"
    dynamic_widths: tuple[float, ...] = ()  # () = the widths the clients declare
    weighting: Literal["uniform", "examples"] = "examples"


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = 10
    fraction: float = 1.0  # share of clients sampled per round
    local_epochs: int = 1
    local_steps: int | None = None  # if set, exactly this many SGD steps per fit
    batch_size: int = 32
    eval_every: int = 1  # evaluate every client every N rounds (and always after the last)


@dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["sgd"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass(frozen=True)
class CheckpointConfig:
    keep_last: int = 1  # newest complete rounds kept (>= 1: resume needs the last one)
    keep_every: int = 0  # also keep every N-th round: 0 = none, 1 = every round


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    seed: int = 0
    clients: tuple[ClientGroup, ...] = ()
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    compare_local: bool = True  # also run local-only with the same compute, for the report
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- parsing
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


def _check_choice(value: str, choices: tuple[str, ...], where: str) -> None:
    if value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")


# Bounds: far above any real run, low enough that nothing tries to allocate the impossible
# (hidden: [1e9] would ask for 256 GB) or loop for ever. Field paths as in error messages.
MAX_NUMBER = 1e300  # any float field: finite
INT_RANGES: dict[str, tuple[int, int]] = {
    "seed": (0, 2**32 - 1),  # numpy / torch seeds
    "clients[].count": (1, 10_000),
    "model.hidden[]": (1, 4096),
    "algorithm.rep_head_epochs": (0, 10_000),
    "algorithm.finetune_epochs": (0, 10_000),
    "data.samples_per_client": (4, 10_000_000),
    "data.partition.classes_per_client": (1, 100_000),
    "federation.rounds": (1, 1_000_000),
    "federation.local_epochs": (0, 10_000),
    "federation.local_steps": (1, 10_000_000),
    "federation.batch_size": (1, 1_000_000),
    "federation.eval_every": (1, 1_000_000),
    "checkpoints.keep_last": (1, 1_000_000),  # resume needs the last round
    "checkpoints.keep_every": (0, 1_000_000),  # 0 = none
}
DEFAULT_INT_RANGE = (-(2**31), 2**31 - 1)  # an int field not listed above
MAX_CLIENTS = 10_000  # all groups together
MAX_HIDDEN_LAYERS = 32
MAX_PARAMS = 100_000_000  # rough backbone size at full width (400 MB of float32)
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@-]{0,99}")


def _check_numbers(obj: Any, where: str) -> None:
    """Every float field finite, every int field inside its range (bools excluded)."""
    for f in dataclasses.fields(obj):
        _check_value(getattr(obj, f.name), f"{where}.{f.name}" if where else f.name)


def _check_value(v: Any, where: str) -> None:
    if dataclasses.is_dataclass(v):
        _check_numbers(v, where)
    elif isinstance(v, tuple):
        for i, x in enumerate(v):
            _check_value(x, f"{where}[{i}]")
    elif isinstance(v, float) and not math.isfinite(v):
        raise ConfigError(f"{where}: must be a finite number, got {v}")
    elif isinstance(v, int) and not isinstance(v, bool):
        lo, hi = INT_RANGES.get(re.sub(r"\[\d+\]", "[]", where), DEFAULT_INT_RANGE)
        if not lo <= v <= hi:
            raise ConfigError(f"{where}: must be in [{lo}, {hi}], got {v}")


def _approx_params(hidden: tuple[int, ...], family: str) -> int:
    """Backbone weights at full width, roughly: 28x28 inputs into an MLP, 3x3 kernels in a
    CNN (depthwise-separable blocks: mostly their 1x1 convs)."""
    k = {"mlp": 1, "cnn": 9, "fedavgcnn": 25}.get(family, 1)
    sizes = [28 * 28 if family == "mlp" else 1, *hidden]
    return sum(k * a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def validate_config(cfg: RunConfig) -> None:
    """Every semantic check that can fail before training starts."""
    from fmtl_lightning.errors import FMTLError as _Base
    from fmtl_lightning.tasks import get_task

    if not isinstance(cfg.name, str) or not NAME_RE.fullmatch(cfg.name):
        raise ConfigError(
            f"name: {cfg.name!r} is not a valid run name (it names the directory runs/<name>): "
            "1-100 letters, digits or _ . + = @ -, not starting with '.' or '-', no '/'"
        )
    _check_numbers(cfg, "")
    if not cfg.clients:
        raise ConfigError("clients: at least one client group is required")
    n_clients = sum(g.count for g in cfg.clients)
    if n_clients > MAX_CLIENTS:
        raise ConfigError(f"clients: {n_clients} clients in all, more than {MAX_CLIENTS}")
    hidden = cfg.model.hidden
    if len(hidden) > MAX_HIDDEN_LAYERS:
        raise ConfigError(f"model.hidden: {len(hidden)} layers, more than {MAX_HIDDEN_LAYERS}")
    if _approx_params(hidden, cfg.model.family) > MAX_PARAMS:
        raise ConfigError(
            f"model.hidden: {list(hidden)} gives a {cfg.model.family} of about "
            f"{_approx_params(hidden, cfg.model.family):,} weights, more than {MAX_PARAMS:,}"
        )
    for i, g in enumerate(cfg.clients):
        where = f"clients[{i}]"
        if not g.tasks:
            raise ConfigError(f"{where}.tasks: a client needs at least one task")
        domains = set()
        for t in g.tasks:
            try:
                domains.add(get_task(t).domain)
            except _Base as exc:
                raise ConfigError(f"{where}.tasks: {exc}") from exc
        if len(domains) > 1:
            raise ConfigError(f"{where}.tasks: tasks span several datasets {sorted(domains)}")
        if g.count < 1:
            raise ConfigError(f"{where}.count: must be >= 1, got {g.count}")
        if not (0.0 < g.width <= 1.0) or math.isnan(g.width):
            raise ConfigError(f"{where}.width: must be in (0, 1], got {g.width}")
        if g.lam is not None and not g.lam >= 0:
            raise ConfigError(f"{where}.lam: Ditto lambda must be >= 0, got {g.lam}")
    a, f, d, o = cfg.algorithm, cfg.federation, cfg.data, cfg.optimizer
    _check_choice(a.name, tuple(ALGORITHMS), "algorithm.name")
    alg = ALGORITHMS[a.name]
    for i, g in enumerate(cfg.clients):
        if not g.edge:
            continue
        where = f"clients[{i}].edge"
        if not alg.edge_clients:
            runs = " or ".join(x.title for x in ALGORITHMS.values() if x.edge_clients)
            raise ConfigError(f"{where}: edge clients run {runs} (algorithm.name is {a.name!r})")
        if o.momentum or o.weight_decay:
            raise ConfigError(
                f"{where}: the exported step is plain SGD; set optimizer.momentum and "
                "optimizer.weight_decay to 0"
            )
        if a.masked_ce or cfg.model.scaler:
            raise ConfigError(
                f"{where}: masked_ce and the scaler are not exported for edge clients"
            )
        if cfg.model.norm == "static_batch":
            raise ConfigError(
                f"{where}: model.norm static_batch needs a statistics pass after every "
                "aggregation, which the edge runtime does not run; use model.norm "
                "batch, group or none"
            )
    agg = a.aggregator
    if not is_aggregator(agg):
        raise ConfigError(f"algorithm.aggregator: {agg!r} is not a registered aggregator "
                          f"(registered: {sorted(AGGREGATORS)})")  # fmt: skip
    if agg.needs_label_masks and not (a.masked_ce and alg.union_head):
        union = " or ".join(n for n, x in ALGORITHMS.items() if x.union_head)
        raise ConfigError(
            f"algorithm.aggregator: {agg.name} needs each client's label set: "
            f"algorithm.name {union} (a shared head) and algorithm.masked_ce true "
            f"(got name {a.name!r}, masked_ce {a.masked_ce})"
        )
    if not agg.weighted and a.weighting != "uniform":
        raise ConfigError(
            f"algorithm.weighting: the {agg.name} aggregator counts each client once "
            "(an order statistic, not a weighted mean); set algorithm.weighting: uniform"
        )
    _check_choice(a.policy, ("fedper", "fedbn"), "algorithm.policy")
    _check_choice(a.slicing, ("heterofl", "fedrolex"), "algorithm.slicing")
    _check_choice(a.width_assignment, ("fixed", "dynamic"), "algorithm.width_assignment")
    _check_choice(a.weighting, ("uniform", "examples"), "algorithm.weighting")
    _check_choice(d.partition.kind, ("iid", "dirichlet", "shards"), "data.partition.kind")
    _check_choice(cfg.model.family, ("mlp", "cnn", "dwcnn", "fedavgcnn"), "model.family")
    if cfg.model.family == "fedavgcnn":  # models.py: (conv1, conv2, fc), images >= 16 px
        from fmtl_lightning.data.datasets import IMAGE_SIZES

        px = min(IMAGE_SIZES[get_task(t).domain] for g in cfg.clients for t in g.tasks)
        if len(hidden) not in (0, 3) or px < 16:
            raise ConfigError(f"model.family: fedavgcnn needs hidden [conv1, conv2, fc] "
                              f"(got {list(hidden)}) and images of >= 16 px (got {px})")  # fmt: skip
    _check_choice(cfg.model.norm, ("group", "batch", "static_batch", "none"), "model.norm")
    _check_choice(o.name, ("sgd",), "optimizer.name")
    if not a.lam >= 0:
        raise ConfigError(f"algorithm.lam: Ditto lambda must be >= 0, got {a.lam}")
    for w in a.dynamic_widths:
        if not (0.0 < w <= 1.0):
            raise ConfigError(f"algorithm.dynamic_widths: {w} is outside (0, 1]")
    if a.rep_head_epochs < 0:
        raise ConfigError(f"algorithm.rep_head_epochs: must be >= 0, got {a.rep_head_epochs}")
    if d.samples_per_client < 4:
        raise ConfigError(
            f"data.samples_per_client: a client with {d.samples_per_client} samples has no data "
            "to train and test on (need >= 4)"
        )
    if not (0.0 < d.test_fraction < 1.0):
        raise ConfigError(f"data.test_fraction: must be in (0, 1), got {d.test_fraction}")
    if d.partition.kind == "dirichlet" and not d.partition.alpha > 0:
        raise ConfigError(f"data.partition.alpha: must be > 0, got {d.partition.alpha}")
    if d.partition.classes_per_client < 1:
        raise ConfigError("data.partition.classes_per_client: must be >= 1")
    if f.rounds < 1:
        raise ConfigError(f"federation.rounds: must be >= 1, got {f.rounds}")
    if not (0.0 < f.fraction <= 1.0):
        raise ConfigError(f"federation.fraction: must be in (0, 1], got {f.fraction}")
    if f.local_epochs < 1 and f.local_steps is None:
        raise ConfigError("federation.local_epochs: must be >= 1 (or set local_steps)")
    if f.local_steps is not None and f.local_steps < 1:
        raise ConfigError(f"federation.local_steps: must be >= 1, got {f.local_steps}")
    if f.eval_every < 1:
        raise ConfigError(f"federation.eval_every: must be >= 1, got {f.eval_every}")
    if f.batch_size < 1:
        raise ConfigError(f"federation.batch_size: must be >= 1, got {f.batch_size}")
    if not o.lr > 0:
        raise ConfigError(f"optimizer.lr: must be > 0, got {o.lr}")
    if not 0 <= o.momentum < 1:
        raise ConfigError(f"optimizer.momentum: must be in [0, 1), got {o.momentum}")
    if not 0 <= o.weight_decay < 1:
        raise ConfigError(f"optimizer.weight_decay: must be in [0, 1), got {o.weight_decay}")


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
