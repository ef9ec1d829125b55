"""A Flower strategy over the server engine: Flower carries the messages, the engine decides.

:class:`FMTLStrategy` is a small ``flwr.serverapp.strategy.Strategy`` and a thin adapter
over :class:`~fmtl_lightning.engine.ServerEngine` (the same engine the in-process
simulation runs: sampling, width plan, slicing, validation, aggregation):

* :meth:`~FMTLStrategy.register` asks new nodes who they are (``query.fmtl_info``) and
  checks the answer against the run config (client id known and, under node
  authentication, bound to this node's key (:mod:`fmtl_lightning.deploy.auth`); same
  tasks, width in (0, 1] and not wider than the config gives that client, no two nodes
  claiming one client); a node may declare a narrower width;
* :meth:`~FMTLStrategy.configure_train` sends each node the engine selects the global
  shared arrays the engine cut to its width (HeteroFL prefix or FedRolex window) with
  the round, width and the hash of what was sent;
* :meth:`~FMTLStrategy.aggregate_train` checks every reply's envelope (base hash, round,
  client id, records) and hands its arrays to :meth:`ServerEngine.check_update` (keys,
  shapes at the node's width, dtype, finite values within the magnitude bound) with its
  claims:
  ``num-examples`` must be an int in ``[1, max_examples]`` (default: the YAML's
  ``data.samples_per_client``, the most a client's shard holds; a node training on
  its own larger data needs the ServerApp's ``max-examples`` raised), every metric a
  finite number. It folds the good replies in with the run's aggregator
  (``algorithm.aggregator``, :mod:`fmtl_lightning.aggregators`). A malformed reply
  (any record or array, however broken) is rejected with :class:`ReplyRejected` and
  logged, a missing one recorded as a failure; neither aborts the round. Only a node's
  first reply in a round counts (a second one is rejected). The engine folds the
  accepted ones in client order; entries no accepted client holds keep their value,
  and a global state that is not finite is never adopted.

Everything here is numpy + flwr: no torch at import time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fmtl_lightning.aggregation import ClientUpdate
from fmtl_lightning.deploy.evaluation import (
    EvalSent,
    evaluate_messages,
    finite_number,
    fold_eval_replies,
    run_yaml,
)
from fmtl_lightning.deploy.rounds import RoundReport
from fmtl_lightning.engine import Assignment, PlannedClient, ReplyRejected, ServerEngine
from fmtl_lightning.engine.seeds import phase_seed
from mobile_client.flower_app import (
    ARRAYS,
    CONFIG,
    INFO_MESSAGE,
    INFO_RECORD,
    METRICS,
    ProtocolError,
    TrainInstructions,
    from_record,
    to_record,
)
from mobile_client.update import state_hash


@dataclass(frozen=True)
class Node:
    node_id: int
    client: PlannedClient
    width: float  # what the node declared
    runtime: str


@dataclass(frozen=True)
class Sent:
    node: Node
    assignment: Assignment
    base_hash: str
    bytes_down: int


def _weighted_mean(values: list[tuple[float, float]]) -> float:
    """Mean of finite values under positive weights; finite (weights scaled to sum to 1,
    the result clamped to the values' range, which only undoes rounding)."""
    total = math.fsum(w for _, w in values)
    if not total:
        return float("nan")
    mean = math.fsum(v * (w / total) for v, w in values)
    return min(max(mean, min(v for v, _ in values)), max(v for v, _ in values))


class FMTLStrategy(Strategy):
    """See the module docstring. ``engine`` holds the global state and the run's rules."""

    def __init__(
        self,
        engine: ServerEngine,
        *,
        reply_timeout: float = 600.0,
        query_timeout: float = 60.0,
        node_ids: Mapping[str, int] | None = None,
        min_replies: int = 1,
    ) -> None:
        """``node_ids``: client id -> the node id of the key registered for it
        (:mod:`fmtl_lightning.deploy.auth`); ``None``: any node may claim any client.
        ``min_replies``: a round with fewer accepted replies aggregates nothing
        (:mod:`fmtl_lightning.deploy.rounds`)."""
        self.engine = engine
        self.min_replies = int(min_replies)
        self.node_ids = None if node_ids is None else dict(node_ids)
        self.plan = engine.plan
        self.reply_timeout = float(reply_timeout)
        self.query_timeout = min(float(query_timeout), self.reply_timeout)
        self.nodes: dict[int, Node] = {}
        self.refused: dict[int, str] = {}  # node id -> why it was not registered
        self.pending: dict[int, Sent] = {}
        self.eval_pending: dict[int, EvalSent] = {}
        self.report = RoundReport(0)
        self.history: list[RoundReport] = []

    # ------------------------------------------------------------------ nodes
    def register(self, grid: Grid, node_ids: Iterable[int] | None = None) -> list[Node]:
        """Ask every unknown node for its info; returns the nodes registered now."""
        ids = list(grid.get_node_ids() if node_ids is None else node_ids)
        # a node that went offline frees its client id (a restarted node gets a new id)
        self.nodes = {k: v for k, v in self.nodes.items() if k in ids}
        new = [n for n in ids if n not in self.nodes and n not in self.refused]
        if not new:
            return []
        msgs = [
            Message(RecordDict(), dst_node_id=n, message_type=INFO_MESSAGE, ttl=self.query_timeout)
            for n in new
        ]
        added = []
        for reply in grid.send_and_receive(msgs, timeout=self.query_timeout):
            nid = reply.metadata.src_node_id
            try:
                node = self.check_info(nid, reply)
            except (ReplyRejected, ProtocolError) as exc:
                self.refused[nid] = str(exc)
                log(WARNING, "fmtl: node %s refused: %s", nid, exc)
                continue
            self.nodes[nid] = node
            added.append(node)
            log(INFO, "fmtl: node %s is client %s (width %g, %s)", nid,
                node.client.client_id, node.width, node.runtime)  # fmt: skip
        return added

    def check_info(self, node_id: int, reply: Message) -> Node:
        if reply.has_error():
            raise ReplyRejected(f"node {node_id} answered the info query with an error: "
                                f"{reply.error.reason}")  # fmt: skip
        info = reply.content.get(INFO_RECORD) if reply.has_content() else None
        if not isinstance(info, ConfigRecord):
            raise ReplyRejected(f"node {node_id}: info reply has no {INFO_RECORD!r} record")
        cid = str(info.get("client-id", ""))
        planned = self.plan.client(cid)
        if planned is None:
            known = ", ".join(c.client_id for c in self.plan.clients)
            raise ReplyRejected(f"node {node_id}: client-id {cid!r} is not in the run config "
                                f"(clients: {known})")  # fmt: skip
        if self.node_ids is not None and self.node_ids.get(cid) != node_id:
            raise ReplyRejected(f"node {node_id} claims client {cid!r}, which is bound to the "
                                f"key of node {self.node_ids.get(cid)} (run config "
                                "'node-ids')")  # fmt: skip
        taken = [n for n in self.nodes.values() if n.client.client_id == cid]
        if taken and taken[0].node_id != node_id:
            raise ReplyRejected(f"client {cid!r} is already node {taken[0].node_id}; "
                                f"node {node_id} claims it too")  # fmt: skip
        if info.get("declared", True) is False:  # a simulation-engine node: the plan says
            return Node(node_id, planned, planned.width, "lightning")
        tasks = tuple(t for t in str(info.get("tasks", "")).split(",") if t)
        if tasks != planned.tasks:
            raise ReplyRejected(f"client {cid!r} (node {node_id}): tasks {list(tasks)} differ "
                                f"from the run config's {list(planned.tasks)}")  # fmt: skip
        width = finite_number(info.get("width"), f"node {node_id}: info 'width'")
        if not 0.0 < width <= 1.0:
            raise ReplyRejected(f"client {cid!r} (node {node_id}): width {width} not in (0, 1]")
        if width > planned.width + 1e-9:
            raise ReplyRejected(f"client {cid!r} (node {node_id}): width {width:g} is wider than "
                                f"the {planned.width:g} the run config gives it")  # fmt: skip
        if width < planned.width - 1e-9:
            log(WARNING, "fmtl: client %s declares width %g; the run config says %g: using %g",
                cid, width, planned.width, width)  # fmt: skip
        return Node(node_id, planned, width, str(info.get("runtime", "lightning")))

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One train message per selected registered online node (``arrays``, when not
        empty, replaces the global state first)."""
        t0 = time.perf_counter()
        eng = self.engine
        if len(arrays):
            eng.adopt(from_record(arrays))
        online = set(grid.get_node_ids())
        by_idx = {n.client.idx: n for n in self.nodes.values() if n.node_id in online}
        round_idx = server_round - 1
        declared = {idx: n.width for idx, n in by_idx.items()}
        self.report = RoundReport(server_round)
        self.pending = {}
        cfg = eng.cfg
        f = cfg.federation
        yaml_text = run_yaml(cfg)
        msgs = []
        for a in eng.assign(round_idx, sorted(by_idx), declared):
            node = by_idx[a.idx]
            base = state_hash(a.received)
            ins = TrainInstructions(
                round=server_round,
                round_idx=round_idx,
                client_id=node.client.client_id,
                client_idx=a.idx,
                width=a.ws.width,
                slicing=a.ws.mode,
                base_hash=base,
                epochs=f.local_epochs,
                batch_size=f.batch_size,
                lr=cfg.optimizer.lr,
                steps=-1 if f.local_steps is None else f.local_steps,
                batch_seed=phase_seed(cfg.seed, round_idx, a.idx, "global"),
                run_config=yaml_text if node.runtime == "lightning" else "",
            )
            rec = to_record(a.received)
            content = RecordDict({ARRAYS: rec, CONFIG: ins.to_record()})
            msgs.append(
                Message(content, dst_node_id=node.node_id, message_type="train",
                        ttl=3 * self.reply_timeout, group_id=str(server_round))
            )  # fmt: skip
            self.pending[node.node_id] = Sent(node, a, base, rec.count_bytes())
            self.report.sent[node.client.client_id] = {
                "node": node.node_id,
                "width": a.ws.width,
                "runtime": node.runtime,
                "bytes_down": rec.count_bytes(),
            }
        self.report.times["configure"] = time.perf_counter() - t0
        return msgs

    def check_reply(self, reply: Message) -> tuple[ClientUpdate, dict[str, float], int]:
        """Validate one train reply; returns (update, metrics, bytes up).

        Raises :class:`ProtocolError` when the node answered with an error, and
        :class:`ReplyRejected` (naming the client) for anything wrong in the reply.
        """
        nid = reply.metadata.src_node_id
        sent = self.pending.get(nid)
        if sent is None:
            raise ReplyRejected(f"node {nid}: reply to a message this round did not send")
        cid = sent.node.client.client_id
        if reply.has_error():
            raise ProtocolError(f"client {cid!r}: node error {reply.error.code}: "
                                f"{reply.error.reason}")  # fmt: skip
        c = reply.content
        for name, kind in ((ARRAYS, ArrayRecord), (METRICS, MetricRecord), (CONFIG, ConfigRecord)):
            if not isinstance(c.get(name), kind):
                raise ReplyRejected(f"client {cid!r}: reply has no {name!r} {kind.__name__}")
        meta, metrics = c[CONFIG], c[METRICS]
        if str(meta.get("client-id")) != cid:
            raise ReplyRejected(f"client {cid!r}: reply says client-id {meta.get('client-id')!r}")
        if meta.get("round") != self.report.round:
            raise ReplyRejected(f"client {cid!r}: reply is for round {meta.get('round')!r}, "
                                f"expected {self.report.round}")  # fmt: skip
        if meta.get("base-hash") != sent.base_hash:
            raise ReplyRejected(
                f"client {cid!r}: base model hash {meta.get('base-hash')!r} differs from the "
                f"{sent.base_hash} sent (trained from other weights)"
            )
        try:
            arrays = from_record(c[ARRAYS], f"client {cid!r} arrays")
        except ProtocolError as exc:
            raise ReplyRejected(f"client {cid!r}: {exc}") from exc
        upd = self.engine.check_update(sent.assignment, arrays, metrics.get("num-examples"))
        m = {k: finite_number(v, f"client {cid!r} metric {k!r}") for k, v in metrics.items()
             if k != "num-examples"}  # fmt: skip
        return upd, m, c[ARRAYS].count_bytes()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        t0 = time.perf_counter()
        rep = self.report
        updates: list[ClientUpdate] = []
        answered = set()
        for reply in replies:
            nid = reply.metadata.src_node_id
            sent = self.pending.get(nid)
            cid = sent.node.client.client_id if sent else f"node-{nid}"
            if nid in answered:  # one reply per node and round: a client never counts twice
                why = f"client {cid!r}: node {nid} replied again this round; only its first reply counts"
                rep.rejected[f"{cid} (extra reply)"] = why
                log(WARNING, "fmtl: round %s: rejected %s", server_round, why)
                continue
            answered.add(nid)
            try:
                upd, metrics, up = self.check_reply(reply)
            except ProtocolError as exc:
                rep.failed[cid] = str(exc)
                log(WARNING, "fmtl: round %s: %s", server_round, exc)
                continue
            except ReplyRejected as exc:
                rep.rejected[cid] = str(exc)
                log(WARNING, "fmtl: round %s: rejected %s", server_round, exc)
                continue
            except Exception as exc:  # a bug in the checks: log it loudly, keep the round
                rep.rejected[cid] = f"unexpected {type(exc).__name__} checking the reply: {exc}"
                log(ERROR, "fmtl: round %s: client %s: %s", server_round, cid,
                    rep.rejected[cid], exc_info=True)  # fmt: skip
                continue
            updates.append(upd)
            rep.accepted[cid] = {"num_examples": upd.num_examples, "bytes_up": up, **metrics}
        for nid, sent in self.pending.items():
            if nid not in answered:
                cid = sent.node.client.client_id
                rep.failed[cid] = f"no reply within reply-timeout ({self.reply_timeout:g} s)"
                log(WARNING, "fmtl: round %s: client %s (node %s) did not reply in %g s",
                    server_round, cid, nid, self.reply_timeout)  # fmt: skip
        refused = None
        if len(updates) < self.min_replies:
            rep.not_aggregated = (f"{len(updates)} accepted repl{'y' if len(updates) == 1 else 'ies'}"
                                  f" by the deadline, min-replies is {self.min_replies}: the "
                                  "global state is kept")  # fmt: skip
            log(WARNING, "fmtl: round %s: %s", server_round, rep.not_aggregated)
        else:
            refused = self.engine.aggregate(updates)  # in client order, never non-finite
        if refused is not None:
            rep.failed["<aggregate>"] = refused
            log(ERROR, "fmtl: round %s: %s", server_round, refused)
        rep.times["aggregate"] = time.perf_counter() - t0
        self.history.append(rep)
        losses = [(v["loss"], v["num_examples"]) for v in rep.accepted.values() if "loss" in v]
        mr = MetricRecord(
            {
                "accepted": len(rep.accepted),
                "rejected": len(rep.rejected),
                "failed": len(rep.failed),
            }
        )
        if losses:
            mr["loss"] = _weighted_mean(losses)
        log(INFO, "fmtl: round %s: %d accepted, %d rejected, %d failed", server_round,
            len(rep.accepted), len(rep.rejected), len(rep.failed))  # fmt: skip
        return to_record(self.engine.global_state), mr

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One ``evaluate`` message per registered online node: the aggregated global
        state at its eval width (:mod:`fmtl_lightning.deploy.evaluation`)."""
        if len(arrays):
            self.engine.adopt(from_record(arrays))
        return evaluate_messages(self, server_round, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Each node's test metrics into this round's report (``evaluated``), or why it
        has none (``not_evaluated``: no reply, an error, a bad reply, nothing to score)."""
        rep = self.report
        fold_eval_replies(rep, self.eval_pending, replies, self.reply_timeout)
        return MetricRecord({"evaluated": len(rep.evaluated)})

    def summary(self) -> None:
        a = self.engine.cfg.algorithm
        log(INFO, "\t├── fmtl %s, aggregator %s, slicing %s, weighting %s, %d planned clients, "
            "reply timeout %g s", a.name, a.aggregator, a.slicing, a.weighting,
            len(self.plan.clients), self.reply_timeout)  # fmt: skip
