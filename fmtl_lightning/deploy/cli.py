"""``fmtl deploy ...``: the commands around a Flower deployment (see docs/deploy.md).

* ``certs``        a CA and a SuperLink certificate for the given host names/IPs
* ``app``          a Flower app directory (``flwr run DIR``) for any fmtl YAML
* ``prepare-edge`` an edge node's bundle + data file for one client of a YAML
* ``prepare-data`` one client's shard of the YAML's dataset as the ``.npz`` a node reads
* ``keys``         an EC key pair per client (SuperNode authentication)
* ``register``     each client's public key registered with the SuperLink; prints the
                   ServerApp's ``node-ids`` (client id -> node id of its key)
* ``node-config``  the ``--node-config`` string of one client's SuperNode
* ``local``        the whole deployment on this machine (SuperLink + one SuperNode per
                   client, TLS and SuperNode authentication on 127.0.0.1) for a YAML:
                   a real-process trial run

Also runnable as ``python -m fmtl_lightning.deploy``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from fmtl_lightning.errors import FMTLError, error_line

PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fmtl-{name}"
version = "0.1.0"
description = "fmtl-lightning run {name!r} on Flower"
license = "Apache-2.0"
dependencies = []  # fmtl-lightning[flower] is installed on the SuperLink and SuperNodes

[tool.flwr.app]
publisher = "fmtl"

[tool.flwr.app.components]
serverapp = "fmtl_lightning.deploy.server_app:app"
clientapp = "fmtl_lightning.deploy.client_app:app"

[tool.flwr.app.config]
config = "fmtl.yaml"
run-dir = "runs/{name}"
num-rounds = 0
reply-timeout = 600.0
min-nodes = 0
node-wait-timeout = 300.0
max-examples = 0
log-colour = true
node-auth = true
node-ids = ""
min-replies = 1
"""


def write_app(config: str | Path, out: str | Path) -> Path:
    """A Flower app directory shipping ``config`` as ``fmtl.yaml``."""
    from fmtl_lightning.config import load_config

    cfg = load_config(config)  # fail here, not on the SuperLink
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config, out / "fmtl.yaml")
    name = "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in cfg.name.lower())
    (out / "pyproject.toml").write_text(PYPROJECT.format(name=name))
    return out


def node_specs(clients: list, root: Path, edge_dirs: dict[str, tuple[Path, Path]]) -> list:
    """One SuperNode per planned client under ``root/nodes``; clients in ``edge_dirs``
    run the edge runtime on their (bundle, data)."""
    from fmtl_lightning.deploy.local import NodeSpec

    out = []
    for c in clients:
        spec = NodeSpec(c.client_id, c.width, c.tasks, root / "nodes" / c.client_id)
        if c.client_id in edge_dirs:
            spec.runtime = "edge"
            spec.bundle, spec.data = edge_dirs[c.client_id]
        out.append(spec)
    return out


def _certs(a: argparse.Namespace) -> int:
    from fmtl_lightning.deploy.tls import write_certificates

    p = write_certificates(a.out, a.host, days=a.days)
    print(f"CA (give to SuperNodes and flwr): {p.ca_cert}\nSuperLink: --ssl-ca-certfile "
          f"{p.ca_cert} --ssl-certfile {p.server_cert} --ssl-keyfile {p.server_key}")  # fmt: skip
    return 0


def _app(a: argparse.Namespace) -> int:
    out = write_app(a.config, a.out)
    print(f"Flower app in {out}: flwr run {out} <superlink-connection> --stream")
    return 0


def _prepare_edge(a: argparse.Namespace) -> int:
    from fmtl_lightning.config import load_config
    from fmtl_lightning.deploy.prepare import prepare_edge

    bundle, data = prepare_edge(load_config(a.config), a.client, a.out)
    print(f"bundle: {bundle}\ndata:   {data}")
    return 0


def _prepare_data(a: argparse.Namespace) -> int:
    from fmtl_lightning.config import load_config
    from fmtl_lightning.deploy.prepare import write_client_data
    from fmtl_lightning.fed_data import build_federation

    fed = build_federation(load_config(a.config))
    by_id = {c.cid: c for c in fed.clients}
    if a.client not in by_id:
        raise FMTLError(f"client {a.client!r} is not in {a.config} (clients: {', '.join(by_id)})")
    c = by_id[a.client]
    path = write_client_data(c, a.out)
    print(f"{path}: {c.num_train} train / {c.num_test} test examples, tasks {list(c.tasks)}")
    return 0


def _keys(a: argparse.Namespace) -> int:
    from fmtl_lightning.config import load_config
    from fmtl_lightning.deploy.tls import write_node_key
    from fmtl_lightning.engine.plan import planned_clients

    ids = [c.client_id for c in planned_clients(load_config(a.config))]
    for cid in a.client or ids:
        if cid not in ids:
            raise FMTLError(f"client {cid!r} is not in {a.config} (clients: {', '.join(ids)})")
        if (Path(a.out) / cid).exists():
            raise FMTLError(f"{Path(a.out) / cid} exists: a registered key is never replaced "
                            "silently (remove it, and unregister its node, to make a new one)")  # fmt: skip
        k = write_node_key(a.out, cid)
        print(f"{cid}: {k.private} (to its SuperNode: --auth-supernode-private-key), "
              f"{k.public} (flwr supernode register)")  # fmt: skip
    return 0


