"""A node that replies twice in one round counts once (found by the hostile sweep)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord  # noqa: E402

from fmtl_lightning.aggregation import ClientUpdate, aggregate  # noqa: E402
from fmtl_lightning.config import parse_config  # noqa: E402
from fmtl_lightning.deploy.strategy import FMTLStrategy  # noqa: E402
from fmtl_lightning.engine import ServerEngine  # noqa: E402
from fmtl_lightning.engine.plan import server_plan  # noqa: E402
from fmtl_lightning.roles import WidthSpec  # noqa: E402
from mobile_client.flower_app import read_train_message, reply_message  # noqa: E402
from tests.hostile.surface_replies import BASE_CFG, FakeGrid, RunIdentity  # noqa: E402


def test_a_second_reply_from_a_node_is_rejected_and_not_averaged_in():
    plan = server_plan(parse_config(copy.deepcopy(BASE_CFG)))
    grid = FakeGrid(plan)
    with RunIdentity():
        s = FMTLStrategy(ServerEngine(plan, "unused"), reply_timeout=5.0)
        s.register(grid)
        msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
        replies, want = [], []
        for i, m in enumerate(msgs):
            arrays, ins = read_train_message(m)
            first = {k: v + np.float32(i + 1) for k, v in arrays.items()}
            replies.append(reply_message(m, first, 10 + i, {"loss": 1.0}, ins))
            want.append(ClientUpdate(ins.client_id, first, 10 + i, WidthSpec(ins.width)))
            if i == 1:  # the same node again, with other arrays and a larger claim
                again = {k: v + np.float32(100) for k, v in arrays.items()}
                replies.append(reply_message(m, again, 60, {"loss": 9.0}, ins))
        _, metrics = s.aggregate_train(1, replies)
    rep = s.report
    assert sorted(rep.accepted) == ["c00", "c01", "c02"]
    assert rep.accepted["c01"]["num_examples"] == 11 and rep.accepted["c01"]["loss"] == 1.0
    assert list(rep.rejected) == ["c01 (extra reply)"]
    assert "replied again this round" in rep.rejected["c01 (extra reply)"]
    assert metrics["accepted"] == 3 and metrics["rejected"] == 1 and metrics["loss"] == 1.0
    expected = aggregate(plan.initial_state, want, plan.spec, weighting="examples")
    assert set(s.engine.global_state) == set(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(s.engine.global_state[k], v, err_msg=k)
