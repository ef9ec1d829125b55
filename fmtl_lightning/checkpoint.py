"""Round checkpoints of a run directory: safetensors only, written atomically.

Layout::

    RUN/checkpoints/round_0003/
        global.safetensors          server state (shared keys, full width)
        clients/<cid>.safetensors   each client's local state (heads, personal model)
        metrics.csv                 that round's per-client, per-task rows
        meta.json                   round number, spec hash, wall times
    RUN/checkpoints/history.jsonl   one line per round (metric rows, wall times): the
                                    run's history, which survives pruning

A round directory is built under a temporary name and renamed into place, so a
run killed at any moment leaves only complete rounds behind. A global state with a
NaN/Inf value is refused before anything is written: a run must be able to resume
from every checkpoint it leaves. Retention
(:func:`rounds_to_keep`, :func:`prune_rounds`) deletes old rounds only after the
new one is in place, renaming each to a hidden name first, so a kill mid-delete
never leaves a half round that looks complete; the last complete round, which
resume needs, is always kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fmtl_lightning.errors import FMTLError
from fmtl_lightning.validation import all_finite

ROUND_RE = re.compile(r"^round_(\d{4,})$")
HISTORY_FILE = "history.jsonl"
_TRASH = ".trash."  # prefix of a round dir being deleted
# hidden dirs of an interrupted write_round (".round_0003.xyz") or prune (".trash.round_0003.xyz")
_LEFTOVER_RE = re.compile(r"^\.(trash\.)?round_\d{4,}\.")


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
    *,
    carried: Sequence[str] = (),
    previous: int | None = None,
) -> Path:
    """Write one round atomically; returns the final directory.

    ``carried``: clients whose arrays are unchanged since round ``previous``'s checkpoint:
    their files are hard-linked from it (copied where links are not possible), so a round
    costs the clients that changed, not all of them. Raises :class:`CheckpointError`
    naming the key, and writes nothing, when a float entry of ``global_state`` holds a
    NaN/Inf, or a carried client has no file in round ``previous``.
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
        if carried:
            _carry(run_dir, previous, carried, tmp / "clients")
        (tmp / "metrics.csv").write_text(metrics_csv)
        (tmp / "meta.json").write_text(json.dumps(dict(meta), indent=1))
        if final.exists():  # a resumed run re-doing a round it had finished: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _carry(run_dir: Path, previous: int | None, cids: Sequence[str], dest: Path) -> None:
    """Link (or copy) the files of ``cids`` from round ``previous`` into ``dest``; a client
    that had no arrays has no file there and gets none."""
    src = round_dir(run_dir, previous) / "clients" if previous else None
    if src is None or not src.is_dir():
        raise CheckpointError(f"clients {list(cids)[:3]}... carry over from round {previous}, "
                              "which has no checkpoint")  # fmt: skip
    for cid in cids:
        f = src / f"{cid}.safetensors"
        if not f.exists():
            continue
        try:
            os.link(f, dest / f.name)
        except OSError:
            shutil.copy2(f, dest / f.name)


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


# ---------------------------------------------------------------------- retention
def rounds_to_keep(current: int, keep_last: int, keep_every: int) -> set[int]:
    """Rounds kept once round ``current`` is complete.

    The last ``keep_last`` rounds (>= 1: resume needs the last one, which at the end
    of a run is the final state) and, if ``keep_every`` is N > 0, every N-th round
    (N = 1 keeps every round).
    """
    keep = set(range(max(1, current - max(keep_last, 1) + 1), current + 1))
    if keep_every > 0:
        keep.update(range(keep_every, current + 1, keep_every))
    return keep


def prune_rounds(parent: Path, keep: set[int]) -> list[int]:
    """Delete the ``round_NNNN`` dirs under ``parent`` whose round is not in ``keep``.

    Also removes what an interrupted write or delete left behind (hidden temporary
    dirs). Call it only after the newest round is in place. Returns the rounds deleted.
    """
    if not parent.is_dir():
        return []
    dropped = []
    for p in sorted(parent.iterdir()):
        m = ROUND_RE.match(p.name)
        if m and int(m.group(1)) not in keep and p.is_dir():
            trash = Path(tempfile.mkdtemp(prefix=f"{_TRASH}{p.name}.", dir=parent))
            os.replace(p, trash / p.name)  # atomic: the round is gone as a whole
            dropped.append(int(m.group(1)))
    for p in parent.iterdir():
        if p.is_dir() and _LEFTOVER_RE.match(p.name):
            shutil.rmtree(p, ignore_errors=True)
    return dropped


# ---------------------------------------------------------------------- history journal
def _history_path(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / HISTORY_FILE


def append_history(run_dir: Path, record: Mapping[str, Any], *, fresh: bool = False) -> None:
    """Append one round's record (a JSON object with an integer ``round``) to the journal.

    ``fresh`` starts a new journal (a run's first round). Write it before the round's
    checkpoint: records of rounds later than the last complete one are ignored on read.
    A line cut short by a kill is dropped before appending.
    """
    path = _history_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(dict(record), separators=(",", ":")) + "\n"  # NaN loss round-trips
    if fresh:
        path.unlink(missing_ok=True)
    elif path.is_file() and path.stat().st_size:
        with open(path, "rb+") as fh:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":  # torn last line: cut back to the last full one
                fh.seek(0)
                data = fh.read()
                fh.truncate(data.rfind(b"\n") + 1)
    with open(path, "a") as fh:
        fh.write(line)


def read_history(run_dir: Path, upto: int) -> list[dict[str, Any]]:
    """The journal's records of rounds 1..``upto`` in order (the newest record of a round wins).

    Raises :class:`CheckpointError` naming the file if a line is corrupt or a round is missing.
    """
    path = _history_path(run_dir)
    records: dict[int, dict[str, Any]] = {}
    text = path.read_text() if path.is_file() else ""
    for i, line in enumerate(text.splitlines(keepends=True), 1):
        if not line.endswith("\n"):
            break  # cut short by a kill: that round never completed
        try:
            rec = json.loads(line)
            r = int(rec["round"])
        except (ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(f"{str(path)!r} line {i} is corrupt: {exc}") from exc
        if 1 <= r <= upto:
            records[r] = rec
    missing = [r for r in range(1, upto + 1) if r not in records]
    if missing:
        raise CheckpointError(
            f"{str(path)!r} has no record of round(s) {missing[:5]}; cannot resume the history"
        )
    return [records[r] for r in range(1, upto + 1)]