def _register(a: argparse.Namespace) -> int:
    from fmtl_lightning.config import load_config
    from fmtl_lightning.deploy.auth import format_node_ids, register_key
    from fmtl_lightning.engine.plan import planned_clients

    ids = {}
    for c in planned_clients(load_config(a.config)):
        pub = Path(a.keys) / f"{c.client_id}.pub"
        if not pub.is_file():
            raise FMTLError(f"{pub}: no public key for client {c.client_id} (fmtl deploy keys)")
        ids[c.client_id] = register_key(pub, a.superlink)
        print(f"{c.client_id}: registered {pub} as node {ids[c.client_id]}", flush=True)
    text = format_node_ids(ids)
    (Path(a.keys) / "node-ids.txt").write_text(text + "\n")
    print(f'run config: node-ids="{text}"  (also in {Path(a.keys) / "node-ids.txt"})')
    return 0


def _node_config(a: argparse.Namespace) -> int:
    from fmtl_lightning.config import load_config
    from fmtl_lightning.deploy.local import NodeSpec
    from fmtl_lightning.engine.plan import client_by_id, planned_clients

    c = client_by_id(planned_clients(load_config(a.config)), a.client)
    if c is None:
        raise FMTLError(f"client {a.client!r} is not in {a.config}")
    spec = NodeSpec(c.client_id, c.width, c.tasks, Path(a.state_dir).absolute())
    if a.edge or a.bundle:
        spec.runtime = "edge"
    spec.bundle = Path(a.bundle).absolute() if a.bundle else None
    spec.data = Path(a.data).absolute() if a.data else None
    print(spec.node_config())
    return 0


def _local(a: argparse.Namespace) -> int:
    from fmtl_lightning.config import load_config
    from fmtl_lightning.deploy.local import LocalDeployment
    from fmtl_lightning.deploy.prepare import prepare_edge
    from fmtl_lightning.engine.plan import planned_clients

    t0 = time.perf_counter()
    cfg = load_config(a.config)
    root = Path(a.out).absolute()
    app = write_app(a.config, root / "app")
    clients = planned_clients(cfg)
    edge = {}
    for c in clients if not a.simulation else []:
        if c.edge:
            print(f"exporting the edge bundle of {c.client_id} ...", flush=True)
            edge[c.client_id] = prepare_edge(cfg, c.client_id, root / "edge" / c.client_id)
    dep = LocalDeployment(root / "deployment", tls=not a.insecure, simulation=a.simulation)
    with dep:
        dep.start_superlink()
        if a.simulation:
            print(f"SuperLink with Flower's simulation engine on {dep.address}: "
                  f"{len(clients)} virtual SuperNodes (all Lightning)", flush=True)  # fmt: skip
        else:
            dep.start_nodes(node_specs(clients, root, edge))
            auth = ("SuperNode authentication: one registered key per client, bound to its "
                    "client id" if dep.node_auth else "no node authentication")  # fmt: skip
            print(f"SuperLink on {dep.address} ({'plain HTTP' if a.insecure else 'TLS'}), "
                  f"{len(dep.procs) - 1} SuperNodes ({auth}); logs in {dep.root / 'logs'}",
                  flush=True)  # fmt: skip
        rc = {"run-dir": str(root / "run"), "reply-timeout": a.reply_timeout,
              "min-replies": a.min_replies, "log-colour": sys.stdout.isatty()}  # fmt: skip
        if a.rounds:
            rc["num-rounds"] = a.rounds
        started = time.time()
        n = len(clients) if a.simulation else None
        res = dep.run(app, rc, timeout=a.timeout, num_supernodes=n)
        if sys.stdout.isatty():  # Flower's own lines carry colour codes: terminals only
            print(res.stdout[-4000:])
        print(f"Flower's log of the run: {dep.root / 'logs' / 'flwr-run.log'}")
        summary = root / "run" / "summary.json"
        # `flwr run` exits 0 even when the ServerApp fails: the summary tells
        if res.returncode or not summary.is_file() or summary.stat().st_mtime < started:
            print(res.stderr[-4000:], file=sys.stderr)
            raise FMTLError(f"the run did not finish; see {dep.root / 'logs'}")
    print(deploy_report(json.loads(summary.read_text())))
    print(f"run directory: {root / 'run'}  ({time.perf_counter() - t0:.0f} s)")
    return 0


