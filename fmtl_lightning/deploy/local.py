"""A whole Flower deployment as local processes: SuperLink, SuperNodes, ``flwr run``.

Used by the loopback test, the deploy benchmark and ``fmtl deploy local``. Every
process is real (``flower-superlink``, ``flower-supernode``, ``flwr``), talks HTTPS on
127.0.0.1 with certificates from :mod:`fmtl_lightning.deploy.tls`, and is started in
its own session. Each Lightning node gets a worker that keeps its client warm
(:mod:`fmtl_lightning.deploy.worker`; ``NodeSpec(worker=False)``: the ClientApp trains,
importing torch for every message). With TLS, SuperNode authentication is on: each client's node has its
own registered key and the ServerApp binds the client id to it
(:mod:`fmtl_lightning.deploy.auth`). :meth:`LocalDeployment.stop` kills each process tree (Flower's
SuperExec runs in a session of its own, so trees are walked through ``/proc``, not just
process groups) and reports anything still alive.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmtl_lightning.deploy.tls import write_certificates

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def kv_string(d: Mapping[str, Any]) -> str:
    """``{"client-id": "c00", "width": 0.5}`` -> ``client-id="c00" width=0.5``."""
    return " ".join(f"{k}={_toml(v)}" for k, v in d.items() if v is not None)


@dataclass
class NodeSpec:
    """One SuperNode: the node config it is started with."""

    client_id: str
    width: float
    tasks: tuple[str, ...]
    state_dir: Path
    runtime: str = "lightning"
    bundle: Path | None = None
    data: Path | None = None
    delay_s: float = 0.0
    key: Path | None = None  # private key (SuperNode authentication); None: LocalDeployment's
    worker: bool = True  # Lightning: train in a node-resident worker (False: in each ClientApp)

    @property
    def worker_socket(self) -> Path | None:
        """The socket of the node's worker (:mod:`fmtl_lightning.deploy.worker`), or None."""
        if not self.worker or self.runtime != "lightning":
            return None
        from fmtl_lightning.deploy.worker import socket_path

        return socket_path(self.state_dir)

    def node_config(self) -> str:
        return kv_string(
            {
                "client-id": self.client_id,
                "width": float(self.width),
                "tasks": ",".join(self.tasks),
                "runtime": self.runtime,
                "state-dir": str(self.state_dir),
                "bundle": str(self.bundle) if self.bundle else None,
                "data": str(self.data) if self.data else None,
                "delay-s": float(self.delay_s) if self.delay_s else None,
                "worker": str(self.worker_socket) if self.worker_socket else None,
            }
        )


# ----------------------------------------------------------------------------- processes
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d.name))
    return kids


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (any session), parents first."""
    kids = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def alive(pid: int) -> bool:
    """True for a running process (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def kill_tree(pid: int, sig: int = signal.SIGTERM, grace: float = 5.0) -> list[int]:
    """Signal ``pid``'s tree (and the process groups in it); SIGKILL what survives
    ``grace`` seconds. Returns pids still alive after that (should be empty)."""
    tree = [p for p in descendants(pid) if p > 1]
    groups = set()
    for p in tree:
        try:
            groups.add(os.getpgid(p))
        except OSError:
            pass
    for p in tree:
        try:
            os.kill(p, sig)
        except OSError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in tree):
        time.sleep(0.05)
    for g in groups:
        if g > 1 and g != os.getpgid(0):
            try:
                os.killpg(g, signal.SIGKILL)
            except OSError:
                pass
    for p in tree:
        if alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
    time.sleep(0.1)
    return [p for p in tree if alive(p)]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    pids_seen: set[int] = field(default_factory=set)

    def refresh(self) -> None:
        if self.popen.poll() is None:
            self.pids_seen.update(descendants(self.popen.pid))


