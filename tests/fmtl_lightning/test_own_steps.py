"""A user's LightningModule federated with its own training_step, configure_optimizers
and Callbacks (:mod:`fmtl_lightning.own_steps`).

A client's local fit must equal a hand-run torch loop of the same module with the
same optimiser (AdamW; SGD with Nesterov momentum) over the same batches
(:func:`fmtl_lightning.local_fit.batch_indices` seeded by the phase seed), at width 1
and at width 1/2 (so ``self.parameters()`` inside the user's ``configure_optimizers``
are the sliced copy's); a user's Callback sees exactly the planned epochs and batches of
every fit; a run killed after round 1 and resumed is bit-identical.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from fmtl_lightning.checkpoint import completed_rounds, read_round
from fmtl_lightning.config import parse_config
from fmtl_lightning.engine.seeds import phase_seed
from fmtl_lightning.errors import OwnStepsError
from fmtl_lightning.export_checks import StepOptimizerWarning
from fmtl_lightning.local_fit import FitPlan, batch_indices
from fmtl_lightning.model_source import FederatedModel
from fmtl_lightning.models import head_name, load_arrays
from fmtl_lightning.roles import WidthSpec
from fmtl_lightning.simulation import Simulation, resume_run, run_config
from fmtl_lightning.slicing import slice_state
from tests.fmtl_lightning.conftest import BASE
from tests.matrix.runner import Killed, kill_after_first

TASK = "digits/digit"


class DigitMLP(L.LightningModule):
    """What a Lightning user writes: their layers, their loss, their optimiser."""

    def __init__(self, optim: str = "adamw") -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(),
                                  nn.Linear(32, 16), nn.ReLU())  # fmt: skip
        self.head = nn.Linear(16, 10)
        self.optim = optim
        self.epoch_ends = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        x, y = batch
        return F.cross_entropy(self(x), y, label_smoothing=0.1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.optim, self.parameters())

    def on_train_epoch_end(self) -> None:
        self.epoch_ends += 1


def make_optimizer(optim: str, params) -> torch.optim.Optimizer:  # noqa: ANN001
    if optim == "adamw":
        return torch.optim.AdamW(params, lr=0.01, weight_decay=0.05)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)


def _cfg(rounds: int = 1, epochs: int = 1, **alg):
    raw = copy.deepcopy(BASE)
    raw["clients"] = [{"count": 2, "tasks": [TASK], "width": 1.0},
                      {"count": 1, "tasks": [TASK], "width": 0.5}]  # fmt: skip
    raw["federation"].update(rounds=rounds, local_epochs=epochs)
    raw["algorithm"].update(alg)
    return parse_config(raw)


def _model(optim: str = "adamw", **kw) -> FederatedModel:
    torch.manual_seed(0)
    return FederatedModel.from_model(DigitMLP(optim), head="head",
                                     example_input=torch.zeros(2, 1, 8, 8), **kw)  # fmt: skip


def _hand_loop(net: nn.Module, optim: str, x, y, plan: FitPlan, seed: int) -> None:
    opt = make_optimizer(optim, net.parameters())
    for idx in batch_indices(x.shape[0], plan, seed):
        opt.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx], label_smoothing=0.1).backward()
        opt.step()


@pytest.mark.parametrize("optim", ["adamw", "sgd_momentum"])
@pytest.mark.parametrize("idx", [0, 2])  # widths 1 and 1/2
def test_a_local_fit_is_the_users_own_loop(optim, idx, tmp_path):
    cfg = _cfg(epochs=2)
    sim = Simulation(cfg, tmp_path / "run", progress=False, model=_model(optim))
    c = sim.fed.clients[idx]
    ws = WidthSpec(c.width)
    received = slice_state(sim.engine.global_state, sim.spec, ws)
    local = slice_state(sim.pool.stores[c.cid].local, sim.spec, ws)

    # the independent computation: the user's class at the client's width, by hand
    built = sim.engine.plan.model.build({TASK: 10}, c.width)
    load_arrays(built, {**received, **local})
    net = built.backbone
    net.head = built.heads[head_name(TASK)]
    assert isinstance(net, DigitMLP) and net.body[1].out_features == int(32 * c.width)
    seed = phase_seed(cfg.seed, 0, idx, "global")
    plan = FitPlan(cfg.federation.batch_size, cfg.federation.local_epochs)
    _hand_loop(net, optim, c.x_train, c.y_train[TASK], plan, seed)
    want = {f"backbone.{k}": v for k, v in net.state_dict().items() if not k.startswith("head.")}
    want.update({f"heads.{head_name(TASK)}.{k}": v for k, v in net.head.state_dict().items()})

    res = sim.pool.train(idx, ws, 0, received)
    got = {**res.shared, **res.local}
    assert set(got) == set(want)
    moved = 0
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v.numpy(), atol=1e-6, rtol=0, err_msg=k)
        moved += not np.allclose(got[k], {**received, **local}[k])
    assert moved == len(want)  # every parameter stepped
    module = sim.pool.module_for(c, c.width)
    assert isinstance(module.model.backbone.head, nn.Identity)  # the slot is emptied again
    assert module.model.backbone.epoch_ends == 2  # the module's own hook, per epoch


class Counter(Callback):
    def __init__(self) -> None:
        self.fits: dict[tuple, dict] = {}

    def _fit(self, trainer) -> dict:  # noqa: ANN001
        return self.fits.setdefault((trainer.client, trainer.round, trainer.phase), {
            "epochs": [], "ends": 0, "batches": [], "starts": 0, "width": None})  # fmt: skip

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._fit(trainer)["starts"] += 1
        self._fit(trainer)["width"] = pl_module.body[1].out_features

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._fit(trainer)["epochs"].append(trainer.current_epoch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._fit(trainer)["ends"] += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        assert outputs.ndim == 0 and batch[0].shape[1:] == (1, 8, 8)
        self._fit(trainer)["batches"].append((batch_idx, batch[0].shape[0]))


def test_callbacks_see_every_planned_epoch_and_batch(tmp_path):
    cfg = _cfg(rounds=2, epochs=2)
    counter = Counter()
    fm = _model("sgd", callbacks=[counter])
    sim = Simulation(cfg, tmp_path / "run", progress=False, model=fm)
    sim.run()
    want = {}
    for c in sim.fed.clients:
        n, bs = c.x_train.shape[0], cfg.federation.batch_size
        sizes = [min(bs, n - s) for s in range(0, n, bs)]
        batches = [(b, size) for b, size in enumerate(sizes)] * 2
        for r in range(2):
            want[(c.cid, r, "global")] = {"epochs": [0, 1], "ends": 2, "batches": batches,
                                          "starts": 1, "width": int(32 * c.width)}  # fmt: skip
    assert counter.fits == want
    assert len(want) == 6 and sum(len(f["batches"]) for f in want.values()) == 36


def test_fedper_with_own_steps_resumes_bit_identically(tmp_path):
    cfg = _cfg(rounds=2)
    run_config(cfg, tmp_path / "straight", progress=False, model=_model())

    with pytest.raises(Killed):
        Simulation(cfg, tmp_path / "killed", progress=False, model=_model()).run(kill_after_first)
    resume_run(tmp_path / "killed", progress=False, model=_model())
    a = read_round(tmp_path / "straight", completed_rounds(tmp_path / "straight")[-1])
    b = read_round(tmp_path / "killed", completed_rounds(tmp_path / "killed")[-1])
    assert completed_rounds(tmp_path / "killed") == completed_rounds(tmp_path / "straight")
    for k in a[0]:
        np.testing.assert_array_equal(b[0][k], a[0][k], err_msg=k)
    assert a[1].keys() == b[1].keys()
    for cid in a[1]:
        for k in a[1][cid]:
            np.testing.assert_array_equal(b[1][cid][k], a[1][cid][k], err_msg=f"{cid} {k}")


class TwoOptims(DigitMLP):
    def configure_optimizers(self):  # noqa: ANN201
        return [torch.optim.SGD(self.body.parameters(), lr=0.1),
                torch.optim.SGD(self.head.parameters(), lr=0.1)]  # fmt: skip


class Manual(DigitMLP):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


def test_steps_that_cannot_drive_a_fit_are_refused_naming_why(tmp_path):
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(OwnStepsError, match="Manual.automatic_optimization is False"):
        FederatedModel.from_model(Manual(), head="head", example_input=x)
    with pytest.raises(OwnStepsError, match="defines no training_step"):
        FederatedModel.from_model(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), head="1",
                                  example_input=x, own_steps=True)  # fmt: skip
    fm = FederatedModel.from_model(TwoOptims(), head="head", example_input=x)
    with pytest.raises(OwnStepsError, match=r"TwoOptims.configure_optimizers\(\): must give one"):
        run_config(_cfg(), tmp_path / "two", progress=False, model=fm)


def test_dittos_prox_pull_is_added_to_the_users_loss(tmp_path):
    """Ditto's personal phase: the user's loss + lam/2 ||v - w_t||^2 over the shared
    parameters (anchored at the received ones), stepped by the user's AdamW."""
    lam = 0.5
    cfg = _cfg(name="ditto", lam=lam)
    sim = Simulation(cfg, tmp_path / "run", progress=False, model=_model("adamw"))
    idx, c = 2, sim.fed.clients[2]
    ws = WidthSpec(c.width)
    received = slice_state(sim.engine.global_state, sim.spec, ws)
    personal = slice_state(sim.pool.stores[c.cid].personal, sim.spec, ws)

    built = sim.engine.plan.model.build({TASK: 10}, c.width)
    load_arrays(built, personal)
    named = dict(built.named_parameters())
    anchor = {named[k]: torch.from_numpy(np.array(v)) for k, v in received.items() if k in named}
    assert anchor and all(not k.startswith("heads.") for k in received)
    net = built.backbone
    net.head = built.heads[head_name(TASK)]
    opt = make_optimizer("adamw", net.parameters())
    plan = FitPlan(cfg.federation.batch_size, cfg.federation.local_epochs)
    x, y = c.x_train, c.y_train[TASK]
    for i in batch_indices(x.shape[0], plan, phase_seed(cfg.seed, 0, idx, "personal")):
        opt.zero_grad()
        loss = F.cross_entropy(net(x[i]), y[i], label_smoothing=0.1)
        loss = loss + 0.5 * lam * sum((p - a).pow(2).sum() for p, a in anchor.items())
        loss.backward()
        opt.step()
    net.head = nn.Identity()  # the model's own keys again (backbone.*, heads.*)
    want = {k: v.detach().numpy() for k, v in built.state_dict().items()}

    res = sim.pool.train(idx, ws, 0, received)
    assert res.personal is not None and set(res.personal) == set(personal)
    assert set(want) == set(res.personal)
    for k, v in want.items():
        np.testing.assert_allclose(res.personal[k], v, atol=1e-6, rtol=0, err_msg=k)


