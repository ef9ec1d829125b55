"""A deployed round's deadline, its minimum number of replies, and late replies.

* **Deadline** (run config ``reply-timeout``, seconds, finite and > 0): the train
  messages are pushed (Flower's ``Grid.push_messages``) and their replies pulled
  (``Grid.pull_messages``) until every node has answered or the deadline has passed;
  a node that has not answered by then is recorded as failed for the round.
* **Minimum replies** (``min-replies``, an int in ``[1, clients in the YAML]``): a round
  with fewer accepted replies by its deadline aggregates nothing (the global state
  stays as it was, the round is recorded with the reason) and the run goes on.
* **Late replies**: a train message lives ``3 x reply-timeout`` (its TTL: its round's
  wait, its evaluate exchange, the next round's wait), so a reply that comes after the
  deadline still reaches the SuperLink. At the end of every round (after its evaluate
  exchange), at the start of the next and at the end of the run, the server pulls the
  replies to unanswered train messages and records each in the report of the round
  it is pulled in (``late``: ``"<client> (round r)"`` -> what came); a late reply never
  enters an aggregate: each round aggregates only replies to its own messages,
  received by its deadline. A reply after the TTL is dropped by the SuperLink.

:class:`RoundReport` is what happened in one round (the round's ``meta.json``). Numpy-free
and torch-free: Flower's Grid and the clock only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fmtl_lightning.config import ConfigError


@dataclass
class RoundReport:
    """What happened in one round, per client id (written to the round's meta.json)."""

    round: int
    sent: dict[str, dict[str, Any]] = field(default_factory=dict)  # cid -> width, bytes
    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)  # cid -> metrics
    rejected: dict[str, str] = field(default_factory=dict)  # cid -> reason
    failed: dict[str, str] = field(default_factory=dict)  # cid -> reason (error, timeout)
    times: dict[str, float] = field(default_factory=dict)
    # the evaluation after aggregation (when due): cid -> width + test metrics, or why none
    evaluated: dict[str, dict[str, Any]] = field(default_factory=dict)
    not_evaluated: dict[str, str] = field(default_factory=dict)
    late: dict[str, str] = field(default_factory=dict)  # replies to earlier rounds, not used
    not_aggregated: str = ""  # why this round left the global state as it was

    def as_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "sent": self.sent,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "failed": self.failed,
            "evaluated": self.evaluated,
            "not_evaluated": self.not_evaluated,
            "late": self.late,
            "not_aggregated": self.not_aggregated,
            "times": {k: round(v, 6) for k, v in self.times.items()},
        }


POLL_S = 0.2  # seconds between two pulls while a round waits for replies


def check_round_rules(reply_timeout: object, min_replies: object, per_round: int) -> None:
    """``reply-timeout`` a finite number > 0, ``min-replies`` an int in ``[1, per_round]``
    (``per_round``: the clients a round sends work to, ``federation.fraction`` of the
    YAML's); a :class:`ConfigError` names the key."""
    ok = isinstance(reply_timeout, int | float) and not isinstance(reply_timeout, bool)
    if not ok or not math.isfinite(float(reply_timeout)) or float(reply_timeout) <= 0:  # type: ignore[arg-type]
        raise ConfigError(f"run config 'reply-timeout': the round deadline must be a finite "
                          f"number of seconds > 0, got {reply_timeout!r}")  # fmt: skip
    if (
        not isinstance(min_replies, int)
        or isinstance(min_replies, bool)
        or not (1 <= min_replies <= per_round)
    ):
        raise ConfigError(f"run config 'min-replies': must be an int in [1, {per_round}] (the "
                          f"clients a round samples: federation.fraction of the YAML's), "
                          f"got {min_replies!r}")  # fmt: skip


def _match(reply: Any, waiting: Mapping[str, int]) -> str | None:
    """The id of the message in ``waiting`` that ``reply`` answers: its
    ``reply_to_message_id``, else (a grid that sets no ids) its source node's message."""
    mid = str(reply.metadata.reply_to_message_id)
    if mid in waiting:
        return mid
    return next((i for i, n in waiting.items() if n == reply.metadata.src_node_id), None)


def collect(
    grid: Any, messages: Sequence[Any], deadline_s: float, poll_s: float = POLL_S
) -> tuple[list[Any], dict[str, int], dict[int, str]]:
    """Push ``messages`` and pull their replies until all have answered or
    ``deadline_s`` has passed. Returns (the nodes' replies, unanswered: message id ->
    destination node id, and node id -> reason for messages the SuperLink answered in
    the node's place: the node stopped sending heartbeats, the message expired)."""
    if not messages:
        return [], {}, {}
    ids = [str(i) for i in grid.push_messages(messages)]
    waiting = {i: int(m.metadata.dst_node_id) for i, m in zip(ids, messages, strict=True)}
    replies: list[Any] = []
    by_link: dict[int, str] = {}
    end = time.monotonic() + deadline_s
    while True:
        for r in grid.pull_messages(list(waiting)):
            mid = _match(r, waiting)
            if mid is None:
                continue  # not an answer to this round's messages
            node = waiting.pop(mid)
            if r.metadata.src_node_id == node:
                replies.append(r)
            else:
                by_link[node] = f"SuperLink: {r.error.reason}" if r.has_error() else "SuperLink"
        if not waiting or time.monotonic() >= end:
            return replies, waiting, by_link
        time.sleep(min(poll_s, max(0.0, end - time.monotonic())))


class LateReplies:
    """Unanswered train messages of past rounds; :meth:`pull` records their late replies."""

    def __init__(self) -> None:
        self.outstanding: dict[int, dict[str, tuple[int, str]]] = {}  # round -> id -> node, cid

    def expect(self, server_round: int, unanswered: Mapping[str, int],
               client_of: Mapping[int, str]) -> None:  # fmt: skip
        """Remember ``unanswered`` (message id -> node id) of ``server_round``."""
        if unanswered:
            self.outstanding[server_round] = {
                i: (n, client_of.get(n, f"node-{n}")) for i, n in unanswered.items()
            }

    def pull(self, grid: Any) -> dict[str, str]:
        """Replies to earlier rounds' unanswered messages that have come since: ``{cid
        (round r): what}`` entries for a round report's ``late``. Never aggregated. A
        message that expired unanswered (the SuperLink answers in the node's place) is
        dropped: no reply ever came."""
        out: dict[str, str] = {}
        for r, msgs in list(self.outstanding.items()):
            waiting = {i: n for i, (n, _) in msgs.items()}
            for reply in grid.pull_messages(list(msgs)) if msgs else []:
                mid = _match(reply, waiting)
                if mid is None:
                    continue
                node, cid = msgs.pop(mid)
                del waiting[mid]
                if reply.metadata.src_node_id == node:
                    what = "an error" if reply.has_error() else "a reply"
                    out[f"{cid} (round {r})"] = (
                        f"{what} to round {r} after its deadline: recorded, not aggregated"
                    )
            if not msgs:
                del self.outstanding[r]
        return out
