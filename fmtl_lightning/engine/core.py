"""The server engine: one federated round's server logic, whatever carries the messages.

A transport (the in-process :class:`~fmtl_lightning.simulation.Simulation`, the Flower
:class:`~fmtl_lightning.deploy.strategy.FMTLStrategy` on a SuperLink or on Flower's
simulation engine) asks the engine, each round::

    assign(round_idx, available, declared)   who trains, at which width, on which slice
    check_update(assignment, arrays, n)       a reply, validated (or ReplyRejected)
    aggregate(updates)                        the aggregator; a non-finite result never adopted
    commit_round(round_no, rows, ...)         history, checkpoint, retention

and delivers the slices and collects the replies its own way. Sampling, the width plan,
slicing, validation, aggregation, checkpoints and resume exist only here.

Pure numpy (no torch, no Flower): a SuperLink imports it without either.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fmtl_lightning.aggregation import MAX_EXAMPLES, ClientUpdate
from fmtl_lightning.aggregators import AggregationRule
from fmtl_lightning.aggregators.base import RowMasks
from fmtl_lightning.checkpoint import (
    append_history,
    completed_rounds,
    prune_rounds,
    read_history,
    read_round,
    rounds_to_keep,
    write_round,
)
from fmtl_lightning.config import ConfigError, config_to_dict, parse_config
from fmtl_lightning.engine.metrics import rows_csv
from fmtl_lightning.engine.plan import PlannedClient, ServerPlan
from fmtl_lightning.engine.seeds import sample_rng, width_rng
from fmtl_lightning.errors import FMTLError, StateValidationError
from fmtl_lightning.roles import WidthSpec
from fmtl_lightning.slicing import slice_state
from fmtl_lightning.validation import check_finite, validate_state
from mobile_client.fileio import atomic_write_text


class ReplyRejected(FMTLError, ValueError):
    """A client's reply that fails a check; the message names the client and what is wrong."""


@dataclass(frozen=True)
class Assignment:
    """One client's work in a round: its width and the global shared state cut to it."""

    idx: int
    client: PlannedClient
    ws: WidthSpec
    received: dict[str, np.ndarray]


