"""Measuring what a bundle's model needs in memory on top of the edge runtime.

``python -m mobile_client.memory DIR CLIENT`` runs in a fresh process (``fmtl export``
starts one per width and records the result in the manifest's ``widths[i].memory``;
a device can run it too). What it measures, from Linux's ``/proc/self/status``
(``VmRSS``: resident set size now; ``VmHWM``: its peak, which the probe resets to the
current RSS through ``/proc/self/clear_refs`` once the runtime is loaded):

* ``runtime_bytes``: RSS once Python, numpy, onnxruntime and ``mobile_client`` are
  imported and the manifest is loaded (nothing of the model yet);
* ``predict_bytes``: the peak RSS above that while the client's backbone and head
  sessions are created and predict one example;
* ``train_bytes``: the peak RSS above it (from the same start) once, in addition, one
  training step at batch :data:`TRAIN_BATCH` has run on the full step graph (zeros as
  inputs and targets), with its weights loaded (``null`` when the bundle has no step
  graph for the client, e.g. FedAvg's union head).

Elsewhere (no ``/proc``) ``resource.getrusage``'s ``ru_maxrss`` stands in for the peak.
Sessions use one intra-op thread (onnxruntime's thread pools add per-thread stacks).
The figures are of this machine's onnxruntime build; ORT Mobile on a phone differs.
"""

from __future__ import annotations

import json
import resource
import sys
from typing import Any

TRAIN_BATCH = 32


def _status_bytes(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of ``/proc/self/status`` in bytes (None without /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _peak_bytes() -> int:
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(kb * (1 if sys.platform == "darwin" else 1024))


def _reset_peak() -> int:
    """Reset the peak to the current RSS where the kernel allows it; returns the RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_bytes("VmRSS") or _peak_bytes()


def measure(bundle: str, client_id: str) -> dict[str, Any]:
    """The figures of the module docstring for ``client_id`` of ``bundle``."""
    import numpy as np
    import onnxruntime  # noqa: F401 - part of the runtime, before the baseline

    from mobile_client.runtime import EdgeClient

    ec = EdgeClient(bundle, client_id, verify=False, threads=1)
    base = _reset_peak()
    shape = ec.entry.normalisation.input_shape
    x1 = np.zeros((1, *shape), np.float32)
    for t in ec.tasks:
        ec.predict(t, x1)
    predict = _peak_bytes() - base
    xs = np.zeros((TRAIN_BATCH, *shape), np.float32)
    ys = {}
    for t in ec.entry.tasks:
        h = ec.head(t)
        ys[t] = (np.zeros(TRAIN_BATCH, np.int64) if h.kind == "multiclass"
                 else np.zeros((TRAIN_BATCH, len(h.labels)), np.float32))  # fmt: skip
    train = None  # a client without a step graph (FedAvg's union head) predicts only
    if ec.manifest.width(ec.entry.width).train_steps:
        ec.train(xs, ys, steps=1, batch_size=TRAIN_BATCH, epochs=1)
        train = _peak_bytes() - base
    return {
        "runtime_bytes": base,
        "predict_bytes": predict,
        "train_bytes": train,
        "batch": TRAIN_BATCH,
        "client": client_id,
    }


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m mobile_client.memory BUNDLE_DIR CLIENT_ID")
    print(json.dumps(measure(sys.argv[1], sys.argv[2])))
