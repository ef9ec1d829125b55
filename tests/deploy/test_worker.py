"""The node-resident worker (warm clients) and its socket protocol, without Flower processes.

Each node's worker (:class:`fmtl_lightning.deploy.worker.Worker`) serves a real Unix
socket from a thread of the test; the ClientApp's handlers forward to it exactly as in
a deployment. Checked: two deployed rounds through the workers equal the in-process
simulator's (1e-6) and the in-ClientApp path's, each node built once for both rounds;
a frame signed with another secret, a malformed frame, a pickle, or a request with bad
fields gets one typed error and runs nothing.
"""

from __future__ import annotations

import copy
import json
import pickle
import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Context, Message, RecordDict  # noqa: E402

from fmtl_lightning.config import parse_config  # noqa: E402
from fmtl_lightning.deploy.worker import Worker, bind, loop, socket_path  # noqa: E402
from fmtl_lightning.deploy.worker_protocol import (  # noqa: E402
    MAGIC,
    VERSION,
    WorkerAuthError,
    WorkerError,
    WorkerProtocolError,
    call,
    decode_arrays,
    encode,
    new_secret,
    read_frame,
    secret_path,
)
from mobile_client.flower_app import info_reply  # noqa: E402

CFG = {
    "name": "t",
    "seed": 3,
    "data": {"samples_per_client": 60, "partition": {"kind": "iid"}},
    "model": {"family": "mlp", "hidden": [8, 4], "norm": "none"},
    "clients": [
        {"count": 1, "tasks": ["digits/digit"], "width": 1.0},
        {"count": 1, "tasks": ["digits/digit"], "width": 0.5},
    ],
    "algorithm": {"name": "fedper", "weighting": "uniform"},
    "federation": {"rounds": 2, "batch_size": 16},
    "compare_local": False,
}
NODE_CONFIG = {
    101: {"client-id": "c00", "width": 1.0, "tasks": "digits/digit"},
    102: {"client-id": "c01", "width": 0.5, "tasks": "digits/digit"},
}


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages are stamped with the run/task of the process (set by Flower in a run)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1, raising=False)


class Served:
    """A worker for ``state_dir`` serving its socket from a daemon thread."""

    def __init__(self, state_dir: Path) -> None:
        self.sock = socket_path(state_dir)
        self.srv = bind(self.sock)
        self.worker = Worker(state_dir, new_secret(self.sock))
        self.thread = threading.Thread(target=loop, args=(self.srv, self.worker), daemon=True)
        self.thread.start()

    def close(self) -> None:
        try:
            self.srv.shutdown(socket.SHUT_RDWR)  # wakes the thread's accept()
        except OSError:
            pass
        self.srv.close()
        self.thread.join(timeout=10)


@pytest.fixture
def served(tmp_path):
    made: list[Served] = []

    def make(state_dir: Path) -> Served:
        s = Served(state_dir)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


class Grid:
    """Nodes answer at once (the deploy tests' fake Grid, reduced)."""

    def __init__(self, handlers) -> None:
        self.handlers = handlers
        self.replies: dict[str, Message] = {}
        self.n = 0

    def get_node_ids(self) -> list[int]:
        return list(self.handlers)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            self.n += 1
            ids.append(f"m{self.n}")
            self.replies[ids[-1]] = self.handlers[m.metadata.dst_node_id](m)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return [self.handlers[m.metadata.dst_node_id](m) for m in messages]


def _deploy(cfg, root: Path, configs: dict[int, dict]):
    """Two deployed rounds; every train/evaluate message goes through the ClientApp."""
    from fmtl_lightning.deploy import client_app
    from fmtl_lightning.deploy.server_app import DeployedRun

    def node(n: int):
        def handle(msg: Message) -> Message:
            ctx = Context(0, n, configs[n], RecordDict(), {})
            kind = msg.metadata.message_type
            if kind.startswith("query"):
                return info_reply(msg, ctx)
            return (client_app.evaluate if kind == "evaluate" else client_app.train)(msg, ctx)

        return handle

    run = DeployedRun(cfg, root, reply_timeout=5.0)
    run.run(Grid({n: node(n) for n in configs}), 2, 0, 1.0)
    return run


