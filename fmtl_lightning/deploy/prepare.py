"""Everything an edge node needs before it joins: its bundle and its data file.

``prepare_edge(cfg, "c02", out)`` exports the client's model at its width exactly as
the in-process simulator starts it (same seed, so the same heads and backbone; via
``Simulation.edge_bundle`` -> ``export_model``) into ``out/bundle`` and writes the
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
from mobile_client.batching import label_key


def write_client_data(c: Any, path: str | Path) -> Path:
    """A client's train and test split as the ``.npz`` nodes read (``x``, ``y__<task>``,
    ``x_test``, ``y_test__<task>``; ``x`` float32 normalised ``(N, 1, H, W)``)."""
    arrays: dict[str, Any] = {"x": c.x_train.numpy(), "x_test": c.x_test.numpy()}
    for t in c.tasks:
        arrays[label_key(t)] = c.y_train[t].numpy()
        arrays[label_key(t, test=True)] = c.y_test[t].numpy()
    np.savez(path, **arrays)
    return Path(path)


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
    exported = sim.edge_bundle(idx, ws)
    bundle = out / "bundle"
    if bundle.exists():
        shutil.rmtree(bundle)
    shutil.move(str(exported), bundle)
    data = out / "data.npz"
    write_client_data(c, data)
    shutil.rmtree(out / "prepare_run", ignore_errors=True)
    return bundle, data
