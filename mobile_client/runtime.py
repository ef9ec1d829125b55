"""The edge client: inference and local training on an exported bundle (numpy + onnxruntime).

:class:`EdgeClient` reads only ``manifest.json`` and the files it names. Inference runs
the backbone graph then the task's head graph. Training runs the exported SGD step
graphs over the batches of :func:`mobile_client.batching.batch_order`, starting from
the client's weights (``weights_{cid}.npz``) overlaid with the server's shared arrays;
it returns the new state and its shared subset (what goes into the update). The
heads stay on the device (:meth:`EdgeClient.save_local`).
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
from mobile_client.errors import InputError, ManifestError
from mobile_client.inputs import read_npz
from mobile_client.manifest import (
    ClientEntry,
    FileEntry,
    HeadEntry,
    Manifest,
    TrainStepEntry,
    check_graph_names,
    load_manifest,
    verify_files,
)
from mobile_client.safetensors_np import load_file, save_file
from mobile_client.update import state_hash

WIDTH_TOL = 1e-9


@dataclass
class TrainResult:
    state: dict[str, np.ndarray]  # the client's full state at its width after training
    shared: dict[str, np.ndarray]  # the subset that travels (manifest shared_keys)
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    base_hash: str = ""  # state_hash of the shared arrays training started from


def _store(state: dict[str, np.ndarray], f: FileEntry, res: Mapping[str, np.ndarray]) -> None:
    """Write a step graph's new weights into ``state``; each keeps its shape and dtype
    (a 0-d buffer such as ``num_batches_tracked`` stays 0-d, as the manifest declares)."""
    for name, key in f.weight_outputs.items():
        v, old = res[name], state[key]
        if v.shape != old.shape or v.dtype != old.dtype:
            raise ManifestError(
                f"{f.path}: output {name!r} for key {key!r} is {v.dtype}{list(v.shape)}, "
                f"the state holds {old.dtype}{list(old.shape)}"
            )
        state[key] = v


def _fmt_widths(ws: list[float]) -> str:
    return ", ".join(f"{w:g}" for w in ws)


def _ort_errors() -> tuple[type[Exception], ...]:
    """What onnxruntime raises for a file that is no model or a graph that cannot run."""
    from onnxruntime.capi import onnxruntime_pybind11_state as st

    own = (e for e in vars(st).values() if isinstance(e, type) and issubclass(e, Exception))
    return (RuntimeError, ValueError, *own)


def max_abs(dtype: np.dtype) -> float:
    """The magnitude bound of a float value, as the server checks it: sqrt(finfo.max)."""
    return float(np.sqrt(np.finfo(dtype).max, dtype=np.float64))


def _check_finite(name: str, a: np.ndarray) -> np.ndarray:
    bad = ~np.isfinite(a)
    if bad.any():
        raise InputError(
            f"{name} has {int(bad.sum())} NaN/Inf values (first at {np.argwhere(bad)[0].tolist()}): "
            "the input is outside the range the model can compute on"
        )
    return a


class EdgeClient:
    """One client of an exported bundle (see the module docstring).

    ``client_id`` defaults to the bundle's only client; ``verify`` checks every file's
    sha256 against the manifest before anything is loaded.
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike[str],
        client_id: str | None = None,
        *,
        verify: bool = True,
        threads: int | None = None,
    ) -> None:
        self.threads = threads  # onnxruntime intra-op threads (None: onnxruntime's default)
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
        self._sessions: dict[str, Any] = {}
        self._weights: dict[str, np.ndarray] | None = None
        self._local: dict[str, np.ndarray] = {}  # heads loaded from a local file
        self.last: TrainResult | None = None

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
        if f.path not in self._sessions:
            import onnxruntime as ort

            p = self.dir / f.path
            if not p.is_file():
                raise ManifestError(f"file {f.path!r} named in the manifest is missing ({p})")
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            if self.threads is not None:
                opts.intra_op_num_threads = self.threads
                opts.inter_op_num_threads = 1
            try:
                self._sessions[f.path] = ort.InferenceSession(
                    str(p), opts, providers=["CPUExecutionProvider"]
                )
            except _ort_errors() as exc:
                raise ManifestError(f"file {f.path!r}: not a loadable ONNX model: {exc}") from exc
            sess = self._sessions[f.path]
            where = next((w for e, w in self.manifest.graph_entries() if e is f), f.path)
            try:  # the names the manifest gives must be the graph's own
                check_graph_names(
                    f,
                    {i.name for i in sess.get_inputs()},
                    {o.name for o in sess.get_outputs()},
                    where,
                )
            except ManifestError:
                del self._sessions[f.path]
                raise
        return self._sessions[f.path]

    def _outputs(self, f: FileEntry, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        sess = self.session(f)
        try:
            return sess.run(None, dict(feeds))
        except _ort_errors() as exc:
            raise ManifestError(f"file {f.path!r}: the graph does not run: {exc}") from exc

    def _run(self, f: FileEntry, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self._outputs(f, feeds)
        if len(out) != len(f.outputs):
            raise ManifestError(f"file {f.path!r}: {len(out)} outputs, the manifest lists "
                                f"{len(f.outputs)}")  # fmt: skip
        return dict(zip([o.name for o in f.outputs], out, strict=True))

    # ------------------------------------------------------------------ state
    def base_state(self) -> dict[str, np.ndarray]:
        """The client's weights from the bundle, overlaid with heads loaded locally."""
        if self._weights is None:
            f = self.entry.weights
            p = self.dir / f.path
            if not p.is_file():
                raise ManifestError(f"file {f.path!r} is missing ({p})")
            keys = list(dict.fromkeys(f.weights.values()))
            arrays = read_npz(p, keys, error=ManifestError)
            specs = {t.name: t for t in f.outputs}
            for k, a in arrays.items():
                t = specs.get(k)
                if t is not None and (list(a.shape) != list(t.shape) or str(a.dtype) != t.dtype):
                    raise ManifestError(f"file {f.path!r}: key {k!r} is {a.dtype}{list(a.shape)}, "
                                        f"the manifest says {t.dtype}{list(t.shape)}")  # fmt: skip
                if a.dtype.kind == "f" and not np.isfinite(a).all():
                    raise ManifestError(f"file {f.path!r}: key {k!r} has NaN/Inf")
            self._weights = arrays
        return {**self._weights, **self._local}

    def _overlay(
        self, state: dict[str, np.ndarray], arrays: Mapping[str, np.ndarray], what: str
    ) -> dict[str, np.ndarray]:
        out = dict(state)
        for k, v in arrays.items():
            v = np.asarray(v)
            if k not in state:
                raise InputError(f"{what}: key {k!r} is not in the client's state")
            if v.shape != state[k].shape or v.dtype != state[k].dtype:
                raise InputError(
                    f"{what}: key {k!r} expected {state[k].dtype}{list(state[k].shape)}, "
                    f"got {v.dtype}{list(v.shape)}"
                )
            if v.dtype.kind == "f" and not np.isfinite(v).all():
                raise InputError(f"{what}: key {k!r} has NaN/Inf")
            if v.dtype.kind == "f" and v.size and np.abs(v).max() > max_abs(v.dtype):
                raise InputError(
                    f"{what}: key {k!r} has |x| {float(np.abs(v).max()):.3g}, past the bound "
                    f"sqrt(finfo.max) = {max_abs(v.dtype):.3g} an update must keep"
                )
            out[k] = v
        return out

    def load_local(self, path: str | os.PathLike[str]) -> None:
        """Use the (non-shared) arrays of a file written by :meth:`save_local`."""
        arrays, _ = load_file(path)
        shared = [k for k in arrays if k in set(self.shared_keys)]
        if shared:
            raise InputError(f"{path}: local file holds shared keys {shared}")
        self._local = self._overlay(self.base_state(), arrays, str(path))
        self._local = {k: self._local[k] for k in arrays}

    def save_local(self, path: str | os.PathLike[str]) -> Path:
        """Write the non-shared arrays (heads, ...) of the last trained state (or the
        bundle's) to a safetensors file; they never go into the update."""
        state = self.last.state if self.last is not None else self.base_state()
        shared = set(self.shared_keys)
        local = {k: v for k, v in state.items() if k not in shared}
        return save_file(local, path, {"client_id": self.client_id, "kind": "local"})

    def start_state(self, start_from: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """The state training starts from: the base state overlaid with ``start_from``
        (the server's shared arrays), which must hold every shared key."""
        state = self.base_state()
        if start_from is None:
            return state
        state = self._overlay(state, start_from, "start_from")
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
        """Validate and normalise an input batch to float32 ``(B, C, H, W)``."""
        norm = self.entry.normalisation
        c, h, w = norm.input_shape
        if not isinstance(x, np.ndarray):
            raise InputError(f"x must be a numpy array, got {type(x).__name__}")
        if x.dtype == np.uint8:
            x = ((x.astype(np.float32) * np.float32(norm.scale) - np.float32(norm.mean))
                 / np.float32(norm.std)).astype(np.float32)  # fmt: skip
        elif x.dtype != np.float32:
            raise InputError(
                f"x has dtype {x.dtype}; expected float32 (normalised) or uint8 (pixels)"
            )
        if x.ndim == 3 and c == 1:
            x = x[:, None]  # (B, H, W) -> (B, 1, H, W)
        if x.ndim != 4 or x.shape[1:] != (c, h, w) or x.shape[0] == 0:
            want = f"(B, {c}, {h}, {w})" + (f" or (B, {h}, {w})" if c == 1 else "")
            raise InputError(f"x has shape {tuple(x.shape)}; expected {want} with B >= 1")
        bad = ~np.isfinite(x)
        if bad.any():
            raise InputError(f"x has {int(bad.sum())} NaN/Inf values (first at {np.argwhere(bad)[0].tolist()})")  # fmt: skip
        return np.ascontiguousarray(x)

    def prepare_targets(self, targets: Mapping[str, Any], tasks: tuple[str, ...], n: int):
        out: dict[str, np.ndarray] = {}
        missing = [t for t in tasks if t not in targets]
        if missing:
            raise InputError(f"targets missing for tasks {missing}; given {list(targets)}")
        extra = [t for t in targets if t not in tasks]
        if extra:
            raise InputError(f"targets for unknown tasks {extra}; tasks: {list(tasks)}")
        for t in tasks:
            head = self.head(t)
            k = len(head.labels)
            y = np.asarray(targets[t])
            if head.kind == "multiclass":
                if y.dtype.kind not in "iu":
                    raise InputError(
                        f"targets[{t!r}] has dtype {y.dtype}; expected int64 class ids"
                    )
                if y.shape != (n,):
                    raise InputError(f"targets[{t!r}] has shape {y.shape}; expected ({n},)")
                if y.size and (y.min() < 0 or y.max() >= k):
                    raise InputError(f"targets[{t!r}] has class ids in [{y.min()}, {y.max()}]; "
                                     f"expected [0, {k - 1}]")  # fmt: skip
                out[t] = y.astype(np.int64)
            else:
                if y.dtype != np.float32:
                    raise InputError(f"targets[{t!r}] has dtype {y.dtype}; expected float32 0/1")
                if y.shape != (n, k):
                    raise InputError(f"targets[{t!r}] has shape {y.shape}; expected ({n}, {k})")
                if not np.isin(y, (0.0, 1.0)).all():
                    raise InputError(f"targets[{t!r}] has values other than 0/1 (or NaN)")
                out[t] = y
        return out

    # ------------------------------------------------------------------ inference
    def features(self, x: np.ndarray, width: float | None = None) -> np.ndarray:
        f = self.backbone_file(width)
        xin = f.x_input or (f.inputs[0].name if f.inputs else "x")
        return _check_finite("features", self._outputs(f, {xin: self.prepare_x(x)})[0])  # (B, F)

    def predict(self, task: str, x: Any, width: float | None = None) -> np.ndarray:
        """Logits ``(B, n_labels)`` of ``task`` for a batch ``x``."""
        head = self.head(task)
        feats = self.features(x, width)
        fin = head.file.features_input or (head.file.inputs[0].name if head.file.inputs else "")
        logits = _check_finite("logits", self._outputs(head.file, {fin: feats})[0])
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
                    feed = {name: state[key] for name, key in s.weights.items()}
                    feed[s.features_input or "features"] = feats[idx]
                    feed[s.target_inputs["task"]] = ys[t][idx]
                    feed[s.lr_input or "lr"] = lr_arr
                    res = self._run(s, feed)
                    _store(state, s, res)
                    total += float(res[s.loss_output or "loss"])
                losses.append(total)
                report(i)
        else:
            step = self.train_step(w).file
            ys = self.prepare_targets(targets, tuple(step.task_kinds), n)
            for i, idx in enumerate(batch_order(n, batch_size, epochs, steps, seed), 1):
                feed = {name: state[key] for name, key in step.weights.items()}
                feed[step.x_input or "x"] = xs[idx]
                for t, y in ys.items():
                    feed[step.target_inputs[t]] = y[idx]
                feed[step.lr_input or "lr"] = lr_arr
                res = self._run(step, feed)
                _store(state, step, res)
                losses.append(float(res[step.loss_output or "loss"]))
                report(i)
        for k, v in state.items():
            if v.dtype.kind == "f" and not np.isfinite(v).all():
                raise InputError(f"training diverged: key {k!r} has NaN/Inf (lower lr={lr})")
        metrics = {"steps": float(len(losses))}
        if losses:
            metrics.update(loss=float(np.mean(losses)), last_loss=losses[-1])
        result = TrainResult(state, {k: state[k] for k in shared}, n, metrics, base_hash)
        self.last = result
        return result