def test_two_rounds_through_workers_equal_the_simulator_and_the_in_clientapp_path(tmp_path, served):
    from fmtl_lightning.simulation import Simulation
    from mobile_client.safetensors_np import load_file

    cfg = parse_config(copy.deepcopy(CFG))
    warm_cfg, cold_cfg, workers = {}, {}, {}
    for n, nc in NODE_CONFIG.items():
        warm_dir, cold_dir = tmp_path / f"w{n}", tmp_path / f"c{n}"
        workers[n] = served(warm_dir)
        warm_cfg[n] = {**nc, "state-dir": str(warm_dir), "worker": str(workers[n].sock)}
        cold_cfg[n] = {**nc, "state-dir": str(cold_dir)}
    warm = _deploy(cfg, tmp_path / "run_warm", warm_cfg)
    cold = _deploy(cfg, tmp_path / "run_cold", cold_cfg)
    sim = Simulation(cfg, tmp_path / "sim", progress=False)
    sim.run_round()
    sim.run_round()
    for k, v in sim.global_state.items():
        np.testing.assert_allclose(warm.engine.global_state[k], v, rtol=0, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(cold.engine.global_state[k], v, rtol=0, atol=1e-6, err_msg=k)
    rep = warm.strategy.history[-1]
    assert sorted(rep.accepted) == ["c00", "c01"] and not rep.rejected and not rep.failed
    assert sorted(rep.evaluated) == ["c00", "c01"]
    want = [(r["round"], r["client"], r["task"], r["acc"]) for r in sim.history]
    assert [(r["round"], r["client"], r["task"], r["acc"]) for r in warm.engine.history] == want
    np.testing.assert_allclose([r["loss"] for r in warm.engine.history],
                               [r["loss"] for r in sim.history], atol=1e-6)  # fmt: skip
    for n, cid in ((101, "c00"), (102, "c01")):
        assert workers[n].worker.builds == 1  # warm: built once for 2 trains + 2 evaluates
        arrays, meta = load_file(tmp_path / f"w{n}" / "client.safetensors")
        assert meta == {"client_id": cid, "round": "2"}
        for k, v in sim.pool.stores[cid].local.items():
            np.testing.assert_allclose(arrays[f"local/{k}"], v, rtol=0, atol=1e-6, err_msg=k)
        status = json.loads((tmp_path / f"w{n}" / "status.json").read_text())
        assert status["phase"] == "evaluated" and status["round"] == 2


def _raw(sock: Path, frame: bytes, secret: bytes) -> dict:
    """Send raw bytes; the worker's reply header (read with the worker's secret)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(30)
        c.connect(str(sock))
        c.sendall(frame)
        c.shutdown(socket.SHUT_WR)
        header, arrays = read_frame(c, secret)
    assert arrays == {}
    return header


def _secret(s: Served) -> bytes:
    return bytes.fromhex(secret_path(s.sock).read_text())


def test_a_frame_signed_with_another_secret_is_refused_by_type(tmp_path, served):
    s = served(tmp_path / "n")
    assert call(s.sock, {"op": "ping"}, None)[0]["ok"] is True
    wrong = encode(b"x" * 32, {"op": "ping"}, None)
    reply = _raw(s.sock, wrong, _secret(s))
    assert reply == {"ok": False, "type": "WorkerAuthError",
                     "error": "frame HMAC does not match this node's worker secret"}  # fmt: skip
    # a client holding the wrong secret cannot read the worker's reply either
    secret_path(s.sock).write_text((b"y" * 32).hex())
    with pytest.raises(WorkerAuthError, match="HMAC does not match"):
        call(s.sock, {"op": "ping"}, None)
    secret_path(s.sock).write_text("not hex")
    with pytest.raises(WorkerAuthError, match="not a hex string"):
        call(s.sock, {"op": "ping"}, None)
    with pytest.raises(WorkerError, match="no worker listening"):
        new_secret(tmp_path / "none.sock")
        call(tmp_path / "none.sock", {"op": "ping"}, None)


class Boom:
    def __reduce__(self):
        return (Path.touch, (Path(__file__).parent / "UNPICKLED",))


def _signed(secret: bytes, head: bytes, body: bytes, magic=MAGIC, version=VERSION) -> bytes:
    import hashlib
    import hmac

    prefix = struct.pack(">4sBIQ", magic, version, len(head), len(body))
    return prefix + hmac.new(secret, prefix + head + body, hashlib.sha256).digest() + head + body


@pytest.mark.parametrize(
    "frame, words",
    [
        (lambda k: _signed(k, b'{"op":"ping"}', b"", magic=b"PKL!"), "magic"),
        (lambda k: _signed(k, b'{"op":"ping"}', b"", version=9), "version 9"),
        (lambda k: _signed(k, b'{"op":"ping"}', b"")[:-3], "cut short"),
        (lambda k: struct.pack(">4sBIQ", MAGIC, VERSION, 1 << 30, 0), "too large"),
        (lambda k: _signed(k, b"[1, 2]", b""), "not an object"),
        (lambda k: _signed(k, b"\xff\xfe", b""), "not UTF-8 JSON"),
        (lambda k: _signed(k, b'{"op":"train"}', pickle.dumps(Boom())), "not a safetensors"),
        (lambda k: _signed(k, b'{"op":"rm -rf"}', b""), "'op' is 'rm -rf'"),
        (lambda k: _signed(k, b'{"op":"train","instructions":{"round":1}}', b""), "missing"),
        (lambda k: encode(k, {"op": "train", "instructions": {"round": "1"}}, None), "'round'"),
    ],
    ids=[
        "magic",
        "version",
        "truncated",
        "huge",
        "array-header",
        "bytes-header",
        "pickle",
        "op",
        "missing-field",
        "wrong-type",
    ],  # fmt: skip
)
def test_a_malformed_request_gets_a_typed_error_and_runs_nothing(tmp_path, served, frame, words):
    s = served(tmp_path / "n")
    reply = _raw(s.sock, frame(_secret(s)), _secret(s))
    assert reply["ok"] is False and reply["type"] == "WorkerProtocolError", reply
    assert words in reply["error"], reply
    assert not (Path(__file__).parent / "UNPICKLED").exists()
    assert s.worker.builds == 0
    assert call(s.sock, {"op": "ping"}, None)[0]["ok"] is True  # the worker lives on


def test_a_request_for_another_state_dir_is_refused(tmp_path, served):
    from dataclasses import asdict

    from mobile_client.flower_app import TrainInstructions

    s = served(tmp_path / "n")
    ins = TrainInstructions(1, 0, "c00", 0, 1.0, "heterofl", "ab", 1, 16, 0.1, -1, 7, "x: 1")
    nc = {**NODE_CONFIG[101], "state-dir": str(tmp_path / "elsewhere")}
    with pytest.raises(WorkerError, match="WorkerProtocolError: .*is not this worker's"):
        call(s.sock, {"op": "train", "node_config": nc, "instructions": asdict(ins)}, None)


def test_arrays_travel_as_safetensors_with_their_shapes_and_dtypes():
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
              "n": np.array(7, dtype=np.int64), "e": np.zeros((0, 4), np.float32)}  # fmt: skip
    frame = encode(b"k" * 32, {"a": 1}, arrays)
    head_len = struct.unpack(">4sBIQ", frame[:17])[2]
    body = frame[17 + 32 + head_len :]
    got = decode_arrays(body)
    assert set(got) == set(arrays)
    for k, v in arrays.items():
        assert got[k].shape == v.shape and got[k].dtype == v.dtype
        np.testing.assert_array_equal(got[k], v)
        assert got[k].flags.writeable
    with pytest.raises(WorkerProtocolError, match="not a safetensors"):
        decode_arrays(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
