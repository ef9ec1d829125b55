"""Node authentication: every client id bound to one SuperNode key, checked by the server.

Flower's SuperNode authentication (flwr 1.41, documented in "Authenticate SuperNodes"):
the SuperLink runs with ``--enable-supernode-auth`` (TLS required); each node's EC public
key is registered with ``flwr supernode register KEY.pub SUPERLINK``, which returns the
node id the SuperLink assigns to that key; the SuperNode starts with
``--auth-supernode-private-key KEY`` and signs its requests with it. Only registered
keys connect, and a node id is the id of one key.

On top of that, the ServerApp's run config ``node-ids`` binds each client id of the
YAML to the node id of the key registered for it (``c00=1234,c01=5678``), so a node can
serve only the client its key was registered for: a node that claims another client's
id, or whose id is bound to no client, is refused at registration
(:meth:`FMTLStrategy.check_info`). With ``node-auth`` on (the default) the ServerApp
refuses to start without a binding for every client of the YAML.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

from fmtl_lightning.config import ConfigError


def parse_node_ids(text: str, client_ids: Iterable[str]) -> dict[str, int]:
    """``"c00=1234,c01=5678"`` (commas and/or spaces) -> ``{"c00": 1234, ...}``; every
    client id must be one of ``client_ids``, every node id an int >= 0, no client and
    no node twice. A :class:`ConfigError` names the entry."""
    known = list(client_ids)
    out: dict[str, int] = {}
    for item in text.replace(",", " ").split():
        cid, sep, nid = item.partition("=")
        if not sep or not cid or not nid.isdigit():
            raise ConfigError(f"run config 'node-ids': {item!r} is not CLIENT=NODE_ID "
                              "(e.g. c00=16019329408659850374)")  # fmt: skip
        if cid not in known:
            raise ConfigError(f"run config 'node-ids': client {cid!r} is not in the YAML "
                              f"(clients: {', '.join(known)})")  # fmt: skip
        if cid in out:
            raise ConfigError(f"run config 'node-ids': client {cid!r} is bound twice")
        if int(nid) in out.values():
            raise ConfigError(f"run config 'node-ids': node {nid} is bound to two clients")
        out[cid] = int(nid)
    return out


def format_node_ids(ids: Mapping[str, int]) -> str:
    """Inverse of :func:`parse_node_ids`."""
    return ",".join(f"{cid}={nid}" for cid, nid in ids.items())


def missing_bindings(ids: Mapping[str, int], client_ids: Iterable[str]) -> list[str]:
    return [c for c in client_ids if c not in ids]


def register_key(
    public_key: str | os.PathLike[str],
    superlink: str,
    *,
    env: Mapping[str, str] | None = None,
    flwr: str = "flwr",
    timeout: float = 60.0,
) -> int:
    """``flwr supernode register PUBLIC_KEY SUPERLINK --format json``: the node id the
    SuperLink assigned to the key (:class:`ConfigError` with Flower's message if refused)."""
    argv = [flwr, "supernode", "register", str(Path(public_key)), superlink, "--format", "json"]
    res = subprocess.run(argv, capture_output=True, text=True, env=None if env is None else dict(env),
                         timeout=timeout)  # fmt: skip
    start = res.stdout.find("{")
    try:
        doc = json.loads(res.stdout[start:]) if start >= 0 else {}
    except ValueError:
        doc = {}
    if res.returncode or not doc.get("success") or "node-id" not in doc:
        raise ConfigError(f"flwr supernode register {public_key}: refused "
                          f"(exit {res.returncode}): {(res.stdout + res.stderr).strip()[-800:]}")  # fmt: skip
    return int(doc["node-id"])
