"""A deployed round's deadline, minimum replies and late replies, on the fake Grid.

``reply-timeout`` (the deadline) and ``min-replies`` are validated by name; a round with
fewer accepted replies than ``min-replies`` keeps the global state; a reply that comes
after its round's deadline is recorded in the next round's report and never enters an
aggregate (the run ends exactly where a run without that reply ends).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

pytest.importorskip("flwr")

from fmtl_lightning.config import ConfigError, parse_config  # noqa: E402
from fmtl_lightning.deploy.rounds import check_round_rules  # noqa: E402
from fmtl_lightning.deploy.server_app import DeployedRun  # noqa: E402
from tests.deploy.test_deploy_strategy import (  # noqa: E402
    CFG,
    NODE_CONFIG,
    FakeGrid,
    _task_identity,  # noqa: F401 (autouse fixture)
    good_node,
)

DEADLINE = 0.3  # seconds: the fake nodes answer at once or only after release()


@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf, "60", True, None])
def test_the_round_deadline_must_be_a_finite_positive_number(value):
    with pytest.raises(ConfigError, match="'reply-timeout': the round deadline must be"):
        check_round_rules(value, 1, 3)


@pytest.mark.parametrize("value", [0, 4, -1, 1.5, True, "2"])
def test_min_replies_must_be_an_int_up_to_the_clients_a_round_samples(value, tmp_path):
    with pytest.raises(ConfigError, match=r"'min-replies': must be an int in \[1, 3\]"):
        check_round_rules(60.0, value, 3)
    raw = copy.deepcopy(CFG)
    raw["federation"]["fraction"] = 0.5  # 2 of 3 clients per round
    with pytest.raises(ConfigError, match=r"'min-replies': must be an int in \[1, 2\]"):
        DeployedRun(parse_config(raw), tmp_path / "run", reply_timeout=60.0, min_replies=3)
    check_round_rules(60, 3, 3)  # ints are seconds too


def _run(tmp_path, name, grid, rounds=2, **kw) -> tuple[DeployedRun, dict]:
    run = DeployedRun(parse_config(copy.deepcopy(CFG)), tmp_path / name,
                      reply_timeout=DEADLINE, **kw)  # fmt: skip
    run.wait_for_nodes(grid, 0, 1.0)
    reports = []
    for r in range(1, rounds + 1):
        reports.append(run.run_round(grid, r).as_dict())
        grid.hold.clear()
        grid.release()  # what was late now reaches the SuperLink
    return run, reports


def test_fewer_replies_than_min_replies_keep_the_global_state(tmp_path):
    grid = FakeGrid({n: good_node(n) for n in NODE_CONFIG})
    grid.hold = {103}  # c02 misses round 1's deadline
    run = DeployedRun(parse_config(copy.deepcopy(CFG)), tmp_path / "run",
                      reply_timeout=DEADLINE, min_replies=3)  # fmt: skip
    run.wait_for_nodes(grid, 0, 1.0)
    before = {k: v.copy() for k, v in run.engine.global_state.items()}
    rep = run.run_round(grid, 1)
    assert sorted(rep.accepted) == ["c00", "c01"]
    assert rep.failed == {"c02": f"no reply within reply-timeout ({DEADLINE:g} s)"}
    assert (
        rep.not_aggregated
        == "2 accepted replies by the deadline, min-replies is 3: the global state is kept"
    )
    for k, v in before.items():
        np.testing.assert_array_equal(run.engine.global_state[k], v, err_msg=k)
    grid.hold.clear()
    rep2 = run.run_round(grid, 2)  # everyone on time: aggregated
    assert rep2.not_aggregated == "" and sorted(rep2.accepted) == ["c00", "c01", "c02"]
    assert any(not np.array_equal(run.engine.global_state[k], before[k]) for k in before)
    from fmtl_lightning.deploy.cli import deploy_report

    text = deploy_report(run.summary(2))
    assert "round 1: accepted c00, c01; failed c02\n  not aggregated: 2 accepted replies" in text


def test_a_late_reply_is_recorded_in_the_next_round_and_never_aggregated(tmp_path):
    late_grid = FakeGrid({n: good_node(n) for n in NODE_CONFIG})
    late_grid.hold = {103}  # c02's round-1 reply comes after the deadline
    late, reps = _run(tmp_path, "late", late_grid)
    assert reps[0]["failed"] == {"c02": f"no reply within reply-timeout ({DEADLINE:g} s)"}
    assert reps[1]["late"] == {
        "c02 (round 1)": "a reply to round 1 after its deadline: recorded, not aggregated"
    }
    assert sorted(reps[1]["accepted"]) == ["c00", "c01", "c02"]
    # the reference: c02 never answers round 1 at all
    silent = {n: good_node(n) for n in NODE_CONFIG}
    first = silent[103]
    silent[103] = lambda m: None if m.metadata.group_id == "1" else first(m)
    ref, ref_reps = _run(tmp_path, "ref", FakeGrid(silent))
    assert ref_reps[1]["late"] == {}
    for k, v in ref.engine.global_state.items():
        np.testing.assert_array_equal(late.engine.global_state[k], v, err_msg=k)
    summary = late.summary(2)
    assert summary["per_round"][1]["late"] == reps[1]["late"]
    from fmtl_lightning.deploy.cli import deploy_report

    assert "round 2: accepted c00, c01, c02; late replies c02 (round 1)" in deploy_report(summary)


def _msg(dst: int = 0, src: int = 0, reply_to: str = "", error: str | None = None):
    from types import SimpleNamespace

    md = SimpleNamespace(dst_node_id=dst, src_node_id=src, reply_to_message_id=reply_to)
    return SimpleNamespace(metadata=md, has_error=lambda: error is not None,
                           error=SimpleNamespace(reason=error))  # fmt: skip


class IdGrid:
    """Message ids like Flower's: replies name the message they answer."""

    def __init__(self, answers):
        self.answers = answers  # pull number -> replies it returns

    def push_messages(self, messages):
        self.pulls = 0
        return [f"id{m.metadata.dst_node_id}" for m in messages]

    def pull_messages(self, ids):
        self.pulls += 1
        return [
            r for r in self.answers.get(self.pulls, []) if r.metadata.reply_to_message_id in ids
        ]


def test_collect_matches_replies_by_message_and_names_what_the_superlink_answered():
    from fmtl_lightning.deploy.rounds import LateReplies, collect

    unavailable = "Error: Node Unavailable"
    grid = IdGrid({
        1: [_msg(src=1, reply_to="id1")],
        2: [_msg(src=0, reply_to="id2", error=unavailable)],  # the SuperLink, for node 2
    })  # fmt: skip
    replies, unanswered, by_link = collect(grid, [_msg(dst=n) for n in (1, 2, 3)], 0.5, 0.01)
    assert [r.metadata.src_node_id for r in replies] == [1]
    assert unanswered == {"id3": 3} and by_link == {2: f"SuperLink: {unavailable}"}
    late = LateReplies()
    late.expect(1, unanswered, {3: "c02"})
    grid.answers = {1: [_msg(src=0, reply_to="id3", error="expired")]}  # expired, no reply
    grid.pulls = 0
    assert late.pull(grid) == {} and late.outstanding == {}
    late.expect(1, {"id3": 3}, {3: "c02"})
    grid.answers, grid.pulls = {1: [_msg(src=3, reply_to="id3")]}, 0
    assert late.pull(grid) == {
        "c02 (round 1)": "a reply to round 1 after its deadline: recorded, not aggregated"
    }
