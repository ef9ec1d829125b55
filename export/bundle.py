"""Writing a device bundle: graph files and their manifest entries, built in a staging
directory that is renamed into place.

:class:`BundleWriter` turns exported graphs (:class:`~export.graphs.GraphInfo`,
:class:`~export.graphs.TrainStepInfo`) and weight arrays into manifest
:class:`~mobile_client.manifest_entries.FileEntry` records (paths relative to the
bundle, sha256, optional ``.ort``). :func:`build_atomically` runs a build in a temp dir
next to ``out_dir`` and renames it into place, so ``out_dir`` is either complete or
absent. Temp dirs carry the exporting process's id (``.{name}.tmp-{pid}-*``); the next
export to the same ``out_dir`` removes those of processes that no longer run (an export
killed with ``kill -9``).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from export.graphs import ExportError, GraphInfo, TrainStepInfo, stamp_file, to_ort_format
from mobile_client.manifest import Manifest, sha256_file
from mobile_client.manifest_entries import (
    FileEntry,
    FileRef,
    MemoryEntry,
    Normalisation,
    TensorSpec,
)
from mobile_client.slicing import KeySlicing, Slicing

if TYPE_CHECKING:
    from fmtl_lightning.roles import ModelSpec


class RunExportError(ExportError, ValueError):
    """A run directory, width, client or model that cannot be exported (names which)."""


def graph_metadata(
    *,
    family: str,
    width: float,
    task_kinds: Mapping[str, str],
    norms: Iterable[Normalisation],
    client: str | None = None,
) -> dict[str, str]:
    """The ``metadata_props`` a bundle graph carries, so that the file describes itself
    without the manifest: ``fmtl.model_family``, ``fmtl.width``, ``fmtl.tasks`` (JSON
    list), ``fmtl.task_kinds`` (JSON task -> kind), ``fmtl.normalisation`` (JSON domain ->
    ``{mean, std, input_shape, scale, domain}``, the manifest's normalisation of the
    clients using the graph), ``fmtl.client`` for a per-client graph; :class:`BundleWriter`
    adds ``fmtl.graph`` (its manifest kind) and ``fmtl.format_version``."""
    meta = {
        "fmtl.model_family": family,
        "fmtl.width": f"{width:g}",
        "fmtl.tasks": json.dumps(list(task_kinds)),
        "fmtl.task_kinds": json.dumps(dict(task_kinds), sort_keys=True),
        "fmtl.normalisation": json.dumps(
            {n.domain: {**asdict(n), "input_shape": list(n.input_shape)} for n in norms},
            sort_keys=True,
        ),
    }
    if client is not None:
        meta["fmtl.client"] = client
    return meta


def slicing_record(spec: ModelSpec, mode: str, keys: Iterable[str]) -> Slicing:
    """The manifest's ``slicing`` record: how the server's ``keys`` are cut to a width
    (the run's ModelSpec and slicing mode; :mod:`mobile_client.slicing`)."""
    return Slicing(
        mode=mode,
        groups=dict(spec.groups),
        keys={
            k: KeySlicing(tuple(spec[k].shape), tuple(spec[k].axes), tuple(spec[k].blocks))
            for k in keys
        },  # fmt: skip
        segments={g: tuple((a, int(n)) for a, n in segs) for g, segs in spec.segments.items()},
    )


def measure_memory(staging: Path, manifest: Manifest) -> Manifest:
    """``manifest`` with each width's ``memory`` measured by :mod:`mobile_client.memory`
    in a fresh process (one per width, its first client; a width without a client has
    none). ``manifest`` must already be written to ``staging``."""
    import mobile_client

    root = str(Path(mobile_client.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [root, *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
    widths = []
    for w in manifest.widths:
        cid = next((c.client for c in manifest.clients if abs(c.width - w.width) < 1e-9), None)
        if cid is None:
            widths.append(w)
            continue
        cmd = [sys.executable, "-m", "mobile_client.memory", str(staging), cid]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if res.returncode != 0:
            raise RunExportError(f"measuring the memory of width {w.width:g} (client {cid}) "
                                 f"failed: {res.stderr.strip()[-2000:]}")  # fmt: skip
        mem = MemoryEntry(**json.loads(res.stdout.strip().splitlines()[-1]))
        widths.append(replace(w, memory=mem))
    return replace(manifest, widths=tuple(widths))


def width_tag(width: float) -> str:
    """A width as it appears in bundle file names (``backbone_w0.5.onnx``)."""
    return f"{width:g}"


def _rel(staging: Path, p: str | Path) -> str:
    return Path(p).resolve().relative_to(staging.resolve()).as_posix()


class BundleWriter:
    """Writes graphs into the staging dir and builds their manifest entries."""

    def __init__(self, staging: Path, opset: int, ort: bool) -> None:
        self.dir = staging
        self.opset = opset
        self.ort = ort

    def _ref(
        self, path: Path, kind: str, meta: Mapping[str, str] | None
    ) -> tuple[str, str, FileRef | None]:
        stamp_file(path, {**(meta or {}), "fmtl.graph": kind})  # before its hash and .ort
        ort = None
        if self.ort:
            (o,) = to_ort_format([path])
            ort = FileRef(_rel(self.dir, o), sha256_file(o))
        return _rel(self.dir, path), sha256_file(path), ort

    def graph(self, info: GraphInfo, meta: Mapping[str, str] | None = None) -> FileEntry:
        """A backbone/head graph's entry; ``meta`` (:func:`graph_metadata`) is stamped
        into the file's ``metadata_props`` first."""
        rel, sha, ort = self._ref(Path(info.path), info.kind, meta)
        return FileEntry(
            path=rel,
            sha256=sha,
            kind=info.kind,
            inputs=tuple(TensorSpec(t.name, tuple(t.shape), t.dtype) for t in info.inputs),
            outputs=tuple(TensorSpec(t.name, tuple(t.shape), t.dtype) for t in info.outputs),
            weights=dict(info.weights),
            x_input="x" if info.kind == "backbone" else None,
            features_input="features" if info.kind == "head" else None,
            ort=ort,
        )

    def step(
        self,
        info: TrainStepInfo,
        kind: str,
        key_prefix: str = "",
        meta: Mapping[str, str] | None = None,
    ) -> FileEntry:
        """A step graph's entry; ``meta`` is stamped into the file as in :meth:`graph`."""
        rel, sha, ort = self._ref(Path(info.path), kind, meta)
        return FileEntry(
            path=rel,
            sha256=sha,
            kind=kind,
            inputs=tuple(TensorSpec(t.name, tuple(t.shape), t.dtype) for t in info.inputs),
            outputs=tuple(TensorSpec(t.name, tuple(t.shape), t.dtype) for t in info.outputs),
            weights={
                n: key_prefix + k for n, k in {**info.param_inputs, **info.buffer_inputs}.items()
            },
            weight_outputs={
                n: key_prefix + k for n, k in {**info.param_outputs, **info.buffer_outputs}.items()
            },
            lr_input=info.lr_input,
            loss_output=info.loss_output,
            x_input=info.x_input,
            features_input=info.features_input,
            target_inputs=dict(info.target_inputs),
            task_kinds=dict(info.task_kinds),
            ort=ort,
            momentum_inputs={n: key_prefix + k for n, k in info.momentum_inputs.items()},
            momentum_outputs={n: key_prefix + k for n, k in info.momentum_outputs.items()},
            optimizer=dict(info.optimizer),
        )

    def weights(self, name: str, arrays: Mapping[str, np.ndarray]) -> FileEntry:
        path = self.dir / name
        with open(path, "wb") as f:
            np.savez(f, **{k: np.asarray(v, order="C") for k, v in arrays.items()})  # type: ignore[arg-type]
        specs = tuple(TensorSpec(k, tuple(v.shape), str(v.dtype)) for k, v in arrays.items())
        return FileEntry(
            path=name, sha256=sha256_file(path), kind="weights", outputs=specs,
            weights={k: k for k in arrays},
        )  # fmt: skip


# ----------------------------------------------------------------------------- atomic output
def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite:
        raise RunExportError(f"output directory {out_dir} already exists (use --overwrite)")
    if out_dir.exists() and not out_dir.is_dir():
        raise RunExportError(f"output path {out_dir} exists and is not a directory")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # PermissionError: exists, owned by another user
    return True


def _sweep_stale(out_dir: Path) -> list[Path]:
    """Remove temp dirs of exports to ``out_dir`` whose process is gone; returns them."""
    removed = []
    for kind in ("tmp", "old"):
        prefix = f".{out_dir.name}.{kind}-"
        for p in out_dir.parent.glob(f"{glob.escape(prefix)}*"):
            pid = p.name[len(prefix) :].split("-", 1)[0]
            if p.is_dir() and pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def build_atomically(out_dir: Path, overwrite: bool, build: Callable[[Path], None]) -> Path:
    """Run ``build(staging)`` in a temp dir next to ``out_dir``, then rename it into place."""
    out_dir = Path(out_dir).absolute()
    check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(out_dir)
    tag = f".{out_dir.name}.%s-{os.getpid()}-"
    staging = Path(tempfile.mkdtemp(prefix=tag % "tmp", dir=out_dir.parent))
    try:
        build(staging)
        os.chmod(staging, 0o755)
        if out_dir.exists():
            check_out_dir(out_dir, overwrite)
            old = Path(tempfile.mkdtemp(prefix=tag % "old", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            os.replace(staging, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def created_stamp() -> str:
    """The manifest's ``created`` field: now, UTC, ISO 8601."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
