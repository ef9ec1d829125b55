"""The deployed evaluation: every node scores the aggregated model, as ``fmtl simulate`` does.

``fmtl simulate`` evaluates, when evaluation is due (every ``federation.eval_every``
rounds and after the last), every client on its own test split with the model its
algorithm evaluates *after aggregation*: the new global shared state at the client's
width plus its own local arrays (heads, FedBN norms; static batch norm's statistics
recomputed over its training data), or its personal model (Ditto), after the
algorithm's fine-tune on a copy if it has one. A deployed round does the same in a
second exchange (Flower's ``evaluate`` message) after aggregating the train replies:

* :func:`evaluate_messages` (server): one ``evaluate`` message per registered online
  node, every node, trained this round or not: the global shared arrays cut to the
  client's eval width (:meth:`ServerEngine.eval_width`; a node that declared a
  narrower width is evaluated at its own width, and the report says so), with
  :class:`~mobile_client.flower_app.TrainInstructions` (round, width, base hash, the
  run's YAML for Lightning nodes);
* the node scores that model on its test split and answers with :func:`eval_reply`:
  ``acc/<task>``, ``loss/<task>`` (``f1/<task>`` for multi-label), ``num-examples``
  (its test examples), or with ``note``, why it has no score;
* :func:`read_eval_reply` (server) checks a reply's envelope and numbers.

The scores become the run's metric rows, so ``metrics.csv`` and ``summary.json`` mean
what the simulation's mean. Numpy + flwr only: no torch at import time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore import log

from fmtl_lightning.engine import ReplyRejected
from fmtl_lightning.roles import WidthSpec
from mobile_client.flower_app import ARRAYS, CONFIG, METRICS, TrainInstructions, to_record
from mobile_client.update import state_hash

EVALUATE = "evaluate"
NOTE = "note"  # an evaluate reply's ConfigRecord field: why the node has no score


def eval_due(round_no: int, eval_every: int, last_round: int) -> bool:
    """The simulation's rule: every ``eval_every`` rounds, and after the last round."""
    return round_no % eval_every == 0 or round_no == last_round


@dataclass(frozen=True)
class EvalSent:
    """What one node was sent to evaluate."""

    node_id: int
    client_id: str
    width: float
    base_hash: str


def evaluate_messages(strategy: Any, server_round: int, grid: Any) -> list[Message]:
    """One ``evaluate`` message per registered online node of ``strategy`` (an
    :class:`~fmtl_lightning.deploy.strategy.FMTLStrategy`); records them in
    ``strategy.eval_pending``."""
    from fmtl_lightning.engine.seeds import phase_seed
    from fmtl_lightning.slicing import slice_state

    eng = strategy.engine
    cfg = eng.cfg
    f = cfg.federation
    online = set(grid.get_node_ids())
    yaml_text = run_yaml(cfg)
    strategy.eval_pending = {}
    msgs = []
    for node in sorted(strategy.nodes.values(), key=lambda n: n.client.idx):
        if node.node_id not in online:
            continue
        ws = eng.eval_width(node.client.idx, server_round)
        if node.width < ws.width:  # a node runs at most the width it declared
            ws = WidthSpec(node.width, ws.mode, ws.round_idx)
        arrays = slice_state(eng.global_state, eng.spec, ws)
        base = state_hash(arrays)
        ins = TrainInstructions(
            round=server_round,
            round_idx=server_round - 1,
            client_id=node.client.client_id,
            client_idx=node.client.idx,
            width=ws.width,
            slicing=ws.mode,
            base_hash=base,
            epochs=f.local_epochs,
            batch_size=f.batch_size,
            lr=cfg.optimizer.lr,
            steps=-1 if f.local_steps is None else f.local_steps,
            batch_seed=phase_seed(cfg.seed, server_round - 1, node.client.idx, "global"),
            run_config=yaml_text if node.runtime == "lightning" else "",
        )
        content = RecordDict({ARRAYS: to_record(arrays), CONFIG: ins.to_record()})
        msgs.append(Message(content, dst_node_id=node.node_id, message_type=EVALUATE,
                            ttl=strategy.reply_timeout, group_id=f"{server_round}-eval"))  # fmt: skip
        strategy.eval_pending[node.node_id] = EvalSent(
            node.node_id, node.client.client_id, ws.width, base
        )
    return msgs