def deploy_report(s: dict[str, Any]) -> str:
    """The rounds of a deployed run, then ``fmtl simulate``'s table of the same summary
    (:func:`~fmtl_lightning.report.format_table`: per client the mean over its tasks of
    the test accuracy of the aggregated model with its own local arrays, at the last
    evaluated round), then every client without a score and why."""
    from fmtl_lightning.report import format_table

    lines = []
    for r in s["per_round"]:
        lines.append(f"round {r['round']}: accepted {', '.join(r['accepted']) or '-'}"
                     f"{'; rejected ' + ', '.join(r['rejected']) if r['rejected'] else ''}"
                     f"{'; failed ' + ', '.join(r['failed']) if r['failed'] else ''}"
                     f"{'; late replies ' + ', '.join(r['late']) if r.get('late') else ''}")  # fmt: skip
        if r.get("not_aggregated"):
            lines.append(f"  not aggregated: {r['not_aggregated']}")
    if s.get("late_after_last_round"):
        lines.append(f"late replies after the last round (not aggregated): "
                     f"{', '.join(s['late_after_last_round'])}")  # fmt: skip
    lines.append("")
    missing = s.get("not_evaluated", {})
    if s["clients"]:
        lines.append(f"test accuracy after round {s['evaluated_round']} (the aggregated model "
                     "with each client's own local arrays, as fmtl simulate reports it):")  # fmt: skip
        lines.append(format_table(s))
        if missing:
            scored = ", ".join(sorted(s["clients"]))
            lines.append(f"(mean and worst are over the clients with a score: {scored})")
    for cid, why in sorted(missing.items()):
        lines.append(f"  {cid}: no test accuracy: {why}")
    return "\n".join(lines)


def add_deploy_parser(sub: Any) -> argparse.ArgumentParser:
    d = sub.add_parser("deploy", help="Flower deployment: certificates, app, nodes, local trial")
    ds = d.add_subparsers(dest="deploy_command", required=True)
    c = ds.add_parser("certs", help="CA + SuperLink certificate for host names/IPs")
    c.add_argument("--out", required=True)
    c.add_argument("--host", action="append", default=[], help="name or IP of the SuperLink")
    c.add_argument("--days", type=int, default=365)
    c.set_defaults(func=_certs)
    p = ds.add_parser("app", help="write a Flower app directory for a YAML config")
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_app)
    for name, helptext, func in (
        ("prepare-edge", "bundle + data file of one edge client", _prepare_edge),
        ("prepare-data", "one client's data shard as a node's .npz", _prepare_data),
    ):
        e = ds.add_parser(name, help=helptext)
        e.add_argument("--config", required=True)
        e.add_argument("--client", required=True)
        e.add_argument("--out", required=True)
        e.set_defaults(func=func)
    k = ds.add_parser("keys", help="an EC key pair per client (SuperNode authentication)")
    k.add_argument("--config", required=True)
    k.add_argument("--out", required=True)
    k.add_argument("--client", action="append", default=[], help="only these clients")
    k.set_defaults(func=_keys)
    r = ds.add_parser("register", help="register every client's key with the SuperLink "
                      "(flwr supernode register); prints the run config's node-ids")  # fmt: skip
    r.add_argument("--config", required=True)
    r.add_argument("--keys", required=True, help="directory of <client>.pub files")
    r.add_argument("--superlink", required=True, help="SuperLink connection name (flwr config)")
    r.set_defaults(func=_register)
    n = ds.add_parser("node-config", help="print a client's --node-config string")
    n.add_argument("--config", required=True)
    n.add_argument("--client", required=True)
    n.add_argument("--state-dir", required=True)
    n.add_argument("--bundle", default=None, help="edge node: bundle directory")
    n.add_argument("--data", default=None, help="the node's own .npz (required for edge)")
    n.add_argument("--edge", action="store_true", help="edge runtime (needs --bundle, --data)")
    n.set_defaults(func=_node_config)
    lo = ds.add_parser("local", help="SuperLink + one SuperNode per client, on this machine")
    lo.add_argument("--config", required=True)
    lo.add_argument("--out", required=True)
    lo.add_argument("--rounds", type=int, default=0)
    lo.add_argument("--reply-timeout", type=float, default=600.0,
                    help="the round deadline (seconds); later replies are recorded, never used")  # fmt: skip
    lo.add_argument("--min-replies", type=int, default=1,
                    help="a round with fewer accepted replies aggregates nothing")  # fmt: skip
    lo.add_argument("--timeout", type=float, default=3600.0)
    lo.add_argument("--insecure", action="store_true",
                    help="plain HTTP (no TLS, hence no node authentication)")  # fmt: skip
    lo.add_argument("--simulation", action="store_true",
                    help="Flower's simulation engine (needs flwr[simulation]) instead of SuperNodes")  # fmt: skip
    lo.set_defaults(func=_local)
    return d


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fmtl_lightning.deploy")
    sub = p.add_subparsers(dest="command", required=True)
    add_deploy_parser(sub)
    args = p.parse_args(["deploy", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args))
    except FMTLError as exc:
        print(f"fmtl deploy: error: {error_line(exc)}", file=sys.stderr)
        return 2
