"""Export each distinct graph once per bundle, and keep torch.onnx's known noise quiet.

A federated bundle holds one head and one head step per client and task. Clients at
one width whose heads have the same shape (and, for the step, the same loss kind) share
one graph: the head step's weights are graph inputs, so its file is the same for all of
them; a head's weights are baked in as initializers named after its state-dict keys,
so the file differs only in those values. :class:`GraphCache` exports each such graph
once (into its own temp dir) and writes every client's file from it: a copy for a step,
the template with the client's initializers for a head. The files, and so the
manifest, are those a separate export per client writes (a test compares them byte
for byte); a head whose initializers do not map one-to-one onto its state dict (the
ONNX optimizer folded something) is exported on its own.

:func:`quiet_export` silences, by message, the warnings torch.onnx prints on every
export that say nothing about the bundle (see :data:`HARMLESS`).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from torch import nn

from export.graphs import GraphInfo, TrainStepInfo, save_checked
from export.inference import export_head
from export.step_optimizer import PLAIN_SGD, StepOptimizer
from export.trainstep import export_head_step

# (category, message regex) of torch.onnx warnings that every export prints and that
# say nothing about the exported graph
HARMLESS: tuple[tuple[type[Warning], str], ...] = (
    # torch.utils._pytree deprecation inside torch.export itself (torch 2.13)
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # the one dynamic axis is named "batch" on every input that has it
    (UserWarning, r"# The axis name: batch will not be used, since it shares the same shape"),
)
# logger -> message prefix: torch.onnx's registry looks for torchvision's ops on each export
HARMLESS_LOGS = {"torch.onnx._internal.exporter._registration": "torchvision is not installed"}


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Within: the :data:`HARMLESS` warnings and :data:`HARMLESS_LOGS` lines are dropped;
    every other warning and log line still shows."""
    filters = [(logging.getLogger(name), _DropPrefix(p)) for name, p in HARMLESS_LOGS.items()]
    with warnings.catch_warnings():
        for category, message in HARMLESS:
            warnings.filterwarnings("ignore", message=message, category=category)
        for logger, f in filters:
            logger.addFilter(f)
        try:
            yield
        finally:
            for logger, f in filters:
                logger.removeFilter(f)


def _shapes(module: nn.Module) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((k, tuple(v.shape)) for k, v in module.state_dict().items())


class GraphCache:
    """Exports each distinct head / head-step graph once (see the module docstring).

    ``progress`` (if given) gets one line per file written, saying whether it was
    exported or written from an earlier export, with the seconds since the start.
    ``dedup=False`` exports every graph on its own (same files, slower).
    """

    def __init__(
        self,
        opset: int,
        progress: Callable[[str], None] | None = None,
        dedup: bool = True,
        opt: StepOptimizer = PLAIN_SGD,
    ) -> None:
        self.opset = opset
        self.opt = opt  # the head steps' SGD
        self.dedup = dedup  # False: every graph exported on its own (the reference)
        self.progress = progress
        self._tmp = tempfile.TemporaryDirectory(prefix="fmtl-graphs-")
        self._made: dict[tuple, GraphInfo | TrainStepInfo] = {}
        self.exported = self.reused = 0
        self._t0 = time.perf_counter()

    def close(self) -> None:
        self._tmp.cleanup()

    def __enter__(self) -> GraphCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def note(self, path: Path | str, how: str) -> None:
        """One progress line for ``path`` (also used for graphs exported elsewhere)."""
        if how == "exported":
            self.exported += 1
        else:
            self.reused += 1
        if self.progress is not None:
            t = time.perf_counter() - self._t0
            self.progress(f"{t:6.1f} s  {Path(path).name} ({how})")

    def _template(self, key: tuple, make: Callable[[Path], GraphInfo | TrainStepInfo]):
        hit = self._made.get(key)
        if hit is None:
            hit = make(Path(self._tmp.name) / f"g{len(self._made)}.onnx")
            self._made[key] = hit
            return hit, "exported"
        return hit, "same graph as an earlier one"

    def head_step(self, head: nn.Linear, kind: str, path: Path, feature_dim: int) -> TrainStepInfo:
        """:func:`~export.trainstep.export_head_step`, once per (kind, feature dim, shapes)."""
        if not self.dedup:
            out = export_head_step(head, kind, path, feature_dim, self.opset, self.opt)
            self.note(path, "exported")
            return out
        key = ("head_step", kind, feature_dim, _shapes(head), self.opt)
        info, how = self._template(
            key, lambda p: export_head_step(head, kind, p, feature_dim, self.opset, self.opt)
        )
        shutil.copyfile(info.path, path)
        self.note(path, "exported" if how == "exported" else f"{how}: copied")
        return replace(info, path=str(path))  # type: ignore[arg-type]

    def head(self, head: nn.Linear, path: Path, feature_dim: int) -> GraphInfo:
        """:func:`~export.inference.export_head` with this head's weights, the graph
        exported once per (feature dim, shapes)."""
        if not self.dedup:
            out = export_head(head, path, feature_dim, self.opset)
            self.note(path, "exported")
            return out
        key = ("head", feature_dim, _shapes(head))
        info, how = self._template(key, lambda p: export_head(head, p, feature_dim, self.opset))
        proto = onnx.load(info.path)
        state = {k: v.detach().cpu().numpy() for k, v in head.state_dict().items()}
        inits = {t.name: t for t in proto.graph.initializer}
        if set(inits) != set(state) or any(
            tuple(inits[k].dims) != v.shape for k, v in state.items()
        ):  # folded by the optimizer: no one-to-one map, export this head on its own
            out = export_head(head, path, feature_dim, self.opset)
            self.note(path, "exported")
            return out
        for k, v in state.items():
            inits[k].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(v), k))
        save_checked(proto, path)
        self.note(path, "exported" if how == "exported" else f"{how}, its own weights")
        return replace(info, path=str(path))  # type: ignore[arg-type]
