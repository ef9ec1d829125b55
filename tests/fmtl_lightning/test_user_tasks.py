"""User tasks from a run config: a regression task federated end to end, on Lightning and
edge clients, and config factory errors naming ``tasks[i].factory``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fmtl_lightning.config import ConfigError, parse_config
from fmtl_lightning.simulation import Simulation
from fmtl_lightning.tasks import TASKS, get_task, unregister_task

FACTORY = "examples.user_tasks:digit_value_tasks"
REPO = Path(__file__).resolve().parents[2]


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


def test_a_regression_task_trains_on_an_edge_client_like_in_lightning(
    small_cfg, tmp_path, user_tasks, capsys
):
    """A user's regression task (MSE, float32 targets) with a width-1/2 edge client: the
    exported step graph trains it in ONNX Runtime as Lightning does, and the device's
    bundle predicts the values (``fmtl-edge predict`` prints them by output name)."""
    import copy

    from fmtl_lightning.checkpoint import read_round
    from fmtl_lightning.simulation import run_config
    from mobile_client.cli import main
    from mobile_client.manifest import load_manifest
    from mobile_client.runtime import EdgeClient

    def cfg(edge: bool) -> dict:
        raw = copy.deepcopy(small_cfg)
        raw["tasks"] = [{"factory": FACTORY}]
        raw["model"]["hidden"] = [16, 8]
        raw["clients"] = [
            {"count": 1, "tasks": ["digits/value", "digits/parity"], "width": 1.0},
            {"count": 1, "tasks": ["digits/value", "digits/parity"], "width": 0.5, "edge": edge},
        ]
        return raw

    run_config(cfg(False), tmp_path / "l", progress=False)
    run_config(cfg(True), tmp_path / "e", progress=False)
    g_ref, c_ref, _, _ = read_round(tmp_path / "l", 2)
    g, clients, _, _ = read_round(tmp_path / "e", 2)
    for k in g_ref:
        np.testing.assert_allclose(g[k], g_ref[k], rtol=0, atol=1e-5, err_msg=k)
    for k, v in c_ref["c01"].items():
        np.testing.assert_allclose(clients["c01"][k], v, rtol=0, atol=1e-5, err_msg=k)
    (bundle,) = (tmp_path / "e" / "edge" / "bundles").iterdir()
    m = load_manifest(bundle)
    kinds = {h.task: (h.kind, h.labels) for h in m.heads}
    assert kinds["digits/value"] == ("regression", ("value",))
    assert m.widths[0].train_steps[0].file.task_kinds["digits/value"] == "regression"
    edge = EdgeClient(bundle)
    x = np.random.default_rng(0).standard_normal((2, *m.clients[0].normalisation.input_shape))
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    want = edge.predict("digits/value", x.astype(np.float32))  # (2, 1) values
    assert main(["predict", str(bundle), "--task", "digits/value", "--client", "c01",
                 "--width", "0.5", str(tmp_path / "x.npy")]) == 0  # fmt: skip
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert [ln.split("\t")[1] for ln in lines[-2:]] == [f"value={v:.6g}" for v in want[:, 0]]
    sim_x = np.zeros((3, *m.clients[0].normalisation.input_shape), np.float32)
    with pytest.raises(Exception, match=r"targets\['digits/value'\] has dtype int64"):
        edge.train(sim_x, {"digits/value": np.zeros((3, 1), np.int64),
                           "digits/parity": np.zeros(3, np.int64)}, lr=0.1)  # fmt: skip


def test_a_regression_task_with_its_own_loss_is_refused_on_edge_clients(small_cfg, user_tasks):
    from examples.user_tasks import _value_target
    from fmtl_lightning.tasks import Task, register_task

    register_task(Task("digits/l1", 1, "regression", domain="digits", target=_value_target("l1"),
                       loss=lambda z, y: (z - y).abs().mean()))  # fmt: skip
    small_cfg["clients"] = [{"count": 1, "tasks": ["digits/l1"], "edge": True}]
    with pytest.raises(ConfigError, match=r"clients\[0\]\.edge.*'digits/l1'.*its own loss"):
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


def test_a_task_without_a_domain_federates_the_users_own_tensors(user_tasks):
    """The Task docstring's promise: own data needs no domain (this was refused with
    "all tasks must be on domain 'own'"); a built-in task on the same client still sets
    the domain, and two built-in domains on one client are still refused."""
    import torch

    from fmtl_lightning.errors import FederationError
    from fmtl_lightning.fed_data import federation_from_tensors
    from fmtl_lightning.federation import ClientSpec
    from fmtl_lightning.tasks import Task, register_task

    register_task(Task("user/free3", 3, "multiclass"))
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(12, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    y, yt = torch.tensor([0, 1, 1] * 4), torch.tensor([2, 0, 1, 1])
    fed = federation_from_tensors([(x, {"user/free3": y})], [(xt, {"user/free3": yt})], [0.5])
    (c,) = fed.clients
    assert (c.spec.domain, c.tasks, c.width, c.num_train, c.num_test) == (
        "own",
        ("user/free3",),
        0.5,
        12,
        4,
    )
    assert torch.equal(c.x_train, x) and torch.equal(c.y_test["user/free3"], yt)
    assert c.label_masks["user/free3"].tolist() == [True, True, False]  # class 2 unseen
    both = {"user/free3": y, "mnist/parity": y % 2}
    fed = federation_from_tensors([(x, both)], [(xt, {"user/free3": yt, "mnist/parity": yt % 2})],
                                  [1.0])  # fmt: skip
    assert fed.clients[0].spec.domain == "mnist"  # the built-in task's, whatever the order
    with pytest.raises(FederationError, match="all tasks must be on domain 'mnist'"):
        ClientSpec("c00", ("mnist/parity", "fashion/item"), 1.0, [0], [1], "mnist")


def _own_data_config() -> dict:
    """``examples/own_data.yaml`` (the user's own tasks and data) with an edge client."""
    import yaml

    raw = yaml.safe_load((REPO / "examples" / "own_data.yaml").read_text())
    raw["clients"][1]["edge"] = True
    raw["federation"]["rounds"] = 2
    return raw


def test_own_tasks_on_own_data_from_a_config_run_resume_and_export(tmp_path, user_tasks):
    """Tasks without a built-in dataset, their data from ``data.factory``: the config is
    accepted, and the matrix's whole check holds (a killed run resumes to the straight
    one, its local baseline too; the export's ORT predictions and SGD step equal torch's,
    at the edge client's width). Without ``data.factory`` the same tasks are refused
    naming it; the Flower deployment refuses them naming the tasks."""
    from fmtl_lightning.config import load_config
    from fmtl_lightning.deploy.server_app import DeployedRun
    from mobile_client.manifest import load_manifest
    from tests.matrix.runner import run_combination

    example = load_config(REPO / "examples" / "own_data.yaml")  # as shipped: accepted
    assert example.data.factory == "examples.own_data:own_digits"
    cfg = parse_config(_own_data_config())
    done = run_combination(cfg, tmp_path)
    assert done == {"baseline": True, "predict": ["mine/odd"], "step": "parity"}
    m = load_manifest(tmp_path / "bundle")
    assert m.normalisation.domain == "own" and m.normalisation.input_shape == (1, 28, 28)
    assert [(h.client, h.task, h.labels) for h in m.heads] == [("c02", "mine/odd", ("even", "odd"))]
    no_factory = _own_data_config()
    del no_factory["data"]
    with pytest.raises(ConfigError, match=r"clients\[0\]\.tasks: .*'mine/digit'.*data\.factory"):
        parse_config(no_factory)
    with pytest.raises(ConfigError, match=r"clients: tasks \['mine/digit', 'mine/odd'\]"):
        DeployedRun(cfg, tmp_path / "deployed", reply_timeout=5.0)
    assert not (tmp_path / "deployed").exists()
