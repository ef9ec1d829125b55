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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fmtl_lightning.algorithms import ClientResult
from fmtl_lightning.engine.seeds import phase_seed
from fmtl_lightning.local_fit import FitPlan
from fmtl_lightning.models import load_arrays
from fmtl_lightning.roles import ModelSpec, WidthSpec
from fmtl_lightning.tasks import get_task
from fmtl_lightning.validation import validate_state

if TYPE_CHECKING:
    from mobile_client.update import UpdateMeta


@dataclass
class EdgeJob:
    """What the bridge needs of the federation for one edge client at one width (passed in
    by the round loop: the bridge reads no simulation internals)."""

    client: Any  # fmtl_lightning.fed_data.ClientData
    idx: int
    ws: WidthSpec
    round_idx: int
    module: Any  # the client's MultiTaskModule at ws.width
    deployed: Callable[[], dict[str, np.ndarray]]  # the client's deployable state at ws
    normalisation: tuple[float, float]  # (mean, std) of its domain
    spec: ModelSpec  # the run's roles: the manifest's shared keys, the update's validation
    seed: int
    plan: FitPlan
    lr: float
    # the torch optimiser its Lightning peers fit with (momentum, decay); built only when
    # the bundle is first exported, not every round
    optimizer: Callable[[], Any] | None = None


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

    def bundle_for(self, job: EdgeJob) -> Path:
        """The client's bundle at ``job.ws.width``, exported on first use."""
        from export.run_export import export_model
        from mobile_client.manifest import Normalisation

        c, ws = job.client, job.ws
        key = (c.cid, ws.width)
        if key not in self._bundles:
            load_arrays(job.module.model, job.deployed())
            mean, std = job.normalisation
            shape = tuple(job.module.model.input_shape)  # the model's input, any shape
            norm = Normalisation(mean, std, shape, 1.0 / 255.0, c.spec.domain)
            out = self.root / "bundles" / f"{c.cid}_w{ws.width:g}"
            export_model(
                job.module.model,
                {t: get_task(t) for t in c.tasks},
                out,
                normalisation=norm,
                client=c.cid,
                policy=job.spec.policy,  # the manifest's shared_keys are the spec's
                overwrite=True,
                optimizer=None if job.optimizer is None else job.optimizer(),  # its momentum
            )
            self._bundles[key] = out
        return self._bundles[key]

    def train(
        self,
        job: EdgeJob,
        received: Mapping[str, np.ndarray],
        local: Mapping[str, np.ndarray],
    ) -> ClientResult:
        """One round on the device: ``received`` (the global shared arrays at the client's
        width) goes down as a file, ``local`` (its own arrays at that width) stays on it."""
        from mobile_client.runtime import EdgeClient
        from mobile_client.safetensors_np import load_file, save_file
        from mobile_client.update import UpdateMeta, read_update, state_hash, write_update

        c, ws, round_idx = job.client, job.ws, job.round_idx
        bundle = self.bundle_for(job)
        box = self.root / "exchange" / c.cid / f"round_{round_idx + 1:04d}"
        box.mkdir(parents=True, exist_ok=True)
        # server -> device: the shared arrays at the client's width, with their hash
        sent = dict(received)
        base = state_hash(sent)
        down = box / "global.safetensors"
        meta = UpdateMeta("server", round_idx + 1, ws.width, 1, base, {})  # count unused
        write_update(down, sent, meta)

        # on the device: numpy + onnxruntime only
        got, _ = read_update(down, expected_base_hash=base)
        client = EdgeClient(bundle, c.cid)
        res = client.train(
            c.x_train.numpy(),
            {t: v.numpy() for t, v in c.y_train.items()},
            width=ws.width,
            epochs=job.plan.epochs,
            batch_size=job.plan.batch_size,
            lr=job.lr,
            steps=job.plan.steps,
            seed=phase_seed(job.seed, round_idx, job.idx, "global"),
            start_from={**local, **got},
        )
        up = box / "update.safetensors"
        write_update(
            up,
            res.shared,
            UpdateMeta(c.cid, round_idx + 1, ws.width, res.num_examples, base, res.metrics),
        )
        heads = {k: v for k, v in res.state.items() if k not in res.shared}
        local_file = box / "local.safetensors"
        save_file(heads, local_file, {"client": c.cid})

        # server: read the update file, check it answers what was sent, validate it
        keys = job.spec.shared_keys()
        shared, umeta = receive_update(up, job.spec, ws, keys, base, c.cid)
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
