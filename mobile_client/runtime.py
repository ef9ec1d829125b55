"""The edge client: inference and local training on an exported bundle (numpy + onnxruntime).

:class:`EdgeClient` reads only ``manifest.json`` and the files it names. Inference runs
the backbone graph then the task's head graph. Training runs the exported SGD step
graphs over the batches of :func:`mobile_client.batching.batch_order`, starting from
the client's weights (``weights_{cid}.npz``) overlaid with the server's shared arrays,
carrying the SGD momentum buffers of graphs exported with momentum from step to step;
it returns the new state and its shared subset (what goes into the update). The
heads stay on the device (:meth:`EdgeClient.save_local`). The checks on arrays entering
the client live in :mod:`mobile_client.edge_arrays`, the onnxruntime sessions in
:mod:`mobile_client.sessions`.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mobile_client.batching import batch_order, num_batches
from mobile_client.edge_arrays import (
    check_finite,
    overlay,
    prepare_targets,
    prepare_x,
    read_weights,
    store_outputs,
)
from mobile_client.errors import InputError, ManifestError
from mobile_client.manifest import Manifest, load_manifest, verify_files
from mobile_client.manifest_entries import ClientEntry, FileEntry, HeadEntry, TrainStepEntry
from mobile_client.safetensors_np import load_file, save_file
from mobile_client.sessions import BoundStep, GraphSessions
from mobile_client.update import state_hash

WIDTH_TOL = 1e-9


@dataclass
class TrainResult:
    state: dict[str, np.ndarray]  # the client's full state at its width after training
    shared: dict[str, np.ndarray]  # the subset that travels (manifest shared_keys)
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    base_hash: str = ""  # state_hash of the shared arrays training started from
    momenta: dict[str, np.ndarray] = field(default_factory=dict)  # SGD momentum, by key


def _fmt_widths(ws: list[float]) -> str:
    return ", ".join(f"{w:g}" for w in ws)


class EdgeClient:
    """One client of an exported bundle (see the module docstring).

    ``client_id`` defaults to the bundle's only client; ``verify`` checks every file's
    sha256 against the manifest before anything is loaded. ``io_binding`` (default):
    training keeps the state in onnxruntime's buffers between steps
    (:class:`~mobile_client.sessions.BoundStep`); False feeds and fetches numpy arrays
    every step (the same numbers).
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike[str],
        client_id: str | None = None,
        *,
        verify: bool = True,
        threads: int | None = None,
        io_binding: bool = True,
    ) -> None:
        self.dir = Path(bundle_dir)
        self.manifest: Manifest = load_manifest(self.dir)
        if self.dir.is_file():
            self.dir = self.dir.parent
        if verify:
            verify_files(self.dir, self.manifest)
        ids = [c.client for c in self.manifest.clients]
        if client_id is None:
            if len(ids) != 1:
                raise ManifestError(
                    f"{self.dir}: the bundle has {len(ids)} clients ({', '.join(ids)}); "
                    "name one with client_id"
                )
            client_id = ids[0]
        self.entry: ClientEntry = self.manifest.client(client_id)
        self.client_id = client_id
        self._graphs = GraphSessions(self.dir, self.manifest, threads)
        self.io_binding = io_binding
        self._weights: dict[str, np.ndarray] | None = None
        self._local: dict[str, np.ndarray] = {}  # heads loaded from a local file
        self.last: TrainResult | None = None

    @property
    def threads(self) -> int | None:
        """onnxruntime intra-op threads of sessions opened from now on (None: its default)."""
        return self._graphs.threads

    @threads.setter
    def threads(self, n: int | None) -> None:
        self._graphs.threads = n

    # ------------------------------------------------------------------ lookups
    @property
    def widths(self) -> list[float]:
        """Widths this client can run: its own (weights and heads exist only there)."""
        return [w for w in self.manifest.width_values() if abs(w - self.entry.width) < WIDTH_TOL]

    @property
    def tasks(self) -> list[str]:
        return [h.task for h in self.manifest.heads_of(self.client_id)]

    @property
    def shared_keys(self) -> tuple[str, ...]:
        """Keys that travel to the server: the manifest's, i.e. the run's declared roles."""
        return self.entry.shared_keys

    def _width(self, width: float | None) -> float:
        if width is None:
            return self.entry.width
        w = float(width)
        if not (math.isfinite(w) and 0 < w <= 1):
            raise InputError(f"width must be a finite number in (0, 1], got {w:g}")
        if not abs(w - self.entry.width) < WIDTH_TOL:
            raise InputError(
                f"client {self.client_id!r} runs at width {self.entry.width:g}, got width "
                f"{float(width):g} (bundle widths: {_fmt_widths(self.manifest.width_values())})"
            )
        return self.entry.width

    def head(self, task: str) -> HeadEntry:
        for h in self.manifest.heads_of(self.client_id):
            if h.task == task:
                return h
        raise InputError(f"task {task!r} has no head for client {self.client_id!r}; "
                         f"tasks: {', '.join(self.tasks)}")  # fmt: skip

    def backbone_file(self, width: float | None = None) -> FileEntry:
        w = self._width(width)
        return self.entry.backbone or self.manifest.width(w).backbone

    def train_step(self, width: float | None = None) -> TrainStepEntry:
        w = self._width(width)
        steps = self.manifest.width(w).train_steps
        for s in steps:
            if self.client_id in s.clients:
                return s
        for s in steps:
            if set(s.tasks) == set(self.entry.tasks):
                return s
        raise ManifestError(f"width {w:g}: no train_step for client {self.client_id!r}")

    def session(self, f: FileEntry):  # -> onnxruntime.InferenceSession
        """The onnxruntime session of graph ``f`` (opened once, names checked)."""
        return self._graphs.session(f)

    # ------------------------------------------------------------------ state
    def base_state(self) -> dict[str, np.ndarray]:
        """The client's weights from the bundle, overlaid with heads loaded locally."""
        if self._weights is None:
            self._weights = read_weights(self.dir, self.entry.weights)
        return {**self._weights, **self._local}

    def load_local(self, path: str | os.PathLike[str]) -> None:
        """Use the (non-shared) arrays of a file written by :meth:`save_local`."""
        arrays, _ = load_file(path)
        shared = [k for k in arrays if k in set(self.shared_keys)]
        if shared:
            raise InputError(f"{path}: local file holds shared keys {shared}")
        self._local = overlay(self.base_state(), arrays, str(path))
        self._local = {k: self._local[k] for k in arrays}

    def save_local(self, path: str | os.PathLike[str]) -> Path:
        """Write the non-shared arrays (heads, ...) of the last trained state (or the
        bundle's) to a safetensors file; they never go into the update."""
        state = self.last.state if self.last is not None else self.base_state()
        shared = set(self.shared_keys)
        local = {k: v for k, v in state.items() if k not in shared}
        return save_file(local, path, {"client_id": self.client_id, "kind": "local"})

    def slice_global(
        self, state: Mapping[str, np.ndarray], round_idx: int | None = None, where: str = "state"
    ) -> dict[str, np.ndarray]:
        """The server's shared arrays (a checkpoint's ``global.safetensors``, full width)
        cut to this client's width by the manifest's ``slicing`` record; keys already at
        the client's width are kept. ``round_idx``: the round the client trains in (the
        rolling window of ``fedrolex`` slicing), default the bundle's round."""
        s = self.manifest.slicing
        rnd = self.manifest.round if round_idx is None else round_idx
        if s is not None:
            return s.slice_state(state, self.entry.width, rnd, where)
        base = self.base_state()
        for k, v in state.items():
            if k in base and v.shape != base[k].shape:
                raise InputError(
                    f"{where}: key {k!r} has shape {v.shape}, width {self.entry.width:g} needs "
                    f"{base[k].shape}, and this bundle's manifest has no 'slicing' record to "
                    "cut a full-width server state: export the bundle again (fmtl export)"
                )
        return dict(state)

    def start_state(self, start_from: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """The state training starts from: the base state overlaid with ``start_from``
        (the server's shared arrays), which must hold every shared key."""
        state = self.base_state()
        if start_from is None:
            return state
        state = overlay(state, start_from, "start_from")
        missing = [k for k in self.shared_keys if k not in start_from]
        if missing:
            raise InputError(
                f"start_from lacks {len(missing)} shared key(s) {missing[:3]}"
                f"{' ...' if len(missing) > 3 else ''}: training would silently start "
                "those from the bundle's weights"
            )
        return state

    # ------------------------------------------------------------------ inputs
    def prepare_x(self, x: Any) -> np.ndarray:
        """Validate and normalise an input batch to float32 ``(B, *input_shape)``."""
        return prepare_x(x, self.entry.normalisation)

    def prepare_targets(
        self, targets: Mapping[str, Any], tasks: tuple[str, ...], n: int
    ) -> dict[str, np.ndarray]:
        """Check the targets of ``tasks`` for ``n`` examples against this client's heads."""
        return prepare_targets(targets, tasks, n, self.head)

    # ------------------------------------------------------------------ inference
    def features(self, x: np.ndarray, width: float | None = None) -> np.ndarray:
        f = self.backbone_file(width)
        xin = f.x_input or (f.inputs[0].name if f.inputs else "x")
        feats = self._graphs.outputs(f, {xin: self.prepare_x(x)})[0]  # (B, F)
        return check_finite("features", feats)

    def predict(self, task: str, x: Any, width: float | None = None) -> np.ndarray:
        """Logits ``(B, n_labels)`` of ``task`` for a batch ``x``."""
        head = self.head(task)
        feats = self.features(x, width)
        fin = head.file.features_input or (head.file.inputs[0].name if head.file.inputs else "")
        logits = check_finite("logits", self._graphs.outputs(head.file, {fin: feats})[0])
        if head.columns is not None:
            logits = logits[:, head.columns[0] : head.columns[1]]
        if logits.ndim != 2 or logits.shape[1] != len(head.labels):
            raise ManifestError(f"file {head.file.path!r}: logits of shape {logits.shape}, "
                                f"expected (B, {len(head.labels)}) (one per label)")  # fmt: skip
        return logits

    # ------------------------------------------------------------------ training
    def train(
        self,
        x: Any,
        targets: Mapping[str, Any],
        *,
        width: float | None = None,
        epochs: int = 1,
        batch_size: int = 32,
        lr: float = 0.05,
        steps: int | None = None,
        seed: int = 0,
        head_only: bool = False,
        start_from: Mapping[str, np.ndarray] | None = None,
        progress: bool = False,
    ) -> TrainResult:
        """SGD on the exported step graphs over ``batch_order(n, batch_size, epochs,
        steps, seed)``; ``start_from``: the server's shared arrays at this width."""
        w = self._width(width)
        xs = self.prepare_x(x)
        n = xs.shape[0]
        if not (lr > 0 and np.isfinite(lr)):
            raise InputError(f"lr must be a finite number > 0, got {lr}")
        if batch_size <= 0 or epochs < 0 or (steps is not None and steps < 0) or seed < 0:
            raise InputError(f"batch_size must be > 0 and epochs/steps/seed >= 0, got "
                             f"{batch_size}/{epochs}/{steps}/{seed}")  # fmt: skip
        if num_batches(n, batch_size, epochs, steps) == 0:
            raise InputError(f"epochs={epochs}, steps={steps} give no training step: "
                             "nothing to train")  # fmt: skip
        shared = self.shared_keys
        state = self.start_state(start_from)
        base_hash = state_hash({k: state[k] for k in shared})
        lr_arr = np.asarray(lr, dtype=np.float32)
        per_epoch = -(-n // batch_size)
        losses: list[float] = []
        # SGD momentum buffers (step graphs exported with momentum): zeros before the
        # first step, as torch's optimiser starts each local fit, then carried step to step
        moms: dict[str, np.ndarray] = {}

        bound: dict[str, BoundStep] = {}  # graph path -> its bound step (io_binding)

        def run_step(f: FileEntry, feed: dict[str, np.ndarray]) -> float:
            """One step of graph ``f`` on ``feed`` (the batch: x or features, targets)."""
            if self.io_binding:
                if f.path not in bound:
                    bound[f.path] = self._graphs.bound(f, state, moms, lr_arr)
                return bound[f.path].step(feed)
            feed.update({name: state[key] for name, key in f.weights.items()})
            for name, key in f.momentum_inputs.items():
                feed[name] = moms[key] if key in moms else np.zeros_like(state[key])
            feed[f.lr_input or "lr"] = lr_arr
            res = self._graphs.run(f, feed)
            store_outputs(state, f, res)
            moms.update({key: res[name] for name, key in f.momentum_outputs.items()})
            return float(res[f.loss_output or "loss"])

        def collect() -> None:
            """Copy the bound steps' state out into ``state`` / ``moms`` (onnxruntime
            refused any output whose shape or dtype differs from the state's)."""
            for b in bound.values():
                ws, ms = b.state()
                state.update(ws)
                moms.update(ms)

        def report(i: int) -> None:
            if progress and (i % per_epoch == 0):
                e = i // per_epoch
                mean = float(np.mean(losses[-per_epoch:]))
                print(f"epoch {e}: {i} steps, loss {mean:.4f}", file=sys.stderr, flush=True)

        if head_only:
            heads = {t: self.head(t) for t in self.entry.tasks}
            stepped = {
                k for h in heads.values() if h.head_step for k in h.head_step.weights.values()
            }
            base = self.base_state()
            if start_from is not None and any(
                k not in stepped and not np.array_equal(v, base[k]) for k, v in start_from.items()
            ):
                raise InputError(
                    "head-only training computes features with the bundle's backbone graph "
                    "(weights inside the graph); start_from holds a different backbone: "
                    "train the full model or export a bundle from that backbone"
                )
            ys = self.prepare_targets(targets, tuple(heads), n)
            feats = self.features(xs, w)
            for i, idx in enumerate(batch_order(n, batch_size, epochs, steps, seed), 1):
                total = 0.0
                for t, h in heads.items():
                    s = h.head_step
                    if s is None:
                        raise ManifestError(f"head {h.client}/{t} has no head_step graph")
                    feed = {s.features_input or "features": feats[idx],
                            s.target_inputs["task"]: ys[t][idx]}  # fmt: skip
                    total += run_step(s, feed)
                losses.append(total)
                report(i)
        else:
            step = self.train_step(w).file
            ys = self.prepare_targets(targets, tuple(step.task_kinds), n)
            for i, idx in enumerate(batch_order(n, batch_size, epochs, steps, seed), 1):
                feed = {step.x_input or "x": xs[idx]}
                for t, y in ys.items():
                    feed[step.target_inputs[t]] = y[idx]
                losses.append(run_step(step, feed))
                report(i)
        collect()
        for k, v in state.items():
            if v.dtype.kind == "f" and not np.isfinite(v).all():
                raise InputError(f"training diverged: key {k!r} has NaN/Inf (lower lr={lr})")
        metrics = {"steps": float(len(losses))}
        if losses:
            metrics.update(loss=float(np.mean(losses)), last_loss=losses[-1])
        result = TrainResult(state, {k: state[k] for k in shared}, n, metrics, base_hash, moms)
        self.last = result
        return result
