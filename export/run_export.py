"""Export a finished run (or one model) to a device bundle: ONNX graphs + ``manifest.json``.

* :func:`export_run` reads a run directory written by ``fmtl simulate`` (last
  completed round) and writes, per width, ``backbone_w{width}.onnx`` (x -> features,
  the shared backbone) and one full training step per distinct task set of the
  clients at that width (``train_step_w{width}_{n}.onnx``); per client and task
  ``head_{cid}_{task}.onnx`` (features -> logits) and ``head_step_{cid}_{task}.onnx``
  (one SGD step of the head on frozen features); per client ``weights_{cid}.npz``
  (its deployable state at its width, state-dict keys: what the step graphs take)
  and, when its backbone differs from the shared one (Ditto/local personal models,
  FedBN local norms, static batch-norm statistics), ``backbone_{cid}_w{width}.onnx``.
  Static batch norm is exported in eval mode with the client's statistics (computed by
  the simulation on the exported round's weights, read from its checkpoint), so a
  prediction never depends on the rest of its batch. FedAvg runs have one union head: it is exported once per client as
  ``head_{cid}_union.onnx`` and every task entry records its logit ``columns``.
* :func:`export_model` does the same for one :class:`MultiTaskModel` given directly.

The bundle is built in a temp dir next to ``out_dir`` and renamed into place, so
``out_dir`` is either complete or absent. Temp dirs carry the exporting process's
id (``.{name}.tmp-{pid}-*``); the next export to the same ``out_dir`` removes those
of processes that no longer run (an export killed with ``kill -9``). The manifest schema lives in
:mod:`mobile_client.manifest` (the ground floor owns the wire formats).
"""

from __future__ import annotations

import glob
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from export.graphs import ExportError, GraphInfo, TrainStepInfo, sanitize, to_ort_format
from export.inference import export_backbone, export_head
from export.trainstep import export_head_step, export_train_step
from mobile_client.manifest import Manifest, sha256_file, write_manifest
from mobile_client.manifest_entries import (
    ClientEntry,
    FileEntry,
    FileRef,
    HeadEntry,
    Normalisation,
    TensorSpec,
    TrainStepEntry,
    WidthEntry,
)

if TYPE_CHECKING:
    from fmtl_lightning.roles import RolePolicy
    from fmtl_lightning.run_artifacts import RunArtifacts

WIDTH_TOL = 1e-9


class RunExportError(ExportError, ValueError):
    """A run directory, width, client or model that cannot be exported (names which)."""


def _wtag(width: float) -> str:
    return f"{width:g}"


def _rel(staging: Path, p: str | Path) -> str:
    return Path(p).resolve().relative_to(staging.resolve()).as_posix()


class _Bundle:
    """Writes graphs into the staging dir and builds their manifest entries."""

    def __init__(self, staging: Path, opset: int, ort: bool) -> None:
        self.dir = staging
        self.opset = opset
        self.ort = ort

    def _ref(self, path: Path) -> tuple[str, str, FileRef | None]:
        ort = None
        if self.ort:
            (o,) = to_ort_format([path])
            ort = FileRef(_rel(self.dir, o), sha256_file(o))
        return _rel(self.dir, path), sha256_file(path), ort

    def graph(self, info: GraphInfo) -> FileEntry:
        rel, sha, ort = self._ref(Path(info.path))
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

    def step(self, info: TrainStepInfo, kind: str, key_prefix: str = "") -> FileEntry:
        rel, sha, ort = self._ref(Path(info.path))
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
def _check_out(out_dir: Path, overwrite: bool) -> None:
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


