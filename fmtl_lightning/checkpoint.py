"""Round checkpoints of a run directory: safetensors only, written atomically.

Layout::

    RUN/checkpoints/round_0003/
        global.safetensors          server state (shared keys, full width)
        clients/<cid>.safetensors   each client's local state (heads, personal model)
        metrics.csv                 that round's per-client, per-task rows
        meta.json                   round number, spec hash, wall times

A round directory is built under a temporary name and renamed into place, so a
run killed at any moment leaves only complete rounds behind. A global state with a
NaN/Inf value is refused before anything is written: a run must be able to resume
from every checkpoint it leaves.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fmtl_lightning.errors import FMTLError
from fmtl_lightning.validation import all_finite

ROUND_RE = re.compile(r"^round_(\d{4,})$")


class CheckpointError(FMTLError):
    """A checkpoint directory or file is missing or malformed; the message names it."""


def round_dir(run_dir: Path, round_idx: int) -> Path:
    return run_dir / "checkpoints" / f"round_{round_idx:04d}"


def completed_rounds(run_dir: Path) -> list[int]:
    ck = run_dir / "checkpoints"
    if not ck.is_dir():
        return []
    return sorted(int(m.group(1)) for p in ck.iterdir() if (m := ROUND_RE.match(p.name)))


def write_round(
    run_dir: Path,
    round_idx: int,
    global_state: Mapping[str, np.ndarray],
    client_states: Mapping[str, Mapping[str, np.ndarray]],
    meta: Mapping[str, Any],
    metrics_csv: str,
) -> Path:
    """Write one round atomically; returns the final directory.

    Raises :class:`CheckpointError` naming the key, and writes nothing, when a float
    entry of ``global_state`` holds a NaN/Inf.
    """
    for k, v in global_state.items():
        a = np.asarray(v)
        if a.dtype.kind == "f" and not all_finite(a):
            raise CheckpointError(
                f"round {round_idx}: global key {k!r} holds non-finite values; not written"
            )
    final = round_dir(run_dir, round_idx)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        save_file(_contig(global_state), str(tmp / "global.safetensors"), {"round": str(round_idx)})
        (tmp / "clients").mkdir()
        for cid, st in client_states.items():
            if st:
                save_file(_contig(st), str(tmp / "clients" / f"{cid}.safetensors"))
        (tmp / "metrics.csv").write_text(metrics_csv)
        (tmp / "meta.json").write_text(json.dumps(dict(meta), indent=1))
        if final.exists():  # a resumed run re-doing a round it had finished: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _contig(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v) if v.ndim else v.copy() for k, v in state.items()}


def _load(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(str(path))
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing") from exc
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt: {exc}") from exc


def read_round(run_dir: Path, round_idx: int) -> tuple[dict, dict[str, dict], dict, str]:
    """(global_state, {cid: local_state}, meta, metrics_csv) of a completed round."""
    d = round_dir(run_dir, round_idx)
    if not d.is_dir():
        raise CheckpointError(f"no checkpoint for round {round_idx} in {str(d)!r}")
    g = _load(d / "global.safetensors")
    clients = {p.stem: _load(p) for p in sorted((d / "clients").glob("*.safetensors"))}
    try:
        meta = json.loads((d / "meta.json").read_text())
        metrics = (d / "metrics.csv").read_text()
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {str(d)!r} is incomplete: {exc}") from exc
    return g, clients, meta, metrics
