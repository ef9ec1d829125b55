"""onnxruntime sessions for the graphs of an exported bundle (numpy + onnxruntime).

:class:`GraphSessions` opens each graph a manifest entry names once, checks that the
input/output names the manifest gives are the graph's own, and runs it; anything
onnxruntime raises for a file that is no model, or a graph that cannot run, becomes
a :class:`~mobile_client.errors.ManifestError` naming the file.
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
