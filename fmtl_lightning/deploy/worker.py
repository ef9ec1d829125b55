"""The node-resident worker: a long-lived process next to a SuperNode that keeps a
Lightning node warm (torch, Lightning, its module, its data and client state loaded).

Started once per node, before or with its SuperNode::

    python -m fmtl_lightning.deploy.worker --state-dir /var/fmtl/c00

It listens on ``STATE_DIR/worker.sock`` (a Unix domain socket, mode 0600; ``--socket``
for another path) and writes a fresh random secret next to it, ``worker.secret``
(0600); the SuperNode's node config names the socket
(``worker="/var/fmtl/c00/worker.sock"``) and the ClientApp
(:mod:`fmtl_lightning.deploy.client_app`) forwards each train/evaluate message to it
(:mod:`fmtl_lightning.deploy.worker_protocol`). Torch and Lightning are imported
when the worker starts; the :class:`~fmtl_lightning.deploy.lightning_client.LightningNode`
is built on the first message of a run and kept while the run config and node config
stay the same, so a round costs the training, not the imports and the rebuild.

The node does exactly what the in-ClientApp node does (same code:
:class:`~fmtl_lightning.deploy.lightning_client.LightningNode`): its local state is
written to ``client.safetensors`` after every train, so a restarted worker (or the
in-ClientApp path) continues from the same state. A request that fails drops the
cached node, so the next one rebuilds it from disk, as a fresh ClientApp would.
Requests are served one at a time. A request whose HMAC does not match the secret,
or that is malformed, is answered with a typed error (never unpickled, never run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fmtl_lightning.deploy.worker_protocol import (
    WorkerError,
    WorkerProtocolError,
    encode,
    new_secret,
    read_frame,
    secret_path,
)
from mobile_client.errors import FMTLError

SOCKET_NAME = "worker.sock"
OPS = ("ping", "train", "evaluate")
READY = "fmtl worker ready"


MAX_SOCKET_PATH = 100  # bytes; the OS limit is 104 (macOS) to 108 (Linux)


def socket_path(state_dir: str | os.PathLike[str]) -> Path:
    """The worker socket of the node whose state lives in ``state_dir``:
    ``state_dir/worker.sock``, or, when that path is too long for a Unix socket,
    ``$TMPDIR/fmtl-worker-<hash of state_dir>/worker.sock``."""
    p = Path(state_dir).absolute() / SOCKET_NAME
    if len(str(p).encode()) <= MAX_SOCKET_PATH:
        return p
    import tempfile

    tag = hashlib.sha256(str(p.parent).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"fmtl-worker-{tag}" / SOCKET_NAME


def instructions_from(fields: Any) -> Any:
    """:class:`~mobile_client.flower_app.TrainInstructions` from a request's JSON
    object; a missing field or one of the wrong type raises :class:`WorkerProtocolError`."""
    from mobile_client.flower_app import TrainInstructions

    if not isinstance(fields, dict):
        raise WorkerProtocolError("request: 'instructions' must be a JSON object")
    kw: dict[str, Any] = {}
    types: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "str": str}
    for name, f in TrainInstructions.__dataclass_fields__.items():
        if name not in fields:
            if name == "run_config":
                continue
            raise WorkerProtocolError(f"request: instructions field {name!r} is missing")
        v = fields[name]
        want = types[str(f.type)]
        if isinstance(v, bool) or not isinstance(v, want):
            raise WorkerProtocolError(f"request: instructions field {name!r} is "
                                      f"{type(v).__name__}, expected {f.type}")  # fmt: skip
        kw[name] = float(fields[name]) if f.type == "float" else v
    return TrainInstructions(**kw)


class Worker:
    """Serves one node's requests; keeps its :class:`LightningNode` between them."""

    def __init__(self, state_dir: str | os.PathLike[str], secret: bytes) -> None:
        self.state_dir = Path(state_dir).absolute()
        self.secret = secret
        self.node: Any = None
        self.key: str | None = None
        self.builds = 0  # how many times the node was (re)built
        self.log: list[dict[str, Any]] = []  # one entry per request served (also printed)

    def preload(self) -> None:
        """Import what a Lightning node needs (torch, Lightning, the simulator's client)."""
        import fmtl_lightning.clients  # noqa: F401
        import fmtl_lightning.deploy.lightning_client  # noqa: F401
        import fmtl_lightning.engine.metrics  # noqa: F401
        import fmtl_lightning.fed_data  # noqa: F401

    def _node_for(self, node_config: Any, run_yaml: str) -> Any:
        from fmtl_lightning.deploy.lightning_client import LightningNode
        from mobile_client.flower_app import NodeSettings

        if not isinstance(node_config, dict):
            raise WorkerProtocolError("request: 'node_config' must be a JSON object")
        settings = NodeSettings.from_node_config(node_config)
        if settings.runtime != "lightning":
            raise WorkerProtocolError(f"request: runtime {settings.runtime!r}: the worker "
                                      "serves Lightning nodes only")  # fmt: skip
        if settings.state_dir is None or settings.state_dir.absolute() != self.state_dir:
            raise WorkerProtocolError(f"request: state-dir {settings.state_dir} is not this "
                                      f"worker's ({self.state_dir})")  # fmt: skip
        key = hashlib.sha256(
            json.dumps([node_config, run_yaml], sort_keys=True).encode()
        ).hexdigest()
        if key != self.key:
            self.node, self.key = None, None
            self.node = LightningNode(settings, run_yaml)
            self.key = key
            self.builds += 1
        return self.node

    def handle(
        self, header: dict[str, Any], arrays: dict[str, np.ndarray]
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """One authenticated request -> (reply header, reply arrays)."""
        op = header.get("op")
        if op not in OPS:
            raise WorkerProtocolError(f"request: 'op' is {op!r}, not one of {OPS}")
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "builds": self.builds}, {}
        ins = instructions_from(header.get("instructions"))
        if not ins.run_config:
            raise WorkerProtocolError("request: the instructions carry no run config")
        t0 = time.perf_counter()
        try:
            builds = self.builds
            node = self._node_for(header.get("node_config"), ins.run_config)
            t1 = time.perf_counter()
            if op == "train":
                shared, n = node.train(arrays, ins)
                reply: dict[str, Any] = {"ok": True, "num_examples": int(n)}
            else:
                metrics = node.evaluate(arrays, ins)
                shared = {}
                reply = {
                    "ok": True,
                    "metrics": metrics,
                    "num_test": node.client.num_test,
                }
        except BaseException:
            self.node, self.key = None, None  # rebuilt from disk next time
            raise
        age = header.get("clientapp_age_s")
        self.log.append({"op": op, "round": ins.round, "built": self.builds > builds,
                         "build_s": t1 - t0, "work_s": time.perf_counter() - t1,
                         "clientapp_age_s": age if isinstance(age, float) else None})  # fmt: skip
        print("worker: " + json.dumps(self.log[-1]), flush=True)
        return reply, shared

    def serve_one(self, conn: socket.socket) -> None:
        """Read one request from ``conn``, answer it (an error reply for a bad one)."""
        try:
            header, arrays = read_frame(conn, self.secret)
            reply, out = self.handle(header, arrays)
        except FMTLError as exc:  # bad secret, malformed request, bad input: typed
            reply, out = {"ok": False, "type": type(exc).__name__, "error": str(exc)}, {}
        except OSError as exc:  # the connection failed or timed out mid-frame
            reply, out = {"ok": False, "type": "WorkerProtocolError", "error": str(exc)}, {}
        except Exception as exc:  # a bug: reported to the ClientApp, the worker lives on
            reply = {"ok": False, "type": type(exc).__name__, "error": repr(exc)}
            out = {}
            print(f"worker: {exc!r}", file=sys.stderr, flush=True)
        try:
            conn.sendall(encode(self.secret, reply, out))
        except OSError:
            pass


