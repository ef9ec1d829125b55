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

Every ``.onnx`` file carries ``metadata_props`` (model family, width, tasks and their
kinds, normalisation, the manifest's format version, the graph's kind and, per client,
the client id: :func:`export.bundle.graph_metadata`), so a file describes itself
without the manifest.

The bundle is built in a temp dir next to ``out_dir`` and renamed into place, so
``out_dir`` is either complete or absent (:mod:`export.bundle` writes the files and
their manifest entries). The manifest schema lives in :mod:`mobile_client.manifest`
(the ground floor owns the wire formats).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from export.bundle import (
    BundleWriter,
    RunExportError,
    build_atomically,
    check_out_dir,
    created_stamp,
    graph_metadata,
    measure_memory,
    slicing_record,
    width_tag,
)
from export.graph_cache import GraphCache, quiet_export
from export.graphs import sanitize
from export.inference import export_backbone, export_head
from export.run_select import (
    WIDTH_TOL,
    check_run_dir,
    read_run,
    select_clients,
    select_widths,
)
from export.step_optimizer import PLAIN_SGD, step_optimizer
from export.trainstep import (
    check_exportable,
    export_head_step,
    export_model_step,
    export_train_step,
    task_kinds_of,
)
from mobile_client.manifest import Manifest, write_manifest
from mobile_client.manifest_entries import (
    ClientEntry,
    HeadEntry,
    Normalisation,
    TrainStepEntry,
    WidthEntry,
)

if TYPE_CHECKING:
    from fmtl_lightning.roles import RolePolicy
    from fmtl_lightning.tasks import Task


class MissingNormalisationWarning(UserWarning):
    """:func:`export_model` was given no normalisation: the bundle records a fallback."""


def _labels(task: str) -> tuple[str, ...]:
    from fmtl_lightning.tasks import get_task

    return tuple(get_task(task).output_names)


