"""Everything an edge node needs before it joins: its bundle and its data file.

``prepare_edge(cfg, "c02", out)`` exports the client's model at its width exactly as
the in-process simulator starts it (same seed, so the same heads and backbone; via
``EdgeBridge.bundle_for`` -> ``export_model``) into ``out/bundle`` and writes the
client's training shard to ``out/data.npz`` (``x`` float32 normalised ``(N, 1, H, W)``,
``y__<task>``; the file ``fmtl-edge train --data`` reads). On a real device the data
file is the device's own data; the bundle may equally come from ``fmtl export RUN``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from fmtl_lightning.config import RunConfig
from fmtl_lightning.roles import WidthSpec


def prepare_edge(cfg: RunConfig, client_id: str, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``out_dir/bundle`` and ``out_dir/data.npz`` for ``client_id``; returns both."""
    from fmtl_lightning.errors import FMTLError
    from fmtl_lightning.simulation import Simulation

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sim = Simulation(cfg, out / "prepare_run", progress=False)
    ids = [c.cid for c in sim.fed.clients]
    if client_id not in ids:
        raise FMTLError(f"client {client_id!r} is not in the config (clients: {', '.join(ids)})")
    idx = ids.index(client_id)
    c = sim.fed.clients[idx]
    ws = WidthSpec(c.width, cfg.algorithm.slicing, 0)
    exported = sim.edge.bundle_for(sim, idx, ws)
    bundle = out / "bundle"
    if bundle.exists():
        shutil.rmtree(bundle)
    shutil.move(str(exported), bundle)
    data = out / "data.npz"
    ys = {"y__" + t.replace("/", "__"): v.numpy() for t, v in c.y_train.items()}
    arrays: dict[str, Any] = {"x": c.x_train.numpy(), **ys}
    np.savez(data, **arrays)
    shutil.rmtree(out / "prepare_run", ignore_errors=True)
    return bundle, data