def read_eval_reply(
    sent: EvalSent, reply: Message, server_round: int
) -> tuple[dict[str, float], str]:
    """``(metrics, note)`` of an evaluate reply; :class:`ReplyRejected` naming the
    client for a reply that is not one (wrong client, round or base hash, a metric that
    is not a finite number)."""
    cid = sent.client_id
    if reply.has_error():
        raise ReplyRejected(f"client {cid!r}: node error {reply.error.code}: "
                            f"{reply.error.reason}")  # fmt: skip
    c = reply.content
    if not isinstance(c.get(METRICS), MetricRecord) or not isinstance(c.get(CONFIG), ConfigRecord):
        raise ReplyRejected(f"client {cid!r}: evaluate reply lacks its {METRICS!r}/{CONFIG!r}")
    meta = c[CONFIG]
    if str(meta.get("client-id")) != cid or meta.get("round") != server_round:
        raise ReplyRejected(f"client {cid!r}: evaluate reply says client "
                            f"{meta.get('client-id')!r}, round {meta.get('round')!r}")  # fmt: skip
    if meta.get("base-hash") != sent.base_hash:
        raise ReplyRejected(f"client {cid!r}: evaluated other weights than those sent "
                            f"(base hash {meta.get('base-hash')!r})")  # fmt: skip
    metrics = {k: finite_number(v, f"client {cid!r} metric {k!r}") for k, v in c[METRICS].items()}
    for k, v in metrics.items():
        if k.startswith(("acc/", "f1/")) and not 0.0 <= v <= 1.0:
            raise ReplyRejected(f"client {cid!r}: metric {k!r} = {v} is not in [0, 1]")
    return metrics, str(meta.get(NOTE, ""))


def eval_reply(
    msg: Message,
    ins: TrainInstructions,
    metrics: Mapping[str, float],
    num_examples: int,
    note: str = "",
) -> Message:
    """A node's reply to an evaluate message (``note``: why there is no score)."""
    mr = MetricRecord({"num-examples": int(num_examples)})
    for k, v in metrics.items():
        mr[k] = float(v)
    cr = ConfigRecord({"client-id": ins.client_id, "round": ins.round, "width": ins.width,
                       "base-hash": ins.base_hash, NOTE: note})  # fmt: skip
    return Message(RecordDict({METRICS: mr, CONFIG: cr}), reply_to=msg)


def finite_number(v: object, what: str) -> float:
    """``v`` as a float if it is a finite int/float (never a bool); else ReplyRejected."""
    try:
        x = float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan
    except OverflowError:  # an int beyond float range
        x = math.nan
    if not math.isfinite(x):
        raise ReplyRejected(f"{what}: expected a finite number, got {v!r}")
    return x


def run_yaml(cfg: Any) -> str:
    """The run's config as YAML (what a Lightning node rebuilds its client from)."""
    import yaml

    from fmtl_lightning.config import config_to_dict

    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def fold_eval_replies(
    rep: Any, pending: Mapping[int, EvalSent], replies: Iterable[Message], timeout: float
) -> None:
    """Each asked node's test metrics into the round report ``rep`` (``evaluated``: cid
    -> width + metrics), or why it has none (``not_evaluated``: no reply, an error, a
    bad reply, nothing scored). A node's second reply never counts."""
    for reply in replies:
        sent = pending.get(reply.metadata.src_node_id)
        if sent is None or sent.client_id in rep.evaluated or sent.client_id in rep.not_evaluated:
            continue
        try:
            metrics, note = read_eval_reply(sent, reply, rep.round)
        except ReplyRejected as exc:
            rep.not_evaluated[sent.client_id] = str(exc)
            log(WARNING, "fmtl: round %s: evaluation: %s", rep.round, exc)
            continue
        if not any(k.startswith("acc/") for k in metrics):
            rep.not_evaluated[sent.client_id] = note or "the node reported no test accuracy"
            continue
        rep.evaluated[sent.client_id] = {"width": sent.width, **metrics}
    for sent in pending.values():
        if sent.client_id not in rep.evaluated and sent.client_id not in rep.not_evaluated:
            rep.not_evaluated[sent.client_id] = (
                f"no evaluate reply within reply-timeout ({timeout:g} s)"
            )
