"""The ClientApp side of a Lightning node: read the message, then train here or forward.

:func:`prepare` is what every Lightning train/evaluate handler does first (read and
check the message, write ``status.json``, sleep the node config's ``delay-s``);
:func:`forward_train` / :func:`forward_evaluate` hand the message's arrays and
instructions to the node-resident worker named by the node config's ``worker`` key
(:mod:`fmtl_lightning.deploy.worker`) and turn its answer into the reply Flower sends.
Imports flwr, numpy and safetensors only, so a forwarding ClientApp process starts in
the time Python and flwr take (no torch, no Lightning).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from mobile_client.flower_app import (
    NodeConfigError,
    NodeSettings,
    TrainInstructions,
    read_train_message,
    reply_message,
    write_status,
)

WORKER_KEY = "worker"  # node config: the worker's socket path


def prepare(
    msg: Any, context: Any, phase: str
) -> tuple[NodeSettings, dict[str, np.ndarray], TrainInstructions]:
    """Settings, arrays and instructions of a train/evaluate message for a Lightning
    node (status written first, then the node config's ``delay-s`` slept when training,
    for fault-injection tests)."""
    s = NodeSettings.from_context(context)
    received, ins = read_train_message(msg)
    if ins.client_id != s.client_id:
        raise NodeConfigError(f"{phase} message for {ins.client_id!r} reached node "
                              f"{s.client_id!r}")  # fmt: skip
    if not ins.run_config:
        raise NodeConfigError(f"{phase} message carries no run config for a Lightning node")
    write_status(s.state_dir, round=ins.round, phase=phase, client=s.client_id)
    if s.delay_s > 0 and phase == "training":
        time.sleep(s.delay_s)
    return s, received, ins


def worker_socket(context: Any) -> str | None:
    """The node config's ``worker`` socket path, or None (train in the ClientApp)."""
    v = context.node_config.get(WORKER_KEY)
    return str(v) if v not in (None, "", False) else None


def process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``; None elsewhere): in a
    ClientApp, what Flower's process start, Python and the imports took."""
    try:
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def _request(op: str, context: Any, ins: TrainInstructions) -> dict[str, Any]:
    return {"op": op, "node_config": dict(context.node_config), "instructions": asdict(ins),
            "clientapp_age_s": process_age()}  # fmt: skip


def forward_train(msg: Any, context: Any, sock: str) -> Any:
    """Train handler of a Lightning node with a worker: the worker trains."""
    from fmtl_lightning.deploy.worker_protocol import WorkerProtocolError, call

    s, received, ins = prepare(msg, context, "training")
    reply, shared = call(sock, _request("train", context, ins), received)
    n = reply.get("num_examples")
    if isinstance(n, bool) or not isinstance(n, int):
        raise WorkerProtocolError(f"worker reply: 'num_examples' is {n!r}")
    write_status(s.state_dir, round=ins.round, phase="done", client=s.client_id)
    return reply_message(msg, shared, n, {}, ins)


def forward_evaluate(msg: Any, context: Any, sock: str) -> Any:
    """Evaluate handler of a Lightning node with a worker: the worker scores."""
    from fmtl_lightning.deploy.worker_protocol import WorkerProtocolError, call

    s, received, ins = prepare(msg, context, "evaluating")
    reply, _ = call(sock, _request("evaluate", context, ins), received)
    metrics, n = reply.get("metrics"), reply.get("num_test")
    if not isinstance(metrics, dict) or isinstance(n, bool) or not isinstance(n, int):
        raise WorkerProtocolError("worker reply: 'metrics' (object) and 'num_test' (int) "
                                  "are required")  # fmt: skip
    metrics = {str(k): float(v) for k, v in metrics.items()}
    return finish_evaluate(msg, s, ins, metrics, n)


def finish_evaluate(
    msg: Any, s: NodeSettings, ins: TrainInstructions, metrics: dict[str, float], n: int
) -> Any:
    """Status, ``last_metrics.json`` and the evaluate reply of a Lightning node."""
    from fmtl_lightning.deploy.evaluation import eval_reply

    write_status(s.state_dir, round=ins.round, phase="evaluated", client=s.client_id)
    assert s.state_dir is not None
    (s.state_dir / "last_metrics.json").write_text(json.dumps({"round": ins.round, **metrics}))
    return eval_reply(msg, ins, metrics, n, "" if n else "the node's data has no test split")
