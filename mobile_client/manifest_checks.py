"""Cross-reference checks of a parsed manifest: every name one entry gives another
resolves (clients, widths, heads, state-dict keys, graph input/output names).

Each record in :mod:`mobile_client.manifest_entries` validates its own fields;
:func:`check_references` runs once the whole :class:`~mobile_client.manifest.Manifest`
is built, and :func:`check_graph_names` again when a device loads a graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mobile_client.errors import ManifestError
from mobile_client.manifest_entries import TASK_KINDS, ClientEntry, FileEntry

if TYPE_CHECKING:
    from mobile_client.manifest import Manifest


def check_references(m: Manifest) -> None:
    """Every name one entry gives another resolves: clients, widths, heads, keys.

    A client's ``shared_keys`` and every state-dict key a graph of that client
    reads or writes (``weights`` / ``weight_outputs``) must be a key of the
    client's weights file; each client task has a head; each head has one label
    per output column. Raises :class:`ManifestError` naming the field and the key.
    """
    if m.round < 0:
        raise ManifestError(f"manifest field 'round' must be >= 0, got {m.round}")
    widths = [w.width for w in m.widths]
    if not widths:
        raise ManifestError("manifest field 'widths' names no width")
    if len({round(w, 9) for w in widths}) != len(widths):
        raise ManifestError(f"manifest field 'widths' repeats a width: {widths}")
    ids = [c.client for c in m.clients]
    if len(set(ids)) != len(ids):
        raise ManifestError(f"manifest field 'clients' repeats a client id: {ids}")

    def has_width(w: float) -> bool:
        return any(abs(w - x) < 1e-9 for x in widths)

    for i, h in enumerate(m.heads):
        where = f"heads[{i}]"
        if m.clients and h.client not in ids:
            raise ManifestError(f"manifest field '{where}.client': {h.client!r} is not a client")
        if not has_width(h.width):
            raise ManifestError(f"manifest field '{where}.width': {h.width:g} is not in 'widths'")
        outs = h.file.outputs[0].shape if h.file.outputs else ()
        n = outs[-1] if outs and isinstance(outs[-1], int) else None
        if h.columns is not None:
            if n is not None and h.columns[1] > n:
                raise ManifestError(
                    f"manifest field '{where}.columns': {list(h.columns)} exceeds the "
                    f"head's {n} outputs"
                )
            n = h.columns[1] - h.columns[0]
        if not h.labels or (n is not None and len(h.labels) != n):
            raise ManifestError(
                f"manifest field '{where}.labels': {len(h.labels)} label(s) for a head "
                f"with {n if n is not None else 'at least one'} output(s)"
            )
    for i, c in enumerate(m.clients):
        _check_client(m, c, f"clients[{i}]")
    for i, w in enumerate(m.widths):
        if w.memory is not None and not any(
            c.client == w.memory.client and abs(c.width - w.width) < 1e-9 for c in m.clients
        ):
            raise ManifestError(f"manifest field 'widths[{i}].memory.client': "
                                f"{w.memory.client!r} is not a client at width {w.width:g}")  # fmt: skip
    for f, where in m.graph_entries():
        ins = {t.name for t in f.inputs} if f.inputs else None  # None: not listed
        check_graph_names(f, ins, {t.name for t in f.outputs} if f.outputs else None, where)


def _check_client(m: Manifest, c: ClientEntry, where: str) -> None:
    """One client's cross-references: width, keys, heads, input shape, step targets."""
    if not any(abs(c.width - w.width) < 1e-9 for w in m.widths):
        raise ManifestError(f"manifest field '{where}.width': {c.width:g} is not in 'widths'")
    keys = set(c.weights.weights.values())
    if not keys:
        raise ManifestError(f"manifest field '{where}.weights.weights' names no key")
    src = c.weights.path

    def need(names, field: str) -> None:
        for k in names:
            if k not in keys:
                raise ManifestError(
                    f"manifest field {field!r} names key {k!r}, which is not in the "
                    f"client's weights {src!r}"
                )

    need(c.shared_keys, f"{where}.shared_keys")
    if m.slicing is not None:  # the server's state, cut to this width, fits the weights
        shapes = {t.name: tuple(t.shape) for t in c.weights.outputs}
        for k in c.shared_keys:
            if k not in m.slicing.keys:
                raise ManifestError(f"manifest field 'slicing.keys' lacks shared key {k!r} "
                                    f"of {where}")  # fmt: skip
            want = m.slicing.shape_at(k, c.width)
            if k in shapes and shapes[k] != want:
                raise ManifestError(
                    f"manifest field 'slicing.keys.{k}' cuts to {list(want)} at width "
                    f"{c.width:g}, but {where}'s weights hold {list(shapes[k])}"
                )
    heads = {h.task: (i, h) for i, h in enumerate(m.heads) if h.client == c.client}
    for t in c.tasks:
        if t not in heads:
            raise ManifestError(f"manifest field '{where}.tasks': task {t!r} has no head")
    for i, h in heads.values():
        for f, name in ((h.file, "file"), (h.head_step, "head_step")):
            if f is not None:
                need(f.weights.values(), f"heads[{i}].{name}.weights")
                need(f.weight_outputs.values(), f"heads[{i}].{name}.weight_outputs")
    if c.backbone is not None:
        need(c.backbone.weights.values(), f"{where}.backbone.weights")
    wi = next(i for i, w in enumerate(m.widths) if abs(c.width - w.width) < 1e-9)
    bb, bb_where = (
        (c.backbone, f"{where}.backbone")
        if c.backbone is not None
        else (m.widths[wi].backbone, f"widths[{wi}].backbone")
    )
    xin = bb.x_input or (bb.inputs[0].name if bb.inputs else None)
    spec = next((t for t in bb.inputs if t.name == xin), None)
    shape = list(c.normalisation.input_shape)
    if spec is not None and all(isinstance(s, int) for s in spec.shape[1:]):
        if list(spec.shape[1:]) != shape:
            raise ManifestError(
                f"manifest field '{where}.normalisation.input_shape' is {shape}, but "
                f"{bb_where} ({bb.path!r}) input {xin!r} has shape {list(spec.shape)}"
            )
    for i, w in enumerate(m.widths):
        if abs(w.width - c.width) >= 1e-9:
            continue
        for j, step in enumerate(w.train_steps):
            if c.client in step.clients or set(step.tasks) == set(c.tasks):
                at = f"widths[{i}].train_steps[{j}].file"
                need(step.file.weights.values(), f"{at}.weights")
                need(step.file.weight_outputs.values(), f"{at}.weight_outputs")
                _need_momenta(step.file, at)
                _need_targets(step.file, tuple(step.file.task_kinds), at)
    for i, h in heads.values():
        if h.head_step is not None:
            _need_targets(h.head_step, ("task",), f"heads[{i}].head_step")
            _need_momenta(h.head_step, f"heads[{i}].head_step")


