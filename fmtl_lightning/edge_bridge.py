"""Run a simulated client through the real edge data path (ONNX Runtime, files on disk).

For an edge client, one round is exactly what a device does:

1. the server exports the client's model structure once (``export_model``: backbone
   + heads + training-step graphs, weights as graph inputs) and, every round, writes
   the global shared arrays at the client's width to a safetensors file whose
   metadata carries the hash of those arrays;
2. the client (``mobile_client.EdgeClient``: numpy + onnxruntime only) reads that
   file, overlays its own heads, runs the exported SGD step graphs over the same
   batches a Lightning client would see, and writes an update file (shared arrays
   only) plus its heads to a local file;
3. the server reads the update file, checking it against the hash it sent, validates
   it (:func:`~fmtl_lightning.validation.validate_state`: an update file is input from
   outside) and aggregates it like any other client's update.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fmtl_lightning.algorithms import ClientResult
from fmtl_lightning.local_fit import phase_seed
from fmtl_lightning.models import load_arrays
from fmtl_lightning.roles import ModelSpec, WidthSpec
from fmtl_lightning.tasks import get_task
from fmtl_lightning.validation import validate_state

if TYPE_CHECKING:
    from fmtl_lightning.simulation import Simulation
    from mobile_client.update import UpdateMeta


class EdgeBridge:
    """Per-run cache of exported bundles and the per-round file exchange."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._bundles: dict[tuple[str, float], Path] = {}

    def prune(self, keep: set[int]) -> None:
        """Drop the exchange boxes of the rounds the checkpoint retention does not keep."""
        from fmtl_lightning.checkpoint import prune_rounds

        exchange = self.root / "exchange"
        if exchange.is_dir():
            for box in exchange.iterdir():
                prune_rounds(box, keep)

    def bundle_for(self, sim: Simulation, idx: int, ws: WidthSpec) -> Path:
        from export.run_export import export_model
        from mobile_client.manifest import Normalisation

        c = sim.fed.clients[idx]
        key = (c.cid, ws.width)
        if key not in self._bundles:
            module = sim.module_for(c, ws.width)
            load_arrays(module.model, sim.client_state(c, ws))
            ds_norm = sim.fed.normalisation[c.spec.domain]
            shape = (1, sim.fed.image_size, sim.fed.image_size)
            norm = Normalisation(ds_norm[0], ds_norm[1], shape, 1.0 / 255.0, c.spec.domain)
            out = self.root / "bundles" / f"{c.cid}_w{ws.width:g}"
            export_model(
                module.model,
                {t: get_task(t).kind for t in c.tasks},
                out,
                normalisation=norm,
                client=c.cid,
                policy=sim.spec.policy,  # the manifest's shared_keys are the spec's
                overwrite=True,
            )
            self._bundles[key] = out
        return self._bundles[key]

    def train(self, sim: Simulation, idx: int, ws: WidthSpec, round_idx: int) -> ClientResult:
        from mobile_client.runtime import EdgeClient
        from mobile_client.safetensors_np import load_file
        from mobile_client.update import UpdateMeta, read_update, state_hash, write_update

        c = sim.fed.clients[idx]
        bundle = self.bundle_for(sim, idx, ws)
        box = self.root / "exchange" / c.cid / f"round_{round_idx + 1:04d}"
        box.mkdir(parents=True, exist_ok=True)
        # server -> device: the shared arrays at the client's width, with their hash
        sent = {k: v for k, v in sim._sub(sim.global_state, ws).items()}
        base = state_hash(sent)
        down = box / "global.safetensors"
        meta = UpdateMeta("server", round_idx + 1, ws.width, 1, base, {})  # count unused
        write_update(down, sent, meta)

        # on the device: numpy + onnxruntime only
        received, _ = read_update(down, expected_base_hash=base)
        local = sim._sub(sim.stores[c.cid].local, ws)
        f = sim.cfg.federation
        client = EdgeClient(bundle, c.cid)
        res = client.train(
            c.x_train.numpy(),
            {t: v.numpy() for t, v in c.y_train.items()},
            width=ws.width,
            epochs=f.local_epochs,
            batch_size=f.batch_size,
            lr=sim.cfg.optimizer.lr,
            steps=f.local_steps,
            seed=phase_seed(sim.cfg.seed, round_idx, idx, "global"),
            start_from={**local, **received},
        )
        up = box / "update.safetensors"
        write_update(
            up,
            res.shared,
            UpdateMeta(c.cid, round_idx + 1, ws.width, res.num_examples, base, res.metrics),
        )
        heads = {k: v for k, v in res.state.items() if k not in res.shared}
        local_file = box / "local.safetensors"
        from mobile_client.safetensors_np import save_file

        save_file(heads, local_file, {"client": c.cid})

        # server: read the update file, check it answers what was sent, validate it
        shared, umeta = receive_update(up, sim.spec, ws, sim.shared_keys, base, c.cid)
        kept, _ = load_file(local_file)
        return ClientResult(shared, kept, None, int(umeta.num_examples))


def receive_update(
    path: Path, spec: ModelSpec, ws: WidthSpec, keys: Sequence[str], base_hash: str, client: str
) -> tuple[dict[str, np.ndarray], UpdateMeta]:
    """The server's side of an update file: read it (``read_update``: format, metadata,
    the base hash that was sent) and validate its arrays like any input from outside
    (key set, shapes at ``ws``, dtypes, finite values within the magnitude bound)."""
    from mobile_client.update import read_update

    shared, meta = read_update(path, expected_base_hash=base_hash)
    validate_state(shared, spec, ws, keys, client=client)
    return shared, meta