def test_a_multi_task_client_steps_on_the_sum_of_its_tasks_own_losses(tmp_path):
    """Two tasks: the user's training_step runs once per task with that task's head in
    the slot, on (x, y_task); one AdamW step on the sum (equals the hand loop)."""
    raw_tasks = ["digits/digit", "digits/parity"]
    cfg = _cfg()
    cfg = cfg.replace(
        clients=[dataclasses.replace(cfg.clients[0], count=1, tasks=tuple(raw_tasks))]
    )
    sim = Simulation(cfg, tmp_path / "run", progress=False, model=_model("adamw"))
    c = sim.fed.clients[0]
    ws = WidthSpec(1.0)
    received = slice_state(sim.engine.global_state, sim.spec, ws)
    local = slice_state(sim.pool.stores[c.cid].local, sim.spec, ws)
    built = sim.engine.plan.model.build(dict(zip(raw_tasks, (10, 2), strict=True)), 1.0)
    load_arrays(built, {**received, **local})
    opt = make_optimizer("adamw", built.parameters())
    plan = FitPlan(cfg.federation.batch_size, cfg.federation.local_epochs)
    x = c.x_train
    for i in batch_indices(x.shape[0], plan, phase_seed(cfg.seed, 0, 0, "global")):
        opt.zero_grad()
        feats = built.backbone(x[i])
        sum(F.cross_entropy(built.heads[head_name(t)](feats), c.y_train[t][i], label_smoothing=0.1)
            for t in raw_tasks).backward()  # fmt: skip
        opt.step()
    res = sim.pool.train(0, ws, 0, received)
    got = {**res.shared, **res.local}
    assert set(got) == set(built.state_dict())
    for k, v in built.state_dict().items():
        np.testing.assert_allclose(got[k], v.numpy(), atol=1e-6, rtol=0, err_msg=k)