def _atomic(out_dir: Path, overwrite: bool, build) -> Path:
    """Run ``build(staging)`` in a temp dir next to ``out_dir``, then rename it into place."""
    out_dir = Path(out_dir).absolute()
    _check_out(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(out_dir)
    tag = f".{out_dir.name}.%s-{os.getpid()}-"
    staging = Path(tempfile.mkdtemp(prefix=tag % "tmp", dir=out_dir.parent))
    try:
        build(staging)
        os.chmod(staging, 0o755)
        if out_dir.exists():
            _check_out(out_dir, overwrite)
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


def _created() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _labels(task: str) -> tuple[str, ...]:
    from fmtl_lightning.tasks import get_task

    return tuple(get_task(task).output_names)


# ----------------------------------------------------------------------------- one model
def export_model(
    model: Any,
    task_kinds: Mapping[str, str],
    out_dir: str | Path,
    *,
    normalisation: Normalisation | Mapping[str, Any] | None = None,
    labels: Mapping[str, Sequence[str]] | None = None,
    client: str = "client",
    policy: RolePolicy | str = "fedper",
    opset: int = 18,
    ort: bool = False,
    overwrite: bool = False,
) -> Path:
    """Export one :class:`MultiTaskModel` (its width, its current weights) as a bundle.

    ``task_kinds``: task -> "multiclass"/"multilabel" for the model's heads to export
    (all must be heads of the model). ``labels`` default to the built-in task's
    output names (or ``"0".."n-1"``). ``normalisation`` defaults to mean 0, std 1 on
    the backbone's input shape. ``policy`` (the run's :class:`RolePolicy`) turns the
    model's declared kinds into roles: the client's ``shared_keys`` in the manifest
    are the keys its ModelSpec shares (e.g. FedBN keeps norm keys off the list).
    """
    from fmtl_lightning.models import head_name, model_spec, state_arrays

    heads = [k for k, v in model.declarations.items() if v[0] == "head"]
    if not heads or not model.task_outputs:
        raise RunExportError("the model's roles declare no head: nothing to deploy per task")
    if not task_kinds:
        raise RunExportError("task_kinds is empty: name at least one of the model's tasks")
    missing = [t for t in task_kinds if t not in model.task_outputs]
    if missing:
        raise RunExportError(
            f"tasks {missing} have no head; the model has {list(model.task_outputs)}"
        )
    cfg = model.cfg
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    if normalisation is None:
        norm = Normalisation(0.0, 1.0, shape, 1.0 / 255.0, "")
    elif isinstance(normalisation, Normalisation):
        norm = normalisation
    else:
        norm = Normalisation.from_dict(dict(normalisation), "normalisation")
    width = float(model.width)
    example_x = torch.zeros(1, *shape)
    feat = model.backbone.feature_dim
    spec = model_spec(cfg, model.task_outputs, policy)  # roles, declared by the model

    def label_of(t: str) -> tuple[str, ...]:
        if labels is not None and t in labels:
            if len(labels[t]) != model.task_outputs[t]:
                raise RunExportError(
                    f"labels[{t!r}]: {len(labels[t])} label(s) for a head with "
                    f"{model.task_outputs[t]} outputs"
                )
            return tuple(str(x) for x in labels[t])
        try:
            return _labels(t)
        except Exception:  # noqa: BLE001 - not a built-in task: numbered outputs
            return tuple(str(i) for i in range(model.task_outputs[t]))

    def build(staging: Path) -> None:
        b = _Bundle(staging, opset, ort)
        w = _wtag(width)
        bb = b.graph(
            export_backbone(model.backbone, staging / f"backbone_w{w}.onnx", example_x, opset)
        )
        ts = export_train_step(
            model, task_kinds, staging / f"train_step_w{w}_0.onnx", example_x, opset
        )
        step = TrainStepEntry(tuple(task_kinds), (client,), b.step(ts, "train_step"))
        head_entries = []
        for t, kind in task_kinds.items():
            h = head_name(t)
            mod = model.heads[h]
            tag = f"{sanitize(client)}_{sanitize(t)}"
            hi = export_head(mod, staging / f"head_{tag}.onnx", feat, opset)
            hs = export_head_step(mod, kind, staging / f"head_step_{tag}.onnx", feat, opset)
            head_entries.append(
                HeadEntry(client, t, kind, label_of(t), width, b.graph(hi),
                          b.step(hs, "head_step", f"heads.{h}."))
            )  # fmt: skip
        state = state_arrays(model)
        wts = b.weights(f"weights_{sanitize(client)}.npz", state)
        shared = tuple(k for k in state if spec.role(k) == "shared")
        m = Manifest(
            opset=opset,
            created=_created(),
            normalisation=norm,
            widths=(WidthEntry(width, feat, bb, (step,)),),
            heads=tuple(head_entries),
            clients=(
                ClientEntry(client, width, tuple(task_kinds), wts, norm, norm.domain, None, shared),
            ),
            algorithm="",
            source_run="",
            round=0,
        )
        write_manifest(staging, m)

    return _atomic(Path(out_dir), overwrite, build)


# ----------------------------------------------------------------------------- a run
def _check_run_dir(run_dir: Path) -> None:
    from fmtl_lightning.checkpoint import completed_rounds

    if not run_dir.is_dir():
        raise RunExportError(f"{run_dir} is not a run directory: it does not exist")
    missing = [n for n in ("config.yaml", "spec.json") if not (run_dir / n).is_file()]
    if not (run_dir / "checkpoints").is_dir():
        missing.append("checkpoints/")
    elif not completed_rounds(run_dir):
        missing.append("checkpoints/round_NNNN (no completed round)")
    if missing:
        raise RunExportError(
            f"{run_dir} is not a run directory (written by `fmtl simulate`): "
            f"missing {', '.join(missing)}"
        )


def _match_width(w: float, available: Sequence[float]) -> float | None:
    for a in available:
        if abs(a - w) < WIDTH_TOL:
            return a
    return None


def _read_run(run_dir: Path) -> RunArtifacts:
    from fmtl_lightning.run_artifacts import RunArtifacts, RunArtifactsError

    _check_run_dir(run_dir)
    try:
        return RunArtifacts(run_dir)
    except RunArtifactsError as exc:
        raise RunExportError(str(exc)) from exc


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    widths: Sequence[float] | None = None,
    clients: Sequence[str] | None = None,
    opset: int = 18,
    ort: bool = False,
    *,
    overwrite: bool = False,
) -> Path:
    """Export the last completed round of ``run_dir`` into ``out_dir``; returns ``out_dir``.

    ``widths`` default to every width the run used (clients' widths, plus
    ``algorithm.dynamic_widths`` under dynamic width assignment, unless part of the
    backbone is kept per client: then only clients' widths); ``clients`` to every
    client whose width is exported. A client's heads are exported at its own width.
    The run is read through :class:`~fmtl_lightning.run_artifacts.RunArtifacts`: no
    dataset is loaded (the normalisation and the static batch-norm statistics are
    in the run directory).
    """
    from fmtl_lightning.models import Backbone, head_name, load_arrays
    from fmtl_lightning.tasks import get_task

    run_dir = Path(run_dir)
    out_dir = Path(out_dir)
    _check_run_dir(run_dir)
    _check_out(out_dir.absolute(), overwrite)
    art = _read_run(run_dir)
    spec = art.spec
    if not spec.keys_of_kind("head"):
        raise RunExportError(f"{run_dir}: the model's roles declare no head; nothing to export")
    a = art.config.algorithm
    last = art.round
    run_clients = art.clients

    used = sorted({float(c.width) for c in run_clients}, reverse=True)
    if a.width_assignment == "dynamic" and a.dynamic_widths:
        used = sorted(set(used) | {float(w) for w in a.dynamic_widths}, reverse=True)
    # a width no client runs at has a backbone only if the server holds all of it (not with
    # per-client norms, static batch-norm statistics or local training): skip it by default
    per_client = [k for k in spec.local_keys() if spec[k].kind != "head"]
    has_client = {w: any(abs(c.width - w) < WIDTH_TOL for c in run_clients) for w in used}
    if widths is None:
        sel_w = [w for w in used if has_client[w] or not per_client]
    else:
        sel_w = []
        for w in widths:
            m = _match_width(float(w), used)
            if m is None:
                raise RunExportError(
                    f"width {w:g} was never used by the run {run_dir}; "
                    f"widths available: {', '.join(f'{u:g}' for u in used)}"
                )
            if per_client and not has_client[m]:
                raise RunExportError(
                    f"width {w:g}: no client runs at this width, and part of the backbone is "
                    f"kept per client (e.g. {per_client[0]!r}); export a client's width: "
                    + ", ".join(f"{u:g}" for u in used if has_client[u])
                )
            if m not in sel_w:
                sel_w.append(m)
    by_id = {c.client_id: c for c in run_clients}
    if clients is None:
        sel_c = [c for c in run_clients if _match_width(c.width, sel_w) is not None]
    else:
        sel_c = []
        for cid in clients:
            if cid not in by_id:
                raise RunExportError(
                    f"client {cid!r} is not in the run {run_dir}; clients: {', '.join(by_id)}"
                )
            c = by_id[cid]
            if _match_width(c.width, sel_w) is None:
                raise RunExportError(
                    f"client {cid!r} has width {c.width:g}, which is not among the exported "
                    f"widths {', '.join(f'{w:g}' for w in sel_w)}"
                )
            sel_c.append(c)

    size = art.image_size
    shape = (art.backbone.in_channels, size, size)
    example_x = torch.zeros(1, *shape)
    union_slices = art.layout.union_slices
    shared_keys = spec.shared_keys()

    def norm_of(cid: str) -> Normalisation:
        d = art.domain(cid)
        if d not in art.normalisation:
            raise RunExportError(
                f"{run_dir / 'normalisation.json'}: no normalisation of domain {d!r}"
            )
        mean, std = art.normalisation[d]
        return Normalisation(mean, std, shape, 1.0 / 255.0, d)

    def bb_arrays(state: Mapping[str, np.ndarray], backbone: nn.Module) -> dict[str, np.ndarray]:
        """The entries of ``state`` that the backbone module holds (the model's structure)."""
        own = (f"backbone.{k}" for k in backbone.state_dict())
        return {k.removeprefix("backbone."): state[k] for k in own if k in state}

    def build(staging: Path) -> None:
        b = _Bundle(staging, opset, ort)
        width_entries, head_entries, client_entries = [], [], []
        for w in sel_w:
            ws = art.width_spec(w)
            at_w = [c for c in run_clients if abs(c.width - w) < WIDTH_TOL]
            backbone = Backbone(art.backbone, w)
            shared_bb = bb_arrays(art.shared_state(ws), backbone)
            n_bb = len(backbone.state_dict())
            if len(shared_bb) < n_bb:  # not all shared (local, FedBN norms): first client's
                if not at_w:
                    raise RunExportError(
                        f"width {w:g}: the run shares no backbone and no client has this width"
                    )
                shared_bb = bb_arrays(art.client_state(at_w[0].client_id, ws), backbone)
            load_arrays(backbone, shared_bb)
            tag = _wtag(w)
            bb = b.graph(
                export_backbone(backbone, staging / f"backbone_w{tag}.onnx", example_x, opset)
            )
            steps = []
            if union_slices is None:  # FedAvg's union head has mixed-kind columns
                task_sets: dict[tuple[str, ...], list[str]] = {}
                for c in at_w:
                    task_sets.setdefault(tuple(c.tasks), []).append(c.client_id)
                for i, (tasks, cids) in enumerate(task_sets.items()):
                    model = art.model(cids[0], w)
                    kinds = {t: get_task(t).kind for t in tasks}
                    p = staging / f"train_step_w{tag}_{i}.onnx"
                    info = export_train_step(model, kinds, p, example_x, opset)
                    steps.append(TrainStepEntry(tasks, tuple(cids), b.step(info, "train_step")))
            width_entries.append(WidthEntry(w, backbone.feature_dim, bb, tuple(steps)))

            for c in [c for c in sel_c if abs(c.width - w) < WIDTH_TOL]:
                state = art.client_state(c.client_id, ws)
                model = art.model(c.client_id, w)
                load_arrays(model, state)
                feat = model.backbone.feature_dim
                cid = sanitize(c.client_id)
                own_bb = None
                mine = bb_arrays(state, model.backbone)
                if any(not np.array_equal(mine[k], shared_bb[k]) for k in shared_bb):
                    p = staging / f"backbone_{cid}_w{tag}.onnx"
                    own_bb = b.graph(export_backbone(model.backbone, p, example_x, opset))
                if union_slices is not None:
                    hp = staging / f"head_{cid}_union.onnx"
                    union = cast(nn.Linear, model.heads[head_name("union")])
                    union_entry = b.graph(export_head(union, hp, feat, opset))
                    for t in c.tasks:
                        s, e = union_slices[t]
                        task = get_task(t)
                        head_entries.append(
                            HeadEntry(c.client_id, t, task.kind, tuple(task.output_names), w,
                                      union_entry, None, (s, e))
                        )  # fmt: skip
                else:
                    for t in c.tasks:
                        task = get_task(t)
                        h = head_name(t)
                        mod = cast(nn.Linear, model.heads[h])
                        ht = f"{cid}_{sanitize(t)}"
                        hi = export_head(mod, staging / f"head_{ht}.onnx", feat, opset)
                        hs = export_head_step(
                            mod, task.kind, staging / f"head_step_{ht}.onnx", feat, opset
                        )
                        head_entries.append(
                            HeadEntry(c.client_id, t, task.kind, tuple(task.output_names), w,
                                      b.graph(hi), b.step(hs, "head_step", f"heads.{h}."))
                        )  # fmt: skip
                wts = b.weights(f"weights_{cid}.npz", state)
                n = norm_of(c.client_id)
                shared = tuple(k for k in shared_keys if k in state)
                client_entries.append(
                    ClientEntry(c.client_id, w, tuple(c.tasks), wts, n, n.domain, own_bb, shared)
                )
        top = norm_of((sel_c[0] if sel_c else run_clients[0]).client_id)
        m = Manifest(
            opset=opset,
            created=_created(),
            normalisation=top,
            widths=tuple(width_entries),
            heads=tuple(head_entries),
            clients=tuple(client_entries),
            algorithm=art.algorithm,
            source_run=str(run_dir.absolute()),
            round=last,
        )
        write_manifest(staging, m)

    return _atomic(out_dir, overwrite, build)


def parse_widths(text: str) -> list[float]:
    """``"1,0.5"`` -> ``[1.0, 0.5]`` (error names the bad item)."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            w = float(item)
        except ValueError:
            raise RunExportError(f"--widths: {item!r} is not a number") from None
        if not (0 < w <= 1) or not math.isfinite(w):
            raise RunExportError(f"--widths: {item!r} is outside (0, 1]")
        out.append(w)
    if not out:
        raise RunExportError("--widths: no width given")
    return out