# ----------------------------------------------------------------------------- one model
def export_model(
    model: Any,
    task_kinds: Mapping[str, Task | str],
    out_dir: str | Path,
    *,
    normalisation: Normalisation | Mapping[str, Any] | None = None,
    labels: Mapping[str, Sequence[str]] | None = None,
    client: str = "client",
    policy: RolePolicy | str = "fedper",
    opset: int = 18,
    ort: bool = False,
    overwrite: bool = False,
    dropout: str = "refuse",
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Export one :class:`MultiTaskModel` (its width, its current weights) as a bundle.

    ``optimizer``: the one the model trains with; the step graphs take its momentum and
    weight decay (:func:`~export.step_optimizer.step_optimizer` refuses what they cannot
    express); None: plain SGD.

    ``task_kinds``: task -> its :class:`~fmtl_lightning.tasks.Task` (or its kind,
    "multiclass"/"multilabel") for the model's heads to export (all must be heads of the
    model). ``labels`` default to the Task's output names, else the registered task's
    (or ``"0".."n-1"``). ``normalisation`` should be the training data's; without one
    the bundle records mean 0, std 1 on the backbone's input shape and a
    :class:`MissingNormalisationWarning` says so. Every graph file carries
    ``metadata_props`` (:func:`~export.bundle.graph_metadata`). ``policy`` (the run's
    :class:`RolePolicy`) turns the model's declared kinds into roles: the client's
    ``shared_keys`` in the manifest are the keys its ModelSpec shares (e.g. FedBN keeps
    norm keys off the list). A model with dropout (p > 0) is refused, since the step
    graph cannot draw torch's random masks, unless ``dropout="off"``: its step graph then
    trains with every dropout's p at 0 (:func:`~export.trainstep.export_model_step`).
    """
    from fmtl_lightning.models import head_name, state_arrays

    heads = [k for k, v in model.declarations.items() if v[0] == "head"]
    if not heads or not model.task_outputs:
        raise RunExportError("the model's roles declare no head: nothing to deploy per task")
    if not task_kinds:
        raise RunExportError("task_kinds is empty: name at least one of the model's tasks")
    task_kinds, task_labels = task_kinds_of(task_kinds)
    missing = [t for t in task_kinds if t not in model.task_outputs]
    if missing:
        raise RunExportError(
            f"tasks {missing} have no head; the model has {list(model.task_outputs)}"
        )
    shape = tuple(model.input_shape)
    if normalisation is None:
        norm = Normalisation(0.0, 1.0, shape, 1.0 / 255.0, "")
        warnings.warn(
            "export_model: no normalisation given; the bundle records the fallback mean 0, "
            f"std 1 (scale 1/255, input shape {list(shape)}), so a device feeds pixels/255 "
            "unnormalised. Pass normalisation={'mean': ..., 'std': ..., 'input_shape': "
            "[...]} with the training data's values",
            MissingNormalisationWarning,
            stacklevel=2,
        )
    elif isinstance(normalisation, Normalisation):
        norm = normalisation
    else:
        norm = Normalisation.from_dict(dict(normalisation), "normalisation")
    width = float(model.width)
    example_x = torch.zeros(1, *shape)
    feat = model.feature_dim
    spec = model.role_spec(policy)  # roles, declared by the model
    opt = PLAIN_SGD if optimizer is None else step_optimizer(optimizer, f"client {client}")

    def label_of(t: str) -> tuple[str, ...]:
        if labels is not None and t in labels:
            if len(labels[t]) != model.task_outputs[t]:
                raise RunExportError(
                    f"labels[{t!r}]: {len(labels[t])} label(s) for a head with "
                    f"{model.task_outputs[t]} outputs"
                )
            return tuple(str(x) for x in labels[t])
        if t in task_labels:
            return task_labels[t]
        try:
            return _labels(t)
        except Exception:  # noqa: BLE001 - not a built-in task: numbered outputs
            return tuple(str(i) for i in range(model.task_outputs[t]))

    def build(staging: Path) -> None:
        b = BundleWriter(staging, opset, ort)
        w = width_tag(width)
        meta = graph_metadata(family=model.family, width=width, task_kinds=task_kinds,
                              norms=(norm,), client=client)  # fmt: skip
        bb = b.graph(
            export_backbone(model.backbone, staging / f"backbone_w{w}.onnx", example_x, opset),
            meta,
        )
        ts = export_model_step(
            model, task_kinds, staging / f"train_step_w{w}_0.onnx", example_x, opset, dropout, opt
        )
        step = TrainStepEntry(tuple(task_kinds), (client,), b.step(ts, "train_step", meta=meta))
        head_entries = []
        for t, kind in task_kinds.items():
            h = head_name(t)
            mod = model.heads[h]
            tag = f"{sanitize(client)}_{sanitize(t)}"
            hi = export_head(mod, staging / f"head_{tag}.onnx", feat, opset)
            hs = export_head_step(mod, kind, staging / f"head_step_{tag}.onnx", feat, opset, opt)
            hm = graph_metadata(family=model.family, width=width, task_kinds={t: kind},
                                norms=(norm,), client=client)  # fmt: skip
            head_entries.append(
                HeadEntry(client, t, kind, label_of(t), width, b.graph(hi, hm),
                          b.step(hs, "head_step", f"heads.{h}.", hm))
            )  # fmt: skip
        state = state_arrays(model)
        wts = b.weights(f"weights_{sanitize(client)}.npz", state)
        shared = tuple(k for k in state if spec.role(k) == "shared")
        m = Manifest(
            opset=opset,
            created=created_stamp(),
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
        write_manifest(staging, measure_memory(staging, m))

    return build_atomically(Path(out_dir), overwrite, build)


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    widths: Sequence[float] | None = None,
    clients: Sequence[str] | None = None,
    opset: int = 18,
    ort: bool = False,
    *,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    dedup: bool = True,
) -> Path:
    """Export the last completed round of ``run_dir`` into ``out_dir``; returns ``out_dir``.

    ``widths`` default to every width the run used (clients' widths, plus
    ``algorithm.dynamic_widths`` under dynamic width assignment, unless part of the
    backbone is kept per client: then only clients' widths); ``clients`` to every
    client whose width is exported. A client's heads are exported at its own width.
    The run is read through :class:`~fmtl_lightning.run_artifacts.RunArtifacts`: no
    dataset is loaded (the normalisation and the static batch-norm statistics are
    in the run directory). Heads and head steps that are the same graph for several
    clients are exported once (:class:`~export.graph_cache.GraphCache`; ``dedup=False``
    exports each on its own: the same files, slower). ``progress`` gets one line per
    graph file; torch.onnx's known-harmless warnings are silenced
    (:func:`~export.graph_cache.quiet_export`).
    """
    from fmtl_lightning.models import Backbone, head_name, load_arrays
    from fmtl_lightning.tasks import get_task

    run_dir = Path(run_dir)
    out_dir = Path(out_dir)
    check_run_dir(run_dir)
    check_out_dir(out_dir.absolute(), overwrite)
    art = read_run(run_dir)
    if art.config.model.factory is not None:
        raise RunExportError(
            f"{run_dir}: its model is model.factory {art.config.model.factory!r}, a model of "
            "your own: export its clients with Simulation.export_client (see the README)"
        )
    o = art.config.optimizer  # the step graphs take the run's SGD, momentum and decay
    sgd = torch.optim.SGD([torch.zeros(1)], lr=o.lr, momentum=o.momentum,
                          weight_decay=o.weight_decay)  # fmt: skip
    opt = step_optimizer(sgd, f"run {run_dir}")
    spec = art.spec
    if not spec.keys_of_kind("head"):
        raise RunExportError(f"{run_dir}: the model's roles declare no head; nothing to export")
    last = art.round
    run_clients = art.clients

    sel_w = select_widths(art, run_dir, widths)
    sel_c = select_clients(art, run_dir, sel_w, clients)

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

    family = art.backbone.family

    def meta_of(w: float, cs: Sequence[Any], tasks: Sequence[str], client: str | None = None):
        """The graph metadata of a graph at width ``w`` used by clients ``cs``."""
        norms = {n.domain: n for n in (norm_of(c.client_id) for c in cs)}
        kinds = {t: get_task(t).kind for t in tasks}
        return graph_metadata(family=family, width=w, task_kinds=kinds,
                              norms=norms.values(), client=client)  # fmt: skip

    for c in run_clients:
        for t in c.tasks:
            check_exportable(get_task(t))

    def build(staging: Path) -> None:
        with quiet_export(), GraphCache(opset, progress, dedup, opt) as cache:
            _build(staging, cache)

    def _build(staging: Path, cache: GraphCache) -> None:
        b = BundleWriter(staging, opset, ort)
        width_entries, head_entries, client_entries = [], [], []
        for w in sel_w:
            ws = art.width_spec(w)
            at_w = [c for c in run_clients if abs(c.width - w) < WIDTH_TOL]
            users = at_w or [sel_c[0] if sel_c else run_clients[0]]
            w_tasks = list(dict.fromkeys(t for c in users for t in c.tasks))
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
            tag = width_tag(w)
            p = staging / f"backbone_w{tag}.onnx"
            bb = b.graph(export_backbone(backbone, p, example_x, opset), meta_of(w, users, w_tasks))
            cache.note(p, "exported")
            steps = []
            if union_slices is None:  # FedAvg's union head has mixed-kind columns
                task_sets: dict[tuple[str, ...], list[str]] = {}
                for c in at_w:
                    task_sets.setdefault(tuple(c.tasks), []).append(c.client_id)
                for i, (tasks, cids) in enumerate(task_sets.items()):
                    model = art.model(cids[0], w)
                    kinds = {t: get_task(t).kind for t in tasks}
                    p = staging / f"train_step_w{tag}_{i}.onnx"
                    info = export_train_step(model, kinds, p, example_x, opset, opt)
                    cache.note(p, "exported")
                    sm = meta_of(w, [c for c in at_w if c.client_id in cids], tasks)
                    steps.append(
                        TrainStepEntry(tasks, tuple(cids), b.step(info, "train_step", meta=sm))
                    )
            width_entries.append(WidthEntry(w, backbone.feature_dim, bb, tuple(steps)))

            for c in [c for c in sel_c if abs(c.width - w) < WIDTH_TOL]:
                state = art.client_state(c.client_id, ws)
                model = art.model(c.client_id, w)
                load_arrays(model, state)
                feat = model.backbone.feature_dim
                cid = sanitize(c.client_id)
                own_bb = None
                mine = bb_arrays(state, model.backbone)
                cm = meta_of(w, [c], c.tasks, c.client_id)
                if any(not np.array_equal(mine[k], shared_bb[k]) for k in shared_bb):
                    p = staging / f"backbone_{cid}_w{tag}.onnx"
                    own_bb = b.graph(export_backbone(model.backbone, p, example_x, opset), cm)
                    cache.note(p, "exported")
                if union_slices is not None:
                    hp = staging / f"head_{cid}_union.onnx"
                    union = cast(nn.Linear, model.heads[head_name("union")])
                    union_entry = b.graph(cache.head(union, hp, feat), cm)
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
                        hi = cache.head(mod, staging / f"head_{ht}.onnx", feat)
                        hs = cache.head_step(mod, task.kind, staging / f"head_step_{ht}.onnx", feat)
                        hm = meta_of(w, [c], [t], c.client_id)
                        head_entries.append(
                            HeadEntry(c.client_id, t, task.kind, tuple(task.output_names), w,
                                      b.graph(hi, hm), b.step(hs, "head_step", f"heads.{h}.", hm))
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
            created=created_stamp(),
            normalisation=top,
            widths=tuple(width_entries),
            heads=tuple(head_entries),
            clients=tuple(client_entries),
            algorithm=art.algorithm,
            source_run=str(run_dir.absolute()),
            round=last,
            slicing=slicing_record(spec, art.config.algorithm.slicing, shared_keys),
        )
        write_manifest(staging, m)
        write_manifest(staging, measure_memory(staging, m))
        if progress is not None:
            progress(f"{cache.exported} graphs exported, {cache.reused} written from an "
                     "earlier export of the same graph; memory measured per width")  # fmt: skip

    return build_atomically(out_dir, overwrite, build)
