"""Golden outputs of the pairwise-covering configs: prove a refactor changed no result.

    python -m tests.matrix.golden before.json          # on the old commit
    python -m tests.matrix.golden after.json           # on the new one
    python -m tests.matrix.golden --compare before.json after.json

Each config of :data:`tests.matrix.test_combination_matrix.COMBOS` (every accepted pair of
factor values) runs 2 rounds (+ its local baseline); the file records hashes of the final
global state, every client's state and ``metrics.csv``, and the summary's mean accuracy.
``--compare`` lists the configs whose outputs differ (exit 1 if any). A few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def state_hash(arrays: dict[str, np.ndarray]) -> str:
    m = hashlib.sha256()
    for k in sorted(arrays):
        v = np.ascontiguousarray(arrays[k])
        m.update(f"{k}|{v.dtype}|{v.shape}".encode())
        m.update(v.tobytes())
    return m.hexdigest()[:16]


def run_all() -> dict[str, Any]:
    from fmtl_lightning.checkpoint import completed_rounds, read_round
    from fmtl_lightning.config import parse_config
    from fmtl_lightning.simulation import run_config
    from tests.matrix.combos import config_of
    from tests.matrix.test_combination_matrix import COMBOS

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, combo in enumerate(COMBOS):
            run = Path(tmp) / f"c{i}"
            run_config(parse_config(config_of(combo)), run, progress=False)
            res: dict[str, Any] = {"combo": {k: str(v) for k, v in combo.items()}}
            for name, sub in (("run", run), ("local_baseline", run / "local_baseline")):
                if not (sub / "checkpoints").is_dir():
                    continue
                g, clients, _, _ = read_round(sub, completed_rounds(sub)[-1])
                res[name] = {
                    "global": state_hash(g),
                    "clients": {cid: state_hash(st) for cid, st in sorted(clients.items())},
                    "metrics": hashlib.sha256((sub / "metrics.csv").read_bytes()).hexdigest()[:16],
                    "mean_acc": json.loads((sub / "summary.json").read_text())["mean_acc"],
                }
            out[str(i)] = res
            print(f"{i + 1}/{len(COMBOS)}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--compare", action="store_true", help="compare two golden files")
    a = ap.parse_args(argv)
    if a.compare:
        old, new = (json.loads(p.read_text()) for p in a.files[:2])
        diff = sorted(set(old) ^ set(new)) + [k for k in old if k in new and old[k] != new[k]]
        for k in diff:
            print(f"config {k} differs: {old.get(k, {}).get('combo') or new[k]['combo']}")
        print(f"{len(old) - len(diff)}/{len(old)} configs identical")
        return 1 if diff else 0
    a.files[0].write_text(json.dumps(run_all(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
