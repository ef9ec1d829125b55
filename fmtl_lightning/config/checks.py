"""Validating a run config: every semantic check that can fail before training starts.

Bounds are far above any real run, low enough that nothing tries to allocate the
impossible or loop for ever; choices come from the registries
(:data:`~fmtl_lightning.algorithms.ALGORITHMS`,
:data:`~fmtl_lightning.aggregators.AGGREGATORS`). Every error is a
:class:`~fmtl_lightning.config.schema.ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from fmtl_lightning.aggregators import AGGREGATORS, is_aggregator
from fmtl_lightning.algorithms import ALGORITHMS
from fmtl_lightning.config.schema import ConfigError, RunConfig
from fmtl_lightning.data.datasets import IMAGE_SIZES

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
EDGE_KINDS = ("multiclass", "multilabel", "regression")  # the kinds export's step graphs train
MAX_CLIENTS = 10_000  # all groups together
MAX_HIDDEN_LAYERS = 32
MAX_PARAMS = 100_000_000  # rough backbone size at full width (400 MB of float32)
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@-]{0,99}")


def _check_choice(value: str, choices: tuple[str, ...], where: str) -> None:
    if value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")


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
    from fmtl_lightning.tasks import get_task, load_task_factory, task_domain

    if not isinstance(cfg.name, str) or not NAME_RE.fullmatch(cfg.name):
        raise ConfigError(
            f"name: {cfg.name!r} is not a valid run name (it names the directory runs/<name>): "
            "1-100 letters, digits or _ . + = @ -, not starting with '.' or '-', no '/'"
        )
    _check_numbers(cfg, "")
    for i, tf in enumerate(cfg.tasks):
        try:
            load_task_factory(tf.factory)
        except _Base as exc:
            raise ConfigError(f"tasks[{i}].factory: {exc}") from exc
    from fmtl_lightning.config.factory import import_factory

    for field, path in (("model.factory", cfg.model.factory), ("data.factory", cfg.data.factory)):
        if path is not None:
            import_factory(path, field)  # importable now; called when the run starts
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
        domains: set[str] = set()
        for t in g.tasks:
            try:
                task = get_task(t)
            except _Base as exc:
                raise ConfigError(f"{where}.tasks: {exc}") from exc
            built_in = task.domain in IMAGE_SIZES and task.target is not None
            if not built_in and cfg.data.factory is None:
                raise ConfigError(
                    f"{where}.tasks: task {t!r} needs a domain (one of {sorted(IMAGE_SIZES)}, "
                    f"got {task.domain!r}) and a target function (got {task.target!r}) to "
                    "train on a built-in dataset; for your own data, name its Federation "
                    "in data.factory"
                )
            if task.domain is not None:
                domains.add(task.domain)
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
        if f.drop_last:
            raise ConfigError(
                f"{where}: the edge runtime visits every batch; set federation.drop_last to false"
            )
        if a.masked_ce or cfg.model.scaler:
            raise ConfigError(
                f"{where}: masked_ce and the scaler are not exported for edge clients"
            )
        for t in g.tasks:
            task = get_task(t)
            if task.kind not in EDGE_KINDS or not task.default_loss:
                raise ConfigError(
                    f"{where}: clients[{i}].tasks has {t!r}, a {task.kind} task"
                    f"{'' if task.default_loss else ' with its own loss'}; the exported step "
                    f"graphs train {' and '.join(EDGE_KINDS)} tasks with their default "
                    "losses only"
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
        # the built-in datasets' image size; data.factory's own images are checked when
        # the model is built for them (None: not known before)
        px = None
        if cfg.data.factory is None:
            px = min(IMAGE_SIZES[task_domain(t)] for g in cfg.clients for t in g.tasks)
        if len(hidden) not in (0, 3) or (px is not None and px < 16):
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
    if f.drop_last and f.local_steps is not None:
        raise ConfigError(
            "federation.drop_last: counts batches of whole epochs; it cannot be combined "
            "with federation.local_steps"
        )
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
