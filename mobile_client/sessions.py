"""onnxruntime sessions for the graphs of an exported bundle (numpy + onnxruntime).

:class:`GraphSessions` opens each graph a manifest entry names once, checks that the
input/output names the manifest gives are the graph's own, and runs it; anything
onnxruntime raises for a file that is no model, or a graph that cannot run, becomes
a :class:`~mobile_client.errors.ManifestError` naming the file. :class:`BoundStep` runs a
step graph through I/O binding, its state held in onnxruntime's own buffers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mobile_client.errors import ManifestError
from mobile_client.manifest import Manifest
from mobile_client.manifest_checks import check_graph_names
from mobile_client.manifest_entries import FileEntry


def ort_errors() -> tuple[type[Exception], ...]:
    """What onnxruntime raises for a file that is no model or a graph that cannot run."""
    from onnxruntime.capi import onnxruntime_pybind11_state as st

    own = (e for e in vars(st).values() if isinstance(e, type) and issubclass(e, Exception))
    return (RuntimeError, ValueError, *own)


class GraphSessions:
    """A cache of onnxruntime sessions, one per graph file of the bundle at ``root``.

    ``threads``: onnxruntime intra-op threads (None: onnxruntime's default).
    """

    def __init__(self, root: Path, manifest: Manifest, threads: int | None = None) -> None:
        self.root = root
        self.manifest = manifest
        self.threads = threads
        self._sessions: dict[str, Any] = {}

    def session(self, f: FileEntry):  # -> onnxruntime.InferenceSession
        if f.path not in self._sessions:
            import onnxruntime as ort

            p = self.root / f.path
            if not p.is_file():
                raise ManifestError(f"file {f.path!r} named in the manifest is missing ({p})")
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            if f.weights:  # a step graph: a memory pattern planned for the whole step
                opts.enable_mem_pattern = False  # raises the peak (170 -> 132 MB, width-1 CNN)
            if self.threads is not None:
                opts.intra_op_num_threads = self.threads
                opts.inter_op_num_threads = 1
            try:
                self._sessions[f.path] = ort.InferenceSession(
                    str(p), opts, providers=["CPUExecutionProvider"]
                )
            except ort_errors() as exc:
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

    def outputs(self, f: FileEntry, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Every output of graph ``f`` on ``feeds``, in the graph's order."""
        sess = self.session(f)
        try:
            return sess.run(None, dict(feeds))
        except ort_errors() as exc:
            raise ManifestError(f"file {f.path!r}: the graph does not run: {exc}") from exc

    def run(self, f: FileEntry, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs of graph ``f`` by the names the manifest lists."""
        out = self.outputs(f, feeds)
        if len(out) != len(f.outputs):
            raise ManifestError(f"file {f.path!r}: {len(out)} outputs, the manifest lists "
                                f"{len(f.outputs)}")  # fmt: skip
        return dict(zip([o.name for o in f.outputs], out, strict=True))

    def bound(
        self,
        f: FileEntry,
        state: Mapping[str, np.ndarray],
        momenta: Mapping[str, np.ndarray],
        lr: np.ndarray,
    ) -> BoundStep:
        """Step graph ``f`` behind I/O binding, starting from ``state`` and ``momenta``
        (missing momentum buffers start at zeros), at learning rate ``lr``."""
        return BoundStep(self.session(f), f, state, momenta, lr)


class BoundStep:
    """A step graph run through onnxruntime's I/O binding, its state kept in ORT-owned
    ``OrtValue``s instead of numpy arrays fed and fetched every step.

    The stepped state (weights, buffers, momentum buffers: every graph input with an
    output of the same key) lives in two sets of ``OrtValue``s: a step reads one set and
    writes its outputs straight into the other, then the two swap (ping-pong; an output
    never aliases an input, since the graph may still read a weight after writing its new
    value). Only the batch (``x``, targets) and the loss cross into Python per step;
    :meth:`state` copies the arrays out once, at the end.
    """

    def __init__(
        self,
        sess: Any,  # onnxruntime.InferenceSession
        f: FileEntry,
        state: Mapping[str, np.ndarray],
        momenta: Mapping[str, np.ndarray],
        lr: np.ndarray,
    ) -> None:
        from onnxruntime import OrtValue

        self.sess, self.f = sess, f
        ins = {**{n: ("w", k) for n, k in f.weights.items()},
               **{n: ("m", k) for n, k in f.momentum_inputs.items()}}  # fmt: skip
        outs = {**{n: ("w", k) for n, k in f.weight_outputs.items()},
                **{n: ("m", k) for n, k in f.momentum_outputs.items()}}  # fmt: skip
        src = {("w", k): v for k, v in state.items()}

        def value(slot: tuple[str, str]) -> np.ndarray:
            kind, key = slot
            if kind == "w":
                return np.asarray(src[slot], order="C")  # (0-d stays 0-d)
            m = momenta[key] if key in momenta else np.zeros_like(state[key])
            return np.asarray(m, order="C")

        def owned(a: np.ndarray, fill: bool = True) -> Any:  # an ORT-allocated copy of a
            v = OrtValue.ortvalue_from_shape_and_type(a.shape, a.dtype, "cpu", 0)
            if fill:
                v.update_inplace(a)
            return v

        stepped = set(ins.values()) & set(outs.values())
        # the two sets a step reads from / writes to in turn; inputs with no output are fixed
        self._sets = [{s: owned(value(s)) for s in stepped},
                      {s: owned(value(s), fill=False) for s in stepped}]  # fmt: skip
        self._fixed = {n: owned(value(s)) for n, s in ins.items() if s not in stepped}
        others = [o.name for o in sess.get_outputs() if o.name not in outs]
        lr_arr = np.asarray(lr, dtype=np.float32, order="C")
        # one binding per direction (0: set 0 -> set 1, 1: set 1 -> set 0), bound once;
        # a step rebinds only its batch
        self._io = []
        for d in (0, 1):
            io = sess.io_binding()
            for n, slot in ins.items():
                io.bind_ortvalue_input(
                    n, self._sets[d][slot] if slot in stepped else self._fixed[n]
                )
            io.bind_cpu_input(f.lr_input or "lr", lr_arr)
            for n in others:  # first: get_outputs() lists outputs in binding order
                io.bind_output(n)
            for n, slot in outs.items():
                if slot in stepped:
                    io.bind_ortvalue_output(n, self._sets[1 - d][slot])
            self._io.append(io)
        self._lr, self._cur = lr_arr, 0  # lr_arr: alive as long as the bindings
        self._loss = others.index(f.loss_output or "loss")

    def step(self, batch: Mapping[str, np.ndarray]) -> float:
        """One step on ``batch`` (graph input name -> array: x and targets); the loss."""
        io = self._io[self._cur]
        held = [np.asarray(a, order="C") for a in batch.values()]  # alive through the run
        for n, a in zip(batch, held, strict=True):
            io.bind_cpu_input(n, a)
        try:
            self.sess.run_with_iobinding(io)
        except ort_errors() as exc:
            raise ManifestError(f"file {self.f.path!r}: the graph does not run: {exc}") from exc
        self._cur = 1 - self._cur
        return float(io.get_outputs()[self._loss].numpy())

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``(weights, momenta)`` by key: the stepped arrays as they are now (copies)."""
        w: dict[str, np.ndarray] = {}
        m: dict[str, np.ndarray] = {}
        for (kind, key), v in self._sets[self._cur].items():
            (w if kind == "w" else m)[key] = np.array(v.numpy(), copy=True)
        return w, m
