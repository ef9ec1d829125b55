"""The run configuration's schema: frozen dataclasses, one per YAML section.

Every field has a default and a documented meaning (see README "Config fields").
:mod:`fmtl_lightning.config.parse` builds them from YAML, and
:mod:`fmtl_lightning.config.checks` validates them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from fmtl_lightning.aggregators import AggregationRule, Mean
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
    factory: str | None = None  # "pkg.mod:fn": fn(cfg) -> Federation, the clients' own data


@dataclass(frozen=True)
class ModelConfig:
    family: Literal["mlp", "cnn", "dwcnn", "fedavgcnn"] = "cnn"
    hidden: tuple[int, ...] = ()  # full-width channels per layer; () = family default
    norm: Literal["group", "batch", "static_batch", "none"] = "group"
    scaler: bool = False  # HeteroFL scaler: divide activations by width while training
    factory: str | None = None  # "pkg.mod:fn": fn() -> FederatedModel (then family... unused)


@dataclass(frozen=True)
class TaskFactoryConfig:
    # "package.module:callable" returning a fmtl_lightning.tasks.Task (or a list of them);
    # imported and registered when the config is validated, before clients[].tasks
    factory: str


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
    drop_last: bool = False  # skip each epoch's last, short batch (DataLoader(drop_last=True))
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
    tasks: tuple[TaskFactoryConfig, ...] = ()  # user tasks, registered before clients[] read them
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