def bind(sock_path: str | os.PathLike[str]) -> socket.socket:
    """A listening Unix socket at ``sock_path`` (mode 0600; its directory made 0700 if
    missing; a stale socket file replaced)."""
    p = Path(sock_path).absolute()
    if len(str(p).encode()) > MAX_SOCKET_PATH:
        raise WorkerError(f"worker socket {p}: path too long for a Unix socket "
                          f"(max {MAX_SOCKET_PATH} bytes); pass a shorter --socket")  # fmt: skip
    if not p.parent.is_dir():
        p.parent.mkdir(mode=0o700, parents=True)
    if p.exists() or p.is_symlink():
        p.unlink()
    old_umask = os.umask(0o177)
    try:
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(p))
    finally:
        os.umask(old_umask)
    srv.listen(8)
    return srv


def loop(srv: socket.socket, worker: Worker, io_timeout: float = 300.0) -> None:
    """Serve requests on ``srv`` one at a time until it is closed."""
    while True:
        try:
            conn, _ = srv.accept()
        except OSError:  # closed
            return
        with conn:
            conn.settimeout(io_timeout)
            worker.serve_one(conn)


def serve(
    state_dir: str | os.PathLike[str],
    sock: str | os.PathLike[str] | None = None,
    *,
    io_timeout: float = 300.0,
) -> None:
    """Listen on ``sock`` (default :func:`socket_path`) until SIGTERM/SIGINT."""
    state_dir = Path(state_dir).absolute()
    state_dir.mkdir(parents=True, exist_ok=True)
    sock_path = Path(sock).absolute() if sock is not None else socket_path(state_dir)
    t0 = time.perf_counter()
    srv = bind(sock_path)
    worker = Worker(state_dir, new_secret(sock_path))
    worker.preload()

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(f"{READY} on {sock_path} (pid {os.getpid()}, imports {time.perf_counter() - t0:.1f} s)",
          flush=True)  # fmt: skip
    try:
        loop(srv, worker, io_timeout)
    except KeyboardInterrupt:
        pass
    finally:
        srv.close()
        for p in (sock_path, secret_path(sock_path)):
            try:
                p.unlink()
            except OSError:
                pass


def main(argv: list[str] | None = None) -> int:
    from mobile_client.errors import error_line

    ap = argparse.ArgumentParser(prog="python -m fmtl_lightning.deploy.worker",
                                 description="Keep a Lightning node warm next to its SuperNode.")  # fmt: skip
    ap.add_argument("--state-dir", required=True, help="the node config's state-dir")
    ap.add_argument("--socket", default=None,
                    help="socket path (default: STATE_DIR/worker.sock); the node config's "
                         "'worker'")  # fmt: skip
    ap.add_argument("--io-timeout", type=float, default=300.0,
                    help="seconds a connection may take to send its request")  # fmt: skip
    a = ap.parse_args(argv)
    try:
        serve(a.state_dir, a.socket, io_timeout=a.io_timeout)
    except FMTLError as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    # stopped (SIGTERM/SIGINT), socket and secret removed: exit at once, without the
    # interpreter's slow teardown of torch and Lightning (seconds on a busy machine)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
