"""Bring your own model: every zoo architecture federated like a built-in family.

Each zoo model (written the way users write them, :mod:`fmtl_lightning.zoo`) is given to
the library as a whole model with its head declared (:meth:`FederatedModel.from_model`)
and federated under FedPer on real data (sklearn digits, reshaped to the input the model
takes) by clients at widths 1 and 1/2: two rounds, then a run killed after round 1 and
resumed gives the same states bit for bit; the global state holds the backbone at full
width, the clients only their heads, and a width-1/2 client trains exactly the sliced shapes.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fmtl_lightning.checkpoint import completed_rounds, read_round
from fmtl_lightning.config import parse_config
from fmtl_lightning.errors import WidthPlanError
from fmtl_lightning.fed_data import build_federation
from fmtl_lightning.model_source import FederatedModel
from fmtl_lightning.roles import WidthSpec
from fmtl_lightning.simulation import Simulation, resume_run, run_config
from fmtl_lightning.zoo import DenseNet, LeNet, MobileNetV2, ResNet, SeqConvNet, TinyViT
from tests.fmtl_lightning.conftest import BASE
from tests.matrix.runner import Killed, kill_after_first


class TabularBackbone(nn.Module):
    """What a user writes for tabular data: features -> hidden layers (BatchNorm, dropout)."""

    def __init__(self, in_features: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 32)
        self.bn1 = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 16)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(F.relu(self.fc2(F.relu(self.bn1(self.fc1(x))))))


def _rgb16(x: torch.Tensor) -> torch.Tensor:  # (N, 1, 8, 8) digits -> (N, 3, 16, 16)
    return F.interpolate(x, size=16, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)


# name -> (the user's model, the head submodule, how the digits become its input)
CASES = {
    "tabular": (None, None, lambda x: x.flatten(1)),
    "lenet": (lambda: LeNet(), "fc3", lambda x: F.interpolate(x, size=28, mode="bilinear")),
    "resnet": (lambda: ResNet(), "linear", _rgb16),
    "mobilenetv2": (lambda: MobileNetV2(), "classifier", _rgb16),
    "densenet": (lambda: DenseNet(), "classifier", _rgb16),
    "seqconv": (lambda: SeqConvNet(in_features=8), "fc", lambda x: x[:, 0]),  # 8 rows of 8
    "vit": (lambda: TinyViT(), "head", _rgb16),
}


def _setup(name: str):
    make, head, to_input = CASES[name]
    raw = copy.deepcopy(BASE)
    raw["optimizer"]["lr"] = 0.05
    cfg = parse_config(raw)
    fed = build_federation(cfg)
    clients = [dataclasses.replace(c, x_train=to_input(c.x_train), x_test=to_input(c.x_test))
               for c in fed.clients]  # fmt: skip
    fed = dataclasses.replace(fed, clients=clients)
    example = clients[0].x_train[:2]
    torch.manual_seed(0)
    if make is None:
        fm = FederatedModel(TabularBackbone(), example_input=example)
    else:
        fm = FederatedModel.from_model(make(), head=head, example_input=example)
    return cfg, fed, fm


def _states(run_dir):
    g, clients, _, _ = read_round(run_dir, completed_rounds(run_dir)[-1])
    return g, clients


@pytest.mark.parametrize("name", list(CASES))
def test_zoo_model_federates_resumes_and_slices(name, tmp_path):
    cfg, fed, fm = _setup(name)
    summary = run_config(cfg, tmp_path / "straight", progress=False, model=fm, federation=fed)
    assert 0.0 <= summary["mean_acc"] <= 1.0

    sim = Simulation(cfg, tmp_path / "probe", progress=False, model=fm, federation=fed)
    spec = sim.spec
    g, clients = _states(tmp_path / "straight")
    assert set(g) == set(spec.shared_keys()) and spec.keys_of_kind("head")
    assert not set(spec.keys_of_kind("head")) & set(g)  # FedPer: heads never reach the server
    for k, v in g.items():
        assert v.shape == spec[k].shape and np.isfinite(v).all(), k
    init = sim.engine.plan.initial_state
    assert any(not np.array_equal(g[k], init[k]) for k in g)  # the backbone learned
    for cid, st in clients.items():
        assert {k.split("/", 1)[1] for k in st} <= set(spec.keys_of_kind("head")), cid

    # the width-1/2 client trains exactly the sliced shapes
    c = sim.fed.clients[2]
    assert c.width == 0.5
    model = sim.pool.module_for(c, 0.5).model
    for k, v in model.state_dict().items():
        assert tuple(v.shape) == spec.shape_at(k, WidthSpec(0.5)), (name, k)
    assert any(tuple(v.shape) != spec[k].shape for k, v in model.state_dict().items())

    with pytest.raises(Killed):
        Simulation(cfg, tmp_path / "killed", progress=False, model=fm, federation=fed).run(
            kill_after_first
        )
    resume_run(tmp_path / "killed", progress=False, model=fm, federation=fed)
    g2, clients2 = _states(tmp_path / "killed")
    for k in g:
        np.testing.assert_array_equal(g2[k], g[k], err_msg=k)
    for cid in clients:
        for k in clients[cid]:
            np.testing.assert_array_equal(clients2[cid][k], clients[cid][k], err_msg=f"{cid} {k}")


def test_a_bad_split_is_refused_naming_what_is_wrong():
    x = torch.zeros(2, 1, 28, 28)
    with pytest.raises(WidthPlanError, match="head: 'fc9' is not a submodule of LeNet"):
        FederatedModel.from_model(LeNet(), head="fc9", example_input=x)
    with pytest.raises(
        WidthPlanError, match=r"backbone: must map the example input to \(batch, features\)"
    ):
        FederatedModel(nn.Conv2d(1, 4, 3), example_input=x)
    fm = FederatedModel(TabularBackbone(), example_input=torch.zeros(2, 64),
                        heads={"digits/digit": nn.Linear(16, 7)})  # fmt: skip
    with pytest.raises(
        WidthPlanError, match=r"heads\['digits/digit'\]: gives 7 outputs, the task has 10"
    ):
        fm.spec({"digits/digit": 10})


def test_the_user_head_is_used_and_the_model_itself_is_unchanged():
    net = LeNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fm = FederatedModel.from_model(net, head="fc3", example_input=torch.zeros(2, 1, 28, 28))
    m = fm.build({"digits/digit": 10, "digits/parity": 2}, 1.0)
    from fmtl_lightning.models import head_name

    digit = m.heads[head_name("digits/digit")]
    torch.testing.assert_close(digit.weight, net.fc3.weight)  # the model's own head
    assert m.heads[head_name("digits/parity")].out_features == 2  # a linear head of its own
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert isinstance(net.fc3, nn.Linear)


EXPORTABLE = ("lenet", "resnet", "mobilenetv2", "densenet", "seqconv", "vit", "tabular")
REFUSED = {"tabular": "dropout layer"}  # exported only with dropout="off"


@pytest.mark.parametrize("name", EXPORTABLE)
def test_zoo_model_exports_and_trains_on_the_edge_with_parity(name, tmp_path):
    """A width-1/2 client model of each zoo architecture, exported as a bundle and run
    by the edge runtime (:class:`mobile_client.runtime.EdgeClient`, numpy + onnxruntime)
    on real data: its predictions equal torch eval's, and one train step on the device
    give the weights (every parameter and buffer) and losses of ``torch.optim.SGD`` to
    1e-5. Inputs of any shape: images (C, H, W), sequences (L, F), features (F,). A model
    with dropout is refused naming it, and exports with ``dropout="off"``."""
    from export.bundle import RunExportError
    from export.run_export import export_model
    from export.trainstep import task_loss
    from mobile_client.manifest import load_manifest
    from mobile_client.runtime import EdgeClient

    cfg, fed, fm = _setup(name)
    c = fed.clients[2]  # width 1/2, tasks parity (multiclass) + attrs (multilabel)
    kinds = {"digits/parity": "multiclass", "digits/attrs": "multilabel"}
    torch.manual_seed(1)
    model = fm.build({t: fed.task_outputs()[t] for t in c.tasks}, 0.5)
    norm = {"mean": 0.0, "std": 1.0, "input_shape": list(model.input_shape)}
    options = {}
    if name in REFUSED:
        with pytest.raises(RunExportError, match=REFUSED[name]):
            export_model(model, kinds, tmp_path / "refused", normalisation=norm)
        assert not (tmp_path / "refused").exists()
        options = {"dropout": "off"}
    bundle = export_model(model, kinds, tmp_path / "bundle", normalisation=norm, **options)
    m = load_manifest(bundle)
    assert m.width_values() == [0.5] and m.widths[0].feature_dim == model.feature_dim
    assert m.normalisation.input_shape == tuple(c.x_train.shape[1:])

    edge = EdgeClient(bundle)
    x = c.x_test[:5]
    with torch.no_grad():
        want = model.eval()(x)
    for t in kinds:
        np.testing.assert_allclose(
            edge.predict(t, x.numpy()), want[t].numpy(), rtol=1e-5, atol=1e-5
        )

    # one step on 12 real examples, on the device and with torch.optim.SGD
    xb = c.x_train[:12]
    ys = {t: c.y_train[t][:12] for t in kinds}
    res = edge.train(xb.numpy(), {t: y.numpy() for t, y in ys.items()}, batch_size=12,
                     steps=1, lr=0.05)  # fmt: skip
    ref = copy.deepcopy(model).train()
    if options:
        for mod in ref.modules():
            if isinstance(mod, nn.Dropout):
                mod.p = 0.0
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    out = ref(xb)
    loss = torch.stack([task_loss(kinds[t], out[t], ys[t]) for t in kinds]).sum()
    loss.backward()
    opt.step()
    torch_loss = float(loss.detach())
    assert abs(res.metrics["last_loss"] - torch_loss) < 1e-5 * max(1.0, torch_loss)
    got, want_state = res.state, ref.state_dict()
    assert set(got) == set(want_state)
    err = {k: float(np.abs(got[k].astype(np.float64) - want_state[k].numpy()).max()) for k in got}
    assert max(err.values()) < 1e-5, err
    assert any(not np.array_equal(got[k], model.state_dict()[k].numpy()) for k in got)


def _own_clients():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(d.target)
    train, test = [], []
    for i, part in enumerate(torch.arange(360).chunk(3)):
        task, target = ("digits/digit", y) if i != 1 else ("digits/parity", y % 2)
        train.append((x[part[:90]], {task: target[part[:90]]}))
        test.append((x[part[90:]], {task: target[part[90:]]}))
    return x, train, test


def test_own_data_and_model_run_and_export_a_client(tmp_path):
    """A user's tensors (federation_from_tensors) and model, two rounds, then one client's
    bundle: its manifest names the client and its ORT logits equal the torch model's."""
    from export.parity import session
    from fmtl_lightning.fed_data import federation_from_tensors
    from fmtl_lightning.models import head_name, load_arrays
    from mobile_client.manifest import load_manifest

    x, train, test = _own_clients()
    fed = federation_from_tensors(train, test, widths=[1.0, 1.0, 0.5], normalisation=(0.0, 1.0))
    assert [c.tasks for c in fed.clients] == [
        ("digits/digit",),
        ("digits/parity",),
        ("digits/digit",),
    ]
    assert fed.clients[0].label_masks["digits/digit"].all()  # 90 samples hold every digit
    cfg = parse_config({"name": "own", "algorithm": {"name": "fedper"}, "federation": {"rounds": 2},
                        "clients": [{"count": 1, "tasks": ["digits/digit"], "width": 1.0},
                                    {"count": 1, "tasks": ["digits/parity"], "width": 1.0},
                                    {"count": 1, "tasks": ["digits/digit"], "width": 0.5}]})  # fmt: skip
    fm = FederatedModel.from_model(LeNet(), head="fc3", example_input=F.interpolate(x[:2], size=28))
    fed = dataclasses.replace(fed, clients=[
        dataclasses.replace(c, x_train=F.interpolate(c.x_train, size=28),
                            x_test=F.interpolate(c.x_test, size=28)) for c in fed.clients])  # fmt: skip
    sim = Simulation(cfg, tmp_path / "run", progress=False, model=fm, federation=fed)
    assert sim.run()["rounds"] == 2
    out = sim.export_client("c02", tmp_path / "bundle")
    m = load_manifest(out)
    assert [c.client for c in m.clients] == ["c02"] and m.width_values() == [0.5]
    c = sim.fed.clients[2]
    model = sim.pool.module_for(c, 0.5).model
    load_arrays(model, sim.client_state(c, sim.engine.eval_width(2, 2)))
    model.eval()
    with torch.no_grad():
        want = model(c.x_test[:4])["digits/digit"].numpy()
    w = m.widths[0]
    feats = session(out / w.backbone.path).run(
        None, {"x": c.x_test[:4].numpy(), **_weights(out, m, w.backbone)}
    )[0]
    head = next(h for h in m.heads if h.client == "c02")
    got = session(out / head.file.path).run(
        None, {"features": feats, **_weights(out, m, head.file)}
    )[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert head_name("digits/digit") in model.heads


def _weights(bundle, m, entry):
    arrays = dict(np.load(bundle / m.clients[0].weights.path, allow_pickle=False))
    return {n: arrays[k] for n, k in entry.weights.items()}


def test_own_tensors_that_do_not_fit_are_refused_naming_the_client():
    from fmtl_lightning.errors import FederationError
    from fmtl_lightning.fed_data import federation_from_tensors

    x, train, test = _own_clients()
    short = [(train[0][0], {"digits/digit": train[0][1]["digits/digit"][:5]})]
    with pytest.raises(
        FederationError, match="client c00: train targets of 'digits/digit' have 5 rows"
    ):
        federation_from_tensors(short, test[:1], widths=[1.0])
    with pytest.raises(FederationError, match="client c00: train tasks"):
        federation_from_tensors(train[:1], test[1:2], widths=[1.0])
    with pytest.raises(FederationError, match="client c00: test x must be float32"):
        federation_from_tensors(train[:1], [(test[0][0].double(), test[0][1])], widths=[1.0])
    with pytest.raises(FederationError, match="one width, train set and test set per client"):
        federation_from_tensors(train, test, widths=[1.0])


def test_a_config_names_its_model_and_data_factories_and_resumes_from_them(tmp_path):
    """``model.factory`` / ``data.factory``: ``run_config`` from the YAML alone, a killed
    run resumed from its run dir alone equals the straight one; ``fmtl export`` of such a
    run dir says to use Simulation.export_client; a factory that is wrong is refused."""
    from export.bundle import RunExportError
    from export.run_export import export_run
    from fmtl_lightning.config import ConfigError

    raw = {"name": "own-cfg", "algorithm": {"name": "fedper"}, "federation": {"rounds": 2},
           "model": {"factory": "tests.fmtl_lightning.own_factories:lenet"},
           "data": {"factory": "tests.fmtl_lightning.own_factories:digits28"},
           "clients": [{"count": 2, "tasks": ["digits/digit"], "width": 1.0},
                       {"count": 1, "tasks": ["digits/parity"], "width": 0.5}]}  # fmt: skip
    run_config(raw, tmp_path / "straight", progress=False)
    cfg = parse_config(raw)

    with pytest.raises(Killed):
        Simulation(cfg, tmp_path / "killed", progress=False).run(kill_after_first)
    resume_run(tmp_path / "killed", progress=False)  # the factories come from config.yaml
    (g, cl), (g2, cl2) = _states(tmp_path / "straight"), _states(tmp_path / "killed")
    assert set(g) == set(g2) and any(k.startswith("backbone.conv1") for k in g)
    for k in g:
        np.testing.assert_array_equal(g2[k], g[k], err_msg=k)
    assert set(cl) == set(cl2) == {"c00", "c01", "c02"}
    with pytest.raises(RunExportError, match="export its clients with Simulation.export_client"):
        export_run(tmp_path / "straight", tmp_path / "bundle")
    for factory, words in (("lenet", "must take the RunConfig as its one argument"),
                           ("not_a_federation", "must return a Federation, got dict")):  # fmt: skip
        bad = copy.deepcopy(raw)
        bad["data"]["factory"] = f"tests.fmtl_lightning.own_factories:{factory}"
        with pytest.raises(ConfigError, match=f"data.factory: .* {words}"):
            run_config(bad, tmp_path / "bad", progress=False)
    bad = copy.deepcopy(raw)
    bad["clients"][1]["width"] = 0.25
    bad["data"]["factory"] = "tests.fmtl_lightning.own_factories:fixed_clients"
    with pytest.raises(ConfigError, match=r"data.factory: .* gave clients \(tasks, width\)"):
        run_config(bad, tmp_path / "bad2", progress=False)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_export_client_gives_the_step_graphs_the_clients_sgd(momentum, tmp_path):
    """A client trained with SGD (with or without momentum) exports silently, and its
    step graphs take that momentum (AdamW warns: tests/fmtl_lightning/test_own_steps)."""
    import warnings

    from fmtl_lightning.export_checks import StepOptimizerWarning
    from fmtl_lightning.fed_data import federation_from_tensors

    x, train, test = _own_clients()
    fed = federation_from_tensors(train, test, widths=[1.0, 1.0, 0.5])
    cfg = parse_config({"name": "opt", "algorithm": {"name": "fedper"}, "federation": {"rounds": 1},
                        "optimizer": {"lr": 0.05, "momentum": momentum},
                        "clients": [{"count": 1, "tasks": ["digits/digit"], "width": 1.0},
                                    {"count": 1, "tasks": ["digits/parity"], "width": 1.0},
                                    {"count": 1, "tasks": ["digits/digit"], "width": 0.5}]})  # fmt: skip
    fm = FederatedModel(
        nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU()), example_input=x[:2]
    )
    sim = Simulation(cfg, tmp_path / "run", progress=False, model=fm, federation=fed)
    sim.run()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        sim.export_client("c01", tmp_path / "bundle")
    assert [w for w in seen if issubclass(w.category, StepOptimizerWarning)] == []
    from mobile_client.manifest import load_manifest

    (step,) = load_manifest(tmp_path / "bundle").widths[0].train_steps
    assert step.file.optimizer.get("momentum", 0.0) == momentum
    assert bool(step.file.momentum_inputs) == bool(momentum)