def check_graph_names(
    f: FileEntry, inputs: set[str] | None, outputs: set[str] | None, where: str
) -> None:
    """Every graph input/output name ``f`` gives is in ``inputs`` / ``outputs`` (those the
    manifest lists, or the loaded graph's; None: unknown, not checked); a
    :class:`ManifestError` names the field."""
    named_in: list[tuple[str, str | None]] = [(f"weights.{n}", n) for n in f.weights]
    named_in += [(k, getattr(f, k)) for k in ("x_input", "features_input", "lr_input")]
    named_in += [(f"target_inputs.{t}", n) for t, n in f.target_inputs.items()]
    named_in += [(f"momentum_inputs.{n}", n) for n in f.momentum_inputs]
    named_out: list[tuple[str, str | None]] = [(f"weight_outputs.{n}", n) for n in f.weight_outputs]
    named_out += [(f"momentum_outputs.{n}", n) for n in f.momentum_outputs]
    named_out.append(("loss_output", f.loss_output))
    for side, named, have in (("input", named_in, inputs), ("output", named_out, outputs)):
        for fld, name in named:
            if have is not None and name is not None and name not in have:
                raise ManifestError(
                    f"manifest field '{where}.{fld}' names graph {side} {name!r}, which "
                    f"{f.path!r} does not have ({side}s: {', '.join(sorted(have or ())) or 'none'})"
                )


def _need_momenta(f: FileEntry, where: str) -> None:
    """A step with momentum has one buffer per parameter it steps, in and out, keyed by
    parameter keys of the graph's ``weights``."""
    keys = set(f.weights.values())
    for fld in ("momentum_inputs", "momentum_outputs"):
        for n, k in getattr(f, fld).items():
            if k not in keys:
                raise ManifestError(f"manifest field '{where}.{fld}.{n}' names key {k!r}, "
                                    "which is not one of the graph's weights")  # fmt: skip
    if sorted(f.momentum_inputs.values()) != sorted(f.momentum_outputs.values()):
        raise ManifestError(f"manifest field '{where}.momentum_outputs' must give back the "
                            "keys of 'momentum_inputs'")  # fmt: skip
    if bool(f.momentum_inputs) != bool(f.optimizer.get("momentum", 0)):
        raise ManifestError(f"manifest field '{where}.momentum_inputs' must be given exactly "
                            "when 'optimizer.momentum' is not 0")  # fmt: skip


def _need_targets(f: FileEntry, tasks: tuple[str, ...], where: str) -> None:
    """A training-step graph names a target input for each task it trains."""
    if not tasks:
        raise ManifestError(f"manifest field '{where}.task_kinds' names no task")
    for t in tasks:
        if t not in f.target_inputs:
            raise ManifestError(f"manifest field '{where}.target_inputs' has no entry {t!r}")
    for t, kind in f.task_kinds.items():
        if kind not in TASK_KINDS:
            raise ManifestError(
                f"manifest field '{where}.task_kinds.{t}' has unknown value {kind!r}"
            )
