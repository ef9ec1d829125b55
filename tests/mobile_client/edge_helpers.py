"""Shared helpers of the edge-runtime tests: a tiny real run + export, the torch reference
models, real digits inputs/targets, and a torch-SGD replay over ``batch_order`` batches."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

MLP_CFG = {
    "name": "tiny-edge",
    "seed": 0,
    "data": {"samples_per_client": 40},
    "model": {"family": "mlp", "hidden": [16, 8], "norm": "none"},
    "clients": [
        {"count": 1, "tasks": ["digits/digit"], "width": 1.0},
        {"count": 1, "tasks": ["digits/parity", "digits/attrs"], "width": 0.5},
    ],
    "algorithm": {"name": "fedper"},
    "federation": {"rounds": 1},
    "compare_local": False,
}
CNN_CFG = {
    **MLP_CFG,
    "name": "tiny-edge-cnn",
    "model": {"family": "cnn", "hidden": [4, 8], "norm": "batch"},
}


def run_and_export(cfg: dict, root: Path) -> tuple[Path, Path]:
    """``fmtl simulate`` a tiny run into ``root/run`` and export it to ``root/bundle``."""
    from export.run_export import export_run
    from fmtl_lightning.simulation import run_config

    run_dir = root / "run"
    run_config(cfg, run_dir, progress=False)
    return run_dir, export_run(run_dir, root / "bundle")


def client_model(run_dir: Path, cid: str):
    """The torch model of client ``cid`` with the state the bundle exported for it."""
    from fmtl_lightning.checkpoint import completed_rounds
    from fmtl_lightning.config import load_config
    from fmtl_lightning.models import load_arrays
    from fmtl_lightning.roles import WidthSpec
    from fmtl_lightning.simulation import Simulation

    sim = Simulation(load_config(run_dir / "config.yaml"), run_dir, progress=False)
    last = completed_rounds(run_dir)[-1]
    sim.pool.restore(sim.engine.restore())
    c = next(c for c in sim.fed.clients if c.cid == cid)
    model = sim.pool.module_for(c, c.width).model
    load_arrays(model, sim.client_state(c, WidthSpec(c.width, sim.cfg.algorithm.slicing, last - 1)))
    return model.eval()


def digits(n: int, tasks: tuple[str, ...], split: str = "test"):
    """Real digits: uint8 pixels (n, 8, 8), normalised float32 (n, 1, 8, 8), targets."""
    from fmtl_lightning.data import load_dataset
    from fmtl_lightning.tasks import get_task

    ds = load_dataset("digits", split)
    px = np.asarray(ds.images[:n], dtype=np.uint8)
    x = ((px.astype(np.float32) / 255.0 - ds.mean) / ds.std).astype(np.float32)[:, None]
    labels = np.asarray(ds.labels[:n])
    ys = {t: get_task(t).target(labels) for t in tasks}
    return px, x, ys


def torch_sgd(
    model,
    x: np.ndarray,
    ys: Mapping[str, np.ndarray],
    kinds: Mapping[str, str],
    batches: list[np.ndarray],
    lr: float,
    head_only: bool = False,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> dict[str, np.ndarray]:
    """Replay ``batches`` with ``torch.optim.SGD``; returns the final state dict as numpy."""
    import torch

    from export.trainstep import task_loss

    xt = torch.from_numpy(x)
    if head_only:
        with torch.no_grad():
            feats = model.eval().backbone(xt)
        params = [p for n, p in model.named_parameters() if n.startswith("heads.")]
    else:
        model.train()
        params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    for idx in batches:
        i = torch.from_numpy(idx)
        opt.zero_grad()
        if head_only:
            f = feats[i]
            outs = {t: model.heads[t.replace("/", "__")](f) for t in ys}
        else:
            outs = model(xt[i])
        loss = sum(task_loss(kinds[t], outs[t], torch.from_numpy(y)[i]) for t, y in ys.items())
        loss.backward()
        opt.step()
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
