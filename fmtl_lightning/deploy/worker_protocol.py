"""The wire protocol between a ClientApp and its node-resident worker (numpy only, no torch).

Flower 1.41 starts a fresh ClientApp process for every message, so a Lightning node
that trained inside the ClientApp re-imported torch + Lightning and rebuilt its client
every round. A node-resident worker (:mod:`fmtl_lightning.deploy.worker`) is a
long-lived process next to the SuperNode that keeps them loaded; the ClientApp becomes
a light forwarder (:mod:`fmtl_lightning.deploy.client_app`) that hands each message to
the worker over a Unix domain socket and returns its reply.

One request and one reply per connection, each one *frame*::

    magic b"FMTW" | version (1 byte) | header length (u32, big endian)
    | body length (u64) | HMAC-SHA256(secret, everything before it + header + body)
    | header (UTF-8 JSON object) | body (safetensors bytes: the arrays)

The HMAC is checked (constant time) before the header or body is parsed: a frame
made without the node's secret is refused with :class:`WorkerAuthError`; a frame
that is cut short, too large, of another version, whose header is not a JSON object
or whose body is not a safetensors file is refused with :class:`WorkerProtocolError`.
Arrays travel as safetensors (never pickle). The secret is 32 random bytes, written
hex-encoded by the worker to ``worker.secret`` (mode 0600) next to its socket.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mobile_client.errors import FMTLError

MAGIC = b"FMTW"
VERSION = 1
_PREFIX = struct.Struct(">4sBIQ")  # magic, version, header length, body length
_MAC_LEN = 32
MAX_HEADER = 16 << 20  # the run's YAML travels in the header
MAX_BODY = 4 << 30
SECRET_SUFFIX = ".secret"


class WorkerError(FMTLError, RuntimeError):
    """The node-resident worker could not be reached, or it answered with an error
    (the message names the socket, or carries the worker's own error)."""


class WorkerAuthError(WorkerError):
    """A frame whose HMAC does not match the node's secret (wrong or no secret)."""


class WorkerProtocolError(WorkerError, ValueError):
    """A frame that is not one: cut short, too large, of another version, or whose
    header or body does not parse (names what is wrong)."""


# ----------------------------------------------------------------------------- secret
def secret_path(sock: str | os.PathLike[str]) -> Path:
    """Where the secret of the worker listening on ``sock`` lives (``worker.secret``
    for ``worker.sock``)."""
    return Path(sock).with_suffix(SECRET_SUFFIX)


def new_secret(sock: str | os.PathLike[str]) -> bytes:
    """A fresh random secret for ``sock``'s worker, written with mode 0600."""
    key = os.urandom(32)
    p = secret_path(sock)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex())
    os.replace(tmp, p)
    return key


def read_secret(sock: str | os.PathLike[str]) -> bytes:
    p = secret_path(sock)
    try:
        text = p.read_text().strip()
        key = bytes.fromhex(text)
    except OSError as exc:
        raise WorkerError(f"worker secret {p}: cannot be read ({exc}); is the node's "
                          "worker running? (python -m fmtl_lightning.deploy.worker)") from exc  # fmt: skip
    except ValueError as exc:
        raise WorkerAuthError(f"worker secret {p}: not a hex string") from exc
    if len(key) < 16:
        raise WorkerAuthError(f"worker secret {p}: {len(key)} bytes, need at least 16")
    return key


# ----------------------------------------------------------------------------- frames
def _body_bytes(arrays: Mapping[str, np.ndarray] | None) -> bytes:
    from mobile_client.safetensors_np import serialize

    return serialize(arrays) if arrays else b""


def encode(
    secret: bytes, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None
) -> bytes:
    """One frame: ``header`` (JSON-able) and ``arrays`` (safetensors), signed with ``secret``."""
    head = json.dumps(dict(header), separators=(",", ":")).encode("utf-8")
    body = _body_bytes(arrays)
    prefix = _PREFIX.pack(MAGIC, VERSION, len(head), len(body))
    mac = hmac.new(secret, prefix + head + body, hashlib.sha256).digest()
    return prefix + mac + head + body


def _recv_exact(conn: socket.socket, n: int, what: str) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = conn.recv_into(view[got:], n - got)
        if k == 0:
            raise WorkerProtocolError(f"frame cut short: {what} has {got} of {n} bytes")
        got += k
    return bytes(buf)


def read_frame(conn: socket.socket, secret: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read one frame from ``conn``; (header, arrays) once its HMAC checks out."""
    prefix = _recv_exact(conn, _PREFIX.size, "the frame prefix")
    magic, version, n_head, n_body = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise WorkerProtocolError(f"frame magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise WorkerProtocolError(f"frame version {version}, this side speaks {VERSION}")
    if n_head > MAX_HEADER or n_body > MAX_BODY:
        raise WorkerProtocolError(f"frame too large: header {n_head} B (max {MAX_HEADER}), "
                                  f"body {n_body} B (max {MAX_BODY})")  # fmt: skip
    mac = _recv_exact(conn, _MAC_LEN, "the HMAC")
    head = _recv_exact(conn, n_head, "the header")
    body = _recv_exact(conn, n_body, "the body")
    want = hmac.new(secret, prefix + head + body, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, want):
        raise WorkerAuthError("frame HMAC does not match this node's worker secret")
    return decode_payload(head, body)


def decode_payload(head: bytes, body: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Header JSON object and safetensors arrays of an authenticated frame."""
    try:
        header = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WorkerProtocolError(f"frame header is not UTF-8 JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise WorkerProtocolError(f"frame header is a JSON {type(header).__name__}, not an object")
    return header, decode_arrays(body)


def decode_arrays(body: bytes) -> dict[str, np.ndarray]:
    """safetensors bytes -> writable arrays (empty body: no arrays); never unpickles."""
    if not body:
        return {}
    import safetensors.numpy as stn
    from safetensors import SafetensorError

    from mobile_client.safetensors_np import DTYPES

    try:
        raw = stn.load(body)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise WorkerProtocolError(f"frame body is not a safetensors file: {exc}") from exc
    out = {}
    for k, v in raw.items():
        if v.dtype not in DTYPES.values():
            raise WorkerProtocolError(f"frame body: key {k!r} has unsupported dtype {v.dtype}")
        out[k] = np.array(v, copy=True)
    return out


# ----------------------------------------------------------------------------- client side
def call(
    sock: str | os.PathLike[str],
    header: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray] | None,
    *,
    timeout: float | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Send one request to the worker on ``sock`` and return its reply; a reply with
    ``ok: false`` raises :class:`WorkerError` carrying the worker's error."""
    secret = read_secret(sock)
    frame = encode(secret, header, arrays)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(str(sock))
            conn.sendall(frame)
            conn.shutdown(socket.SHUT_WR)
            reply, out = read_frame(conn, secret)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise WorkerError(f"no worker listening on {sock}: start it next to the SuperNode "
                          "(python -m fmtl_lightning.deploy.worker --state-dir ...)") from exc  # fmt: skip
    except OSError as exc:
        raise WorkerError(f"worker on {sock}: {exc}") from exc
    if not reply.get("ok", False):
        kind = reply.get("type", "error")
        raise WorkerError(f"worker on {sock}: {kind}: {reply.get('error', '(no message)')}")
    return reply, out
