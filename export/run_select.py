"""Reading a run directory for export, and choosing the widths and clients to export.

:func:`read_run` checks that ``run_dir`` is a run directory written by ``fmtl simulate``
(config, spec, a completed round) and reads it through
:class:`~fmtl_lightning.run_artifacts.RunArtifacts`; :func:`select_widths` and
:func:`select_clients` resolve the ``widths`` / ``clients`` a caller asks for (default:
all that can be exported), each refusal a :class:`~export.bundle.RunExportError`
naming the width or client and what is available.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from export.bundle import RunExportError

if TYPE_CHECKING:
    from fmtl_lightning.engine.plan import PlannedClient
    from fmtl_lightning.run_artifacts import RunArtifacts

WIDTH_TOL = 1e-9


def check_run_dir(run_dir: Path) -> None:
    """``run_dir`` holds ``config.yaml``, ``spec.json`` and a completed round."""
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


def match_width(w: float, available: Sequence[float]) -> float | None:
    """The width of ``available`` equal to ``w`` (within :data:`WIDTH_TOL`), or None."""
    for a in available:
        if abs(a - w) < WIDTH_TOL:
            return a
    return None


def read_run(run_dir: Path) -> RunArtifacts:
    """The last completed round of ``run_dir``; a bad run raises :class:`RunExportError`."""
    from fmtl_lightning.run_artifacts import RunArtifacts, RunArtifactsError

    check_run_dir(run_dir)
    try:
        return RunArtifacts(run_dir)
    except RunArtifactsError as exc:
        raise RunExportError(str(exc)) from exc


def select_widths(art: RunArtifacts, run_dir: Path, widths: Sequence[float] | None) -> list[float]:
    """The run's widths to export: ``widths`` matched to those the run used, or by default
    every used width (clients' widths, plus ``algorithm.dynamic_widths`` under dynamic
    width assignment, unless part of the backbone is kept per client: then only
    clients' widths)."""
    spec = art.spec
    a = art.config.algorithm
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
            m = match_width(float(w), used)
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
    return sel_w


def select_clients(
    art: RunArtifacts, run_dir: Path, sel_w: Sequence[float], clients: Sequence[str] | None
) -> list[PlannedClient]:
    """The run's clients to export: ``clients`` (each at one of the widths ``sel_w``), or
    by default every client whose width is exported."""
    run_clients = art.clients
    by_id = {c.client_id: c for c in run_clients}
    if clients is None:
        sel_c = [c for c in run_clients if match_width(c.width, sel_w) is not None]
    else:
        sel_c = []
        for cid in clients:
            if cid not in by_id:
                raise RunExportError(
                    f"client {cid!r} is not in the run {run_dir}; clients: {', '.join(by_id)}"
                )
            c = by_id[cid]
            if match_width(c.width, sel_w) is None:
                raise RunExportError(
                    f"client {cid!r} has width {c.width:g}, which is not among the exported "
                    f"widths {', '.join(f'{w:g}' for w in sel_w)}"
                )
            sel_c.append(c)
    return sel_c
