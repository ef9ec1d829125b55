"""Run one combination end to end and check what must hold for every accepted config.

Steps: a straight run (with its local-only baseline when ``compare_local``), a run killed
after round 1 and resumed, export of the smallest width, edge predict and one edge
train step. Checks: finite states of the declared shapes, resumed == straight, ONNX
Runtime == torch for every exported head, and the exported SGD step == torch's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmtl_lightning.checkpoint import completed_rounds, read_round
from fmtl_lightning.config import RunConfig
from fmtl_lightning.roles import ModelSpec, WidthSpec
from fmtl_lightning.simulation import Simulation, resume_run, run_config


class Killed(Exception):
    """Raised from the round callback: the process "dies" after a checkpoint."""


def kill_after_first(round_no: int) -> None:
    if round_no == 1:
        raise Killed


def final_states(run_dir: Path) -> tuple[dict, dict]:
    last = completed_rounds(run_dir)[-1]
    g, clients, _, _ = read_round(run_dir, last)
    return g, clients


def check_states(run_dir: Path, spec: ModelSpec) -> None:
    """Every array of the last checkpoint is finite, of its declared full-width shape."""
    g, clients = final_states(run_dir)
    for k, v in g.items():
        p = spec[k]
        assert v.shape == tuple(p.shape), (k, v.shape, p.shape)
        assert np.dtype(v.dtype) == np.dtype(p.dtype), (k, v.dtype, p.dtype)
        assert v.dtype.kind != "f" or np.isfinite(v).all(), k
    for cid, st in clients.items():
        for name, v in st.items():
            k = name.split("/", 1)[1]
            p = spec[k]
            assert v.shape == tuple(p.shape), (cid, name, v.shape, p.shape)
            assert v.dtype.kind != "f" or np.isfinite(v).all(), (cid, name)


def assert_same_run(a: Path, b: Path) -> None:
    ga, ca = final_states(a)
    gb, cb = final_states(b)
    assert completed_rounds(a)[-1] == completed_rounds(b)[-1]
    assert set(ga) == set(gb) and set(ca) == set(cb)
    for k in ga:
        np.testing.assert_array_equal(ga[k], gb[k], err_msg=f"{a.name} global {k}")
    for cid in ca:
        assert set(ca[cid]) == set(cb[cid]), cid
        for k in ca[cid]:
            np.testing.assert_array_equal(ca[cid][k], cb[cid][k], err_msg=f"{cid} {k}")


def run_combination(cfg: RunConfig, tmp: Path) -> dict[str, Any]:
    """The whole check for one config; returns what was checked (for the report)."""
    done: dict[str, Any] = {}
    straight, killed = tmp / "straight", tmp / "killed"
    run_config(cfg, straight, progress=False)
    spec = ModelSpec.from_json((straight / "spec.json").read_text())
    check_states(straight, spec)
    try:
        Simulation(cfg, killed, progress=False).run(on_round=kill_after_first)
    except Killed:
        pass
    assert completed_rounds(killed) == [1]
    resume_run(killed, progress=False)
    assert_same_run(straight, killed)
    if cfg.compare_local and cfg.algorithm.name != "local":
        base = straight / "local_baseline"
        check_states(base, ModelSpec.from_json((base / "spec.json").read_text()))
        assert_same_run(base, killed / "local_baseline")
        done["baseline"] = True
    done.update(export_and_edge(cfg, straight, tmp / "bundle"))
    return done


def export_and_edge(cfg: RunConfig, run_dir: Path, out: Path) -> dict[str, Any]:
    """Export the smallest width; ORT predictions == torch; one exported step == torch SGD."""
    from export.run_export import export_run
    from mobile_client.runtime import EdgeClient

    sim = Simulation.resume(run_dir, progress=False)
    c = min(sim.fed.clients, key=lambda c: c.width)
    export_run(run_dir, out, widths=[c.width], clients=[c.cid])
    edge = EdgeClient(out, c.cid)
    last = completed_rounds(run_dir)[-1]
    ws = WidthSpec(c.width, cfg.algorithm.slicing, max(last - 1, 0))
    module = sim.pool.module_for(c, c.width)
    from fmtl_lightning.models import load_arrays

    load_arrays(module.model, sim.client_state(c, ws))
    module.eval()
    x = c.x_test
    with torch.no_grad():
        want = module(x)
    for t in c.tasks:
        got = edge.predict(t, x.numpy(), c.width)
        np.testing.assert_allclose(got, want[t].numpy(), rtol=1e-4, atol=1e-4, err_msg=t)
    checked: dict[str, Any] = {"predict": list(c.tasks)}
    if not edge.manifest.width(c.width).train_steps:
        return checked
    # one exported SGD step over the whole train split vs torch.optim.SGD on the module
    n = c.x_train.shape[0]
    res = edge.train(c.x_train.numpy(), {t: y.numpy() for t, y in c.y_train.items()},
                     width=c.width, batch_size=n, steps=1, lr=0.05)  # fmt: skip
    for k, v in res.state.items():
        assert v.dtype.kind != "f" or np.isfinite(v).all(), k
    if cfg.algorithm.masked_ce or cfg.model.scaler:
        return {**checked, "step": "finite"}  # the exported step is plain CE, unscaled
    load_arrays(module.model, sim.client_state(c, ws))
    module.train()
    opt = torch.optim.SGD(module.model.parameters(), lr=0.05)
    opt.zero_grad()
    module.training_step((c.x_train, dict(c.y_train))).backward()
    opt.step()
    ref = {k: v.detach().numpy() for k, v in module.model.state_dict().items()}
    for k, v in res.state.items():
        np.testing.assert_allclose(v, ref[k], rtol=1e-4, atol=1e-5, err_msg=k)
    return {**checked, "step": "parity"}