class ServerEngine:
    """The server side of one run directory: global state, rounds, checkpoints.

    ``aggregator`` replaces ``cfg.algorithm.aggregator`` for this engine only (e.g. a
    benchmark's wrapper around a registered rule). ``max_examples`` bounds the
    ``num-examples`` a reply may claim (0: the YAML's ``data.samples_per_client``, the
    most a client's shard holds).
    """

    def __init__(
        self,
        plan: ServerPlan,
        run_dir: str | Path,
        *,
        aggregator: AggregationRule | None = None,
        max_examples: int = 0,
    ) -> None:
        self.plan = plan
        self.cfg = cfg = plan.cfg
        self.spec = plan.spec
        self.shared_keys = plan.shared_keys
        self.run_dir = Path(run_dir)
        self.aggregator = cfg.algorithm.aggregator if aggregator is None else aggregator
        self.max_examples = int(max_examples) or cfg.data.samples_per_client
        if not 0 < self.max_examples <= MAX_EXAMPLES:
            raise ConfigError(f"max-examples must be in [1, 2**53] (0: the YAML's "
                              f"data.samples_per_client), got {max_examples!r}")  # fmt: skip
        self.global_state = plan.initial_state
        self.round_idx = 0  # rounds completed
        self.records: list[dict[str, Any]] = []  # history.jsonl records of rounds 1..round_idx
        self._order = {c.client_id: c.idx for c in plan.clients}
        a = cfg.algorithm
        self._levels = sorted(set(a.dynamic_widths or (c.width for c in plan.clients)))
        self.on_prune: Callable[[set[int]], None] | None = None  # e.g. edge bundles per round

    # ------------------------------------------------------------------ the plan of a round
    def sample(self, round_idx: int, available: Sequence[int] | None = None) -> list[int]:
        """The seeded ``federation.fraction`` sample of the available client indices
        (default: every client), sorted."""
        idxs = sorted(range(len(self.plan.clients)) if available is None else available)
        if not idxs:
            return []
        m = max(1, math.ceil(self.cfg.federation.fraction * len(idxs) - 1e-9))
        pick = sample_rng(self.cfg.seed, round_idx).choice(len(idxs), size=min(m, len(idxs)),
                                                           replace=False)  # fmt: skip
        return sorted(idxs[int(i)] for i in pick)

    def width_of(self, idx: int, round_idx: int, declared: float | None = None) -> WidthSpec:
        """The width client ``idx`` trains at in ``round_idx``: the one it declares (default:
        the config's), or under ``width_assignment: dynamic`` a seeded draw of a level
        not above it."""
        a = self.cfg.algorithm
        width = self.plan.clients[idx].width if declared is None else declared
        if a.width_assignment == "dynamic":
            allowed = [w for w in self._levels if w <= width] or [self._levels[0]]
            width = float(
                allowed[int(width_rng(self.cfg.seed, round_idx, idx).integers(len(allowed)))]
            )
        return WidthSpec(width, a.slicing, round_idx)

    def eval_width(self, idx: int, round_no: int) -> WidthSpec:
        """The WidthSpec client ``idx`` is evaluated (and exported) with after ``round_no``."""
        return WidthSpec(self.plan.clients[idx].width, self.cfg.algorithm.slicing,
                         max(round_no - 1, 0))  # fmt: skip

    def assign(
        self,
        round_idx: int,
        available: Sequence[int] | None = None,
        declared: Mapping[int, float] | None = None,
    ) -> list[Assignment]:
        """Who trains in ``round_idx`` (of ``available``), at which width (``declared``:
        client index -> the width its node declares), with the global state sliced to it."""
        out = []
        for idx in self.sample(round_idx, available):
            ws = self.width_of(idx, round_idx, None if declared is None else declared[idx])
            sub = slice_state(self.global_state, self.spec, ws)
            out.append(Assignment(idx, self.plan.clients[idx], ws, sub))
        return out

    # ------------------------------------------------------------------ replies
    def check_update(
        self, a: Assignment, arrays: Mapping[str, np.ndarray], num_examples: object
    ) -> ClientUpdate:
        """A reply to ``a`` as an update, or :class:`ReplyRejected` naming the client: the
        shared keys at its width (shapes, dtypes, finite values within the bound) and a
        ``num_examples`` int in ``[1, max_examples]``."""
        cid = a.client.client_id
        try:
            validate_state(dict(arrays), self.spec, a.ws, self.shared_keys, client=cid)
        except StateValidationError as exc:
            raise ReplyRejected(str(exc)) from exc
        n = num_examples
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= self.max_examples:
            raise ReplyRejected(
                f"client {cid!r}: num-examples must be an int in [1, {self.max_examples}] "
                f"(the ServerApp's max-examples), got {n!r}"
            )
        return ClientUpdate(cid, dict(arrays), n, a.ws)

    def aggregate(
        self, updates: Sequence[ClientUpdate], row_masks: RowMasks | None = None
    ) -> str | None:
        """Fold ``updates`` (any order: folded in client order) into the global state with
        the run's aggregator. Returns ``None``, or why the result was not adopted (it was
        not finite; the global state is kept). No updates: nothing changes."""
        if not updates:
            return None
        ordered = sorted(updates, key=lambda u: self._order.get(u.client_id, len(self._order)))
        new = self.aggregator(self.global_state, ordered, self.spec,
                              weighting=self.cfg.algorithm.weighting, row_masks=row_masks)  # fmt: skip
        try:  # an aggregator cannot return NaN/Inf from checked updates; never adopt one
            check_finite(new, self.spec, self.shared_keys, client="<aggregate>")
        except StateValidationError as exc:
            return f"{exc}; the global state is kept"
        self.global_state = new
        return None

    def adopt(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the global state with ``state`` (checked: every shared key at full width,
        finite; :class:`~fmtl_lightning.errors.StateValidationError` otherwise)."""
        validate_state(dict(state), self.spec, 1.0, self.shared_keys, client="<global>")
        self.global_state = dict(state)

    # ------------------------------------------------------------------ run dir, checkpoints
    def write_run_files(self) -> None:
        """``config.yaml`` and ``spec.json`` of the run dir (atomically)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config = yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False)
        atomic_write_text(self.run_dir / "config.yaml", config)
        atomic_write_text(self.run_dir / "spec.json", self.spec.to_json())

    def check_same_config(self) -> None:
        """Refuse a run dir whose rounds were trained under another config."""
        saved = self.run_dir / "config.yaml"
        if not completed_rounds(self.run_dir) or not saved.is_file():
            return
        try:
            same = parse_config(yaml.safe_load(saved.read_text())) == self.cfg
        except (ConfigError, yaml.YAMLError):
            same = False
        if not same:
            raise ConfigError(f"run dir {str(self.run_dir)!r} holds rounds of another config; "
                              "use a new run-dir (or the same YAML to resume)")  # fmt: skip

    def commit_round(
        self,
        round_no: int,
        rows: list[dict[str, Any]],
        meta: Mapping[str, Any],
        clients: Mapping[str, Mapping[str, np.ndarray]] | None = None,
        record: Mapping[str, Any] | None = None,
        *,
        carried: Sequence[str] = (),
    ) -> None:
        """Round ``round_no`` is done: journal it (``rows`` + ``record``), checkpoint the
        global state (+ each client's ``clients`` arrays, ``meta``, ``rows``) atomically,
        then apply the retention rule (``cfg.checkpoints``). ``carried``: clients whose
        arrays did not change since the previous round's checkpoint (their files carry over)."""
        rec = {"round": round_no, **(record or {}), "rows": rows}
        # history first: a record of a round that never completed is ignored on resume
        append_history(self.run_dir, rec, fresh=round_no == 1)
        full = {"round": round_no, "algorithm": self.cfg.algorithm.name, **meta}
        write_round(self.run_dir, round_no, self.global_state, clients or {}, full,
                    rows_csv(rows), carried=carried, previous=self.round_idx)  # fmt: skip
        self.round_idx = round_no
        self.records.append(rec)
        self.prune()

    def prune(self) -> None:
        """Checkpoint retention (``cfg.checkpoints``); a fresh run (round 0) drops stale rounds."""
        ck = self.cfg.checkpoints
        keep = rounds_to_keep(self.round_idx, ck.keep_last, ck.keep_every)
        prune_rounds(self.run_dir / "checkpoints", keep)
        if self.on_prune is not None:
            self.on_prune(keep)

    def restore(self) -> dict[str, dict[str, np.ndarray]]:
        """Continue after the last complete round of the run dir (if any): its global state
        (validated), the history of rounds 1..N; returns its per-client arrays."""
        done = completed_rounds(self.run_dir)
        if not done:
            return {}
        g, clients, _, _ = read_round(self.run_dir, done[-1])
        validate_state(g, self.spec, 1.0, self.shared_keys, client="<checkpoint>")
        self.records = read_history(self.run_dir, done[-1])
        self.global_state, self.round_idx = g, done[-1]
        return clients

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every metric row of rounds 1..round_idx."""
        return [row for rec in self.records for row in rec["rows"]]
