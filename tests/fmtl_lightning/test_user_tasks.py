"""User tasks from a run config: a regression task federated end to end, refused on edge
clients, and config factory errors naming ``tasks[i].factory``."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from fmtl_lightning.config import ConfigError, parse_config
from fmtl_lightning.simulation import Simulation
from fmtl_lightning.tasks import TASKS, get_task, unregister_task

FACTORY = "examples.user_tasks:digit_value_tasks"


@pytest.fixture
def user_tasks() -> Iterator[None]:
    """Leave the registry as it was (other tests count the built-ins)."""
    before = set(TASKS)
    yield
    for name in set(TASKS) - before:
        unregister_task(name)


def test_a_config_factory_registers_a_regression_task_that_federates(
    small_cfg, tmp_path, user_tasks
):
    small_cfg["tasks"] = [{"factory": FACTORY}]
    small_cfg["clients"] = [
        {"count": 2, "tasks": ["digits/value", "digits/parity"], "width": 1.0},
        {"count": 1, "tasks": ["digits/value"], "width": 0.5},
    ]
    cfg = parse_config(small_cfg)
    assert parse_config(small_cfg) == cfg  # the same factory twice: no duplicate error
    task = get_task("digits/value")
    assert task.kind == "regression" and task.num_outputs == 1
    sim = Simulation(cfg, tmp_path / "run", progress=False)
    c = sim.fed.clients[0]
    assert c.y_train["digits/value"].dtype == torch.float32
    assert c.y_train["digits/value"].shape == (c.x_train.shape[0], 1)
    assert "digits/value" not in c.label_masks  # masks are for multiclass tasks only
    out = sim.run()
    rows = [r for r in sim.history if r["task"] == "digits/value" and r["round"] == 2]
    assert len(rows) == 3
    # the row of client c00 against an independent computation on its test split
    m = sim.pool.module_for(c, 1.0)
    from fmtl_lightning.models import load_arrays

    load_arrays(m.model, sim.client_state(c, sim.eval_widths(2)[0]))
    m.eval()
    with torch.no_grad():
        z = m(c.x_test)["digits/value"].double().numpy()
    y = c.y_test["digits/value"].double().numpy()
    mse = float(np.mean((z - y) ** 2))
    r2 = 1 - np.sum((z - y) ** 2) / np.sum((y - y.mean()) ** 2)
    (row,) = [r for r in rows if r["client"] == c.cid]
    assert row["loss"] == pytest.approx(mse, abs=2e-6)
    assert row["acc"] == pytest.approx(r2, abs=2e-6) and row["f1"] == ""
    assert np.isfinite(out["mean_acc"])


def test_regression_on_edge_clients_is_refused_naming_the_fields(small_cfg, user_tasks):
    small_cfg["tasks"] = [{"factory": FACTORY}]
    small_cfg["clients"] = [{"count": 1, "tasks": ["digits/value"], "edge": True}]
    with pytest.raises(ConfigError, match=r"clients\[0\]\.edge.*clients\[0\]\.tasks.*regression"):
        parse_config(small_cfg)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"factory": "nowhere.at_all:make"}, r"tasks\[0\]\.factory: .*cannot be imported"),
        ({"factory": "not a path"}, r"tasks\[0\]\.factory: .*import path"),
        ({"factory": 3}, r"tasks\[0\]\.factory: expected a string"),
        ({"make": FACTORY}, r"tasks\[0\]\.make: unknown field"),
    ],
)
def test_bad_task_factories_in_a_config_name_the_field(small_cfg, entry, match, user_tasks):
    small_cfg["tasks"] = [entry]
    with pytest.raises(ConfigError, match=match):
        parse_config(small_cfg)


def test_a_task_without_a_domain_cannot_name_a_built_in_dataset(small_cfg, user_tasks):
    from fmtl_lightning.tasks import Task, register_task

    register_task(Task("user/free", 2, "multiclass"))
    small_cfg["clients"] = [{"count": 1, "tasks": ["user/free"]}]
    with pytest.raises(ConfigError, match=r"clients\[0\]\.tasks: task 'user/free' needs a domain"):
        parse_config(small_cfg)