class Recorder(Callback):
    """Records (client, round, phase, width, batch sizes) of every local fit it sees."""

    def __init__(self) -> None:
        self.fits: list[tuple] = []

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        feats = pl_module.model.feature_dim
        self.fits.append((trainer.client, trainer.round, trainer.phase, feats, []))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        assert torch.isfinite(outputs).item() and outputs.ndim == 0
        self.fits[-1][-1].append(batch[0].shape[0])


def test_callbacks_reach_every_local_fit_of_a_builtin_model_and_its_baseline(tmp_path):
    """run_config(callbacks=) with the configured built-in family: every client, round and
    FedRep phase (head, then body) of the run and of its local-only baseline."""
    raw = copy.deepcopy(BASE)
    raw["algorithm"] = {"name": "fedrep", "rep_head_epochs": 1}
    raw["compare_local"] = True
    cfg = parse_config(raw)
    rec = Recorder()
    run_config(cfg, tmp_path / "run", progress=False, callbacks=[rec])
    fed = Simulation(cfg, tmp_path / "probe", progress=False).fed
    hidden = raw["model"]["hidden"][-1]
    want = []
    for algo_phases in (("head", "body"), ("personal",)):  # the run, then its baseline
        for r in range(cfg.federation.rounds):
            for c in fed.clients:
                n, bs = c.x_train.shape[0], cfg.federation.batch_size
                sizes = [min(bs, n - s) for s in range(0, n, bs)]
                for phase in algo_phases:
                    want.append((c.cid, r, phase, int(hidden * c.width), sizes))
    assert rec.fits == want
    assert len(rec.fits) == 3 * 2 * 2 + 3 * 2


def test_exporting_a_client_with_its_own_adamw_names_the_optimiser(tmp_path):
    """The optimiser export checks is the user's own configure_optimizers() one."""
    sim = Simulation(_cfg(rounds=1), tmp_path / "run", progress=False, model=_model("adamw"))
    sim.run()
    with pytest.warns(StepOptimizerWarning, match=r"client c00 trained with AdamW\(lr=0.01"):
        out = sim.export_client("c00", tmp_path / "exp")
    assert (Path(out) / "manifest.json").is_file()