class LocalDeployment:
    """SuperLink + SuperNodes on 127.0.0.1 under ``root`` (logs, certs, FLWR_HOME)."""

    def __init__(
        self,
        root: str | Path,
        *,
        tls: bool = True,
        threads_per_node: int = 1,
        simulation: bool = False,
        node_auth: bool | None = None,
    ) -> None:
        """``simulation``: a SuperLink running Flower's simulation engine (Ray) instead of
        waiting for SuperNodes: ``run(..., num_supernodes=N)`` creates N virtual nodes.
        ``node_auth`` (default: on with TLS, off without or under ``simulation``): the
        SuperLink runs ``--enable-supernode-auth``; each client's SuperNode gets a key pair
        registered for it (:meth:`register`), and :meth:`run` binds each client id to
        its key's node id (run config ``node-ids``, :mod:`fmtl_lightning.deploy.auth`)."""
        from fmtl_lightning.errors import FMTLError

        self.simulation = simulation
        if node_auth is None:
            node_auth = tls and not simulation
        if node_auth and (not tls or simulation):
            raise FMTLError("node authentication needs TLS and SuperNodes (not --insecure, "
                            "not --simulation)")  # fmt: skip
        self.node_auth = node_auth
        self.node_ids: dict[str, int] = {}  # client id -> node id of its registered key
        self.keys: dict[str, Path] = {}  # client id -> private key
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.flwr_home = self.root / "flwr_home"
        self.flwr_home.mkdir(exist_ok=True)
        self.certs = (
            write_certificates(self.root / "certs", ["127.0.0.1", "localhost"]) if tls else None
        )
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.flwr_home),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "OMP_NUM_THREADS": str(threads_per_node),
            "MKL_NUM_THREADS": str(threads_per_node),
            "PYTHONUNBUFFERED": "1",
        }
        conn = [f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "{self.address}"']
        if self.certs:
            conn.append(f'root-certificates = "{self.certs.ca_cert}"')
        else:
            conn.append("insecure = true")
        (self.flwr_home / "config.toml").write_text("\n".join(conn) + "\n")
        self.procs: dict[str, Proc] = {}
        self.workers: dict[str, Proc] = {}  # SuperNode's process name -> its worker

    # ------------------------------------------------------------------ start
    def _spawn(self, name: str, argv: list[str], *, register: bool = True) -> Proc:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        fh = log.open("ab")
        fh.write(f"$ {shlex.join(argv)}\n".encode())
        fh.flush()
        p = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=self.env,
                             cwd=self.root, start_new_session=True)  # fmt: skip
        fh.close()
        proc = Proc(name, p, log)
        if register:
            self.procs[name] = proc
        return proc

    def superlink_argv(self) -> list[str]:
        argv = [str(BIN / "flower-superlink"), "--port", str(self.port),
                "--disable-runtime-dependency-installation"]  # fmt: skip
        if self.simulation:
            argv.append("--simulation")
        if self.node_auth:
            argv.append("--enable-supernode-auth")
        if self.certs:
            argv += ["--ssl-ca-certfile", str(self.certs.ca_cert),
                     "--ssl-certfile", str(self.certs.server_cert),
                     "--ssl-keyfile", str(self.certs.server_key)]  # fmt: skip
        else:
            argv.append("--insecure")
        return argv

    def start_superlink(self, timeout: float = 60.0) -> Proc:
        p = self._spawn("superlink", self.superlink_argv())
        self._wait_for_log(p, "Uvicorn running", timeout)
        return p

    def node_argv(self, node: NodeSpec, port: int) -> list[str]:
        argv = [str(BIN / "flower-supernode"), "--superlink", self.address,
                "--port", str(port), "--node-config", node.node_config()]  # fmt: skip
        argv += ["--root-certificates", str(self.certs.ca_cert)] if self.certs else ["--insecure"]
        if node.key is not None:
            argv += ["--auth-supernode-private-key", str(node.key)]
        return argv

    def register(self, client_id: str, *, bind: bool = True) -> tuple[Path, int]:
        """A key pair under ``root/keys`` registered with the SuperLink (``flwr supernode
        register``); returns (private key, node id). ``bind``: the client's key from now
        on (reused by later calls for the same client)."""
        from fmtl_lightning.deploy.auth import register_key
        from fmtl_lightning.deploy.tls import write_node_key

        if bind and client_id in self.keys:
            return self.keys[client_id], self.node_ids[client_id]
        name = client_id if bind else f"{client_id}-extra-{len(list(self.root.glob('keys/*')))}"
        key = write_node_key(self.root / "keys", name)
        nid = register_key(key.public, "local", env=self.env, flwr=str(BIN / "flwr"))
        if bind:
            self.keys[client_id], self.node_ids[client_id] = key.private, nid
        return key.private, nid

    def start_node(self, node: NodeSpec, timeout: float = 60.0) -> Proc:
        return self.start_nodes([node], timeout)[0]

    def start_nodes(
        self, nodes: list[NodeSpec], timeout: float = 60.0, *, wait: bool = True
    ) -> list[Proc]:
        """Start SuperNodes side by side; returns once each has connected (``wait``), or
        at once (e.g. a node the SuperLink is expected to refuse). Under node
        authentication a node without ``key`` gets its client's registered key."""
        if self.node_auth:  # register the keys side by side (one `flwr` call each)
            from concurrent.futures import ThreadPoolExecutor

            todo = [n for n in nodes if n.key is None]
            with ThreadPoolExecutor(max(1, len(todo))) as pool:
                keys = list(pool.map(lambda n: self.register(n.client_id)[0], todo))
            for node, key in zip(todo, keys, strict=True):
                node.key = key
        procs, workers = [], []
        for node in nodes:
            node.state_dir.mkdir(parents=True, exist_ok=True)
            name = f"node-{node.client_id}"
            name += f"-{len(self.procs)}" if name in self.procs else ""
            if node.worker_socket is not None:  # started first: it imports torch meanwhile
                workers.append(self.start_worker(node, name))
            procs.append(self._spawn(name, self.node_argv(node, free_port())))
        for p in procs if wait else []:
            self._wait_for_log(p, "SuperNode ID", timeout)
        for p in workers if wait else []:  # importing torch on a busy machine: minutes
            self._wait_for_log(p, "fmtl worker ready", max(timeout, 300.0))
        return procs

    def start_worker(self, node: NodeSpec, node_name: str) -> Proc:
        """``node``'s worker, in :attr:`workers` (:attr:`procs` holds Flower's processes),
        paired with the SuperNode ``node_name``: :meth:`kill` of the node kills it too."""
        old = self.workers.pop(node_name, None)
        if old is not None:
            self._kill_proc(old, signal.SIGTERM)
        name = f"worker-{node_name.removeprefix('node-')}"
        argv = [sys.executable, "-m", "fmtl_lightning.deploy.worker", "--state-dir",
                str(node.state_dir), "--socket", str(node.worker_socket)]  # fmt: skip
        p = self._spawn(name, argv, register=False)
        self.workers[node_name] = p
        return p

    def _wait_for_log(self, p: Proc, text: str, timeout: float) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if text in p.log.read_text(errors="replace"):
                p.refresh()
                return
            if p.popen.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"{p.name} did not start (no {text!r} in {p.log}):\n"
                           + p.log.read_text(errors="replace")[-3000:])  # fmt: skip

    # ------------------------------------------------------------------ run
    def run(
        self,
        app_dir: str | Path,
        run_config: Mapping[str, Any],
        *,
        timeout: float = 600.0,
        num_supernodes: int | None = None,
    ) -> subprocess.CompletedProcess:
        """``flwr run APP local --stream --run-config ...``: blocks until the run ends.
        Note: ``flwr run`` exits 0 even when the ServerApp fails; check the run dir."""
        from fmtl_lightning.deploy.auth import format_node_ids

        rc = dict(run_config)
        if self.node_auth:
            rc.setdefault("node-ids", format_node_ids(self.node_ids))
        else:
            rc.setdefault("node-auth", False)
        argv = [str(BIN / "flwr"), "run", str(Path(app_dir).absolute()), "local", "--stream",
                "--run-config", kv_string(rc)]  # fmt: skip
        if num_supernodes is not None:
            argv += ["--federation-config", f"num-supernodes={int(num_supernodes)}"]
        for p in self.procs.values():
            p.refresh()
        res = subprocess.run(argv, env=self.env, cwd=self.root, capture_output=True, text=True,
                             timeout=timeout, start_new_session=True)  # fmt: skip
        (self.root / "logs" / "flwr-run.log").open("a").write(res.stdout + res.stderr)
        return res

    # ------------------------------------------------------------------ stop
    def kill(self, name: str, sig: int = signal.SIGKILL) -> list[int]:
        """Kill process ``name``'s tree (a SuperNode: with its worker, as a machine
        failure would); returns pids still alive (should be none)."""
        worker = self.workers.pop(name, None)
        left = self._kill_proc(worker, sig) if worker is not None else []
        return left + self._kill_proc(self.procs.pop(name), sig)

    def _kill_proc(self, p: Proc, sig: int) -> list[int]:
        p.refresh()
        left = kill_tree(p.popen.pid, sig)
        try:
            p.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        left = [q for q in left if alive(q)]  # a big process may take a moment to exit
        return left + [q for q in p.pids_seen if alive(q) and q not in left]

    def stop(self) -> list[int]:
        """Stop every process (nodes first); returns pids still alive (should be none)."""
        left: list[int] = []
        for name in sorted(self.procs, key=lambda n: n == "superlink"):
            left += self.kill(name, signal.SIGTERM)
        for name in list(self.workers):  # workers whose node was never started
            left += self._kill_proc(self.workers.pop(name), signal.SIGTERM)
        return left

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
