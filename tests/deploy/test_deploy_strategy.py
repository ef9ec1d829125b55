"""The deployed server without a network: FMTLStrategy and DeployedRun on a fake Grid.

Nodes are plain functions from a Message to a reply Message, so every rule of the
strategy (registration, slicing per width, reply validation, failures, checkpoints,
resume) is checked exactly, in milliseconds.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402

from fmtl_lightning.aggregation import ClientUpdate, aggregate  # noqa: E402
from fmtl_lightning.config import ConfigError, parse_config  # noqa: E402
from fmtl_lightning.deploy.server_app import DeployedRun  # noqa: E402
from fmtl_lightning.deploy.strategy import FMTLStrategy  # noqa: E402
from fmtl_lightning.engine import ServerEngine  # noqa: E402
from fmtl_lightning.engine.plan import server_plan  # noqa: E402
from fmtl_lightning.engine.seeds import phase_seed  # noqa: E402
from fmtl_lightning.roles import WidthSpec  # noqa: E402
from fmtl_lightning.slicing import slice_state  # noqa: E402
from mobile_client.flower_app import (  # noqa: E402
    INFO_RECORD,
    NodeConfigError,
    NodeSettings,
    TrainInstructions,
    from_record,
    info_reply,
    read_train_message,
    reply_message,
    to_record,
)

CFG = {
    "name": "t",
    "seed": 3,
    "data": {"samples_per_client": 60, "partition": {"kind": "iid"}},
    "model": {"family": "mlp", "hidden": [8, 4], "norm": "none"},
    "clients": [
        {"count": 1, "tasks": ["digits/digit"], "width": 1.0},
        {"count": 1, "tasks": ["digits/digit"], "width": 0.5},
        {"count": 1, "tasks": ["digits/parity"], "width": 0.25},
    ],
    "algorithm": {"name": "fedper", "weighting": "uniform"},
    "federation": {"rounds": 2, "batch_size": 16},
    "compare_local": False,
}
NODE_CONFIG = {
    101: {"client-id": "c00", "width": 1.0, "tasks": "digits/digit"},
    102: {"client-id": "c01", "width": 0.5, "tasks": "digits/digit"},
    103: {"client-id": "c02", "width": 0.25, "tasks": "digits/parity"},
}
Handler = Callable[[Message], Message | None]


def _ctx(node_id: int, node_config: dict) -> Context:
    return Context(0, node_id, node_config, RecordDict(), {})


def good_node(node_id: int, delta: float = 1.0) -> Handler:
    """Replies to info queries from its node config; 'trains' by adding ``delta``."""

    def handle(msg: Message) -> Message:
        ctx = _ctx(node_id, NODE_CONFIG[node_id])
        if msg.metadata.message_type.startswith("query"):
            return info_reply(msg, ctx)
        arrays, ins = read_train_message(msg)
        return reply_message(msg, {k: v + delta for k, v in arrays.items()}, 10, {"loss": 1.0}, ins)

    return handle


class FakeGrid:
    """Nodes answer at once; a node in ``hold`` answers only after ``release()`` (late)."""

    def __init__(self, handlers: dict[int, Handler]) -> None:
        self.handlers = handlers
        self.sent: list[Message] = []
        self.replies: dict[str, Message] = {}
        self.hold: set[int] = set()
        self.held: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.handlers)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            self.sent.append(m)
            mid = f"m{len(self.sent)}"
            ids.append(mid)
            r = self.handlers[m.metadata.dst_node_id](m)
            if r is not None:
                (self.held if m.metadata.dst_node_id in self.hold else self.replies)[mid] = r
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def release(self) -> None:
        self.replies.update(self.held)
        self.held.clear()

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            self.sent.append(m)
            r = self.handlers[m.metadata.dst_node_id](m)
            if r is not None:
                out.append(r)
        return out


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages are stamped with the run/task of the process (set by Flower in a run)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1, raising=False)


@pytest.fixture
def plan():
    return server_plan(parse_config(copy.deepcopy(CFG)))


def _strategy(plan, grid) -> FMTLStrategy:
    s = FMTLStrategy(ServerEngine(plan, "unused"), reply_timeout=5.0)
    s.register(grid)
    return s


def _round(s: FMTLStrategy, grid: FakeGrid, r: int = 1):
    from flwr.app import ArrayRecord

    msgs = list(s.configure_train(r, ArrayRecord(), ConfigRecord(), grid))
    return s.aggregate_train(r, grid.send_and_receive(msgs))


def test_registration_reads_node_configs_and_refuses_bad_claims(plan):
    handlers = {n: good_node(n) for n in NODE_CONFIG}
    NODE_CONFIG[104] = {"client-id": "c09", "width": 1.0, "tasks": "digits/digit"}
    NODE_CONFIG[105] = {"client-id": "c01", "width": 0.5, "tasks": "digits/digit"}
    NODE_CONFIG[106] = {"client-id": "c02", "width": 0.25, "tasks": "digits/digit"}
    try:
        handlers.update({n: good_node(n) for n in (104, 105, 106)})
        s = _strategy(plan, FakeGrid(handlers))
        alone = _strategy(plan, FakeGrid({106: good_node(106)}))
    finally:
        for n in (104, 105, 106):
            NODE_CONFIG.pop(n)
    assert {n: (v.client.client_id, v.width) for n, v in s.nodes.items()} == {
        101: ("c00", 1.0),
        102: ("c01", 0.5),
        103: ("c02", 0.25),
    }
    assert "'c09' is not in the run config" in s.refused[104]
    assert "already node 102" in s.refused[105]
    assert "already node 103" in s.refused[106]
    assert (
        "tasks ['digits/digit'] differ from the run config's ['digits/parity']"
        in (alone.refused[106])
    )
    # node 102 goes away; a new node may then take client c01
    NODE_CONFIG[107] = NODE_CONFIG[102]
    try:
        grid = FakeGrid({n: good_node(n) for n in (101, 103, 107)})
        assert [n.client.client_id for n in s.register(grid)] == ["c01"]
    finally:
        NODE_CONFIG.pop(107)
    assert sorted(s.nodes) == [101, 103, 107]


def test_each_node_gets_the_global_state_sliced_to_its_width_with_hash_and_seed(plan):
    grid = FakeGrid({n: good_node(n) for n in NODE_CONFIG})
    s = _strategy(plan, grid)
    grid.sent.clear()
    _round(s, grid)
    for m in grid.sent:
        arrays, ins = read_train_message(m)  # checks the hash
        ws = WidthSpec(ins.width, "heterofl", 0)
        want = slice_state(plan.initial_state, plan.spec, ws)
        assert set(arrays) == set(plan.shared_keys)
        for k in want:
            np.testing.assert_array_equal(arrays[k], want[k])
        assert ins.batch_seed == phase_seed(3, 0, ins.client_idx, "global")
        assert ins.run_config and "digits/parity" in ins.run_config
    rep = s.report
    assert [rep.sent[c]["width"] for c in ("c00", "c01", "c02")] == [1.0, 0.5, 0.25]
    assert (
        rep.sent["c00"]["bytes_down"]
        > rep.sent["c01"]["bytes_down"]
        > rep.sent["c02"]["bytes_down"]
    )


def test_aggregate_equals_the_pure_function_on_the_same_updates(plan):
    grid = FakeGrid(
        {n: good_node(n, delta=d) for n, d in zip(NODE_CONFIG, (1.0, 2.0, 4.0), strict=True)}
    )
    s = _strategy(plan, grid)
    arrays, metrics = _round(s, grid)
    ups = []
    for cid, w, d in (("c00", 1.0, 1.0), ("c01", 0.5, 2.0), ("c02", 0.25, 4.0)):
        ws = WidthSpec(w, "heterofl", 0)
        sub = slice_state(plan.initial_state, plan.spec, ws)
        ups.append(ClientUpdate(cid, {k: v + d for k, v in sub.items()}, 10, ws))
    want = aggregate(plan.initial_state, ups, plan.spec, weighting="uniform")
    got = from_record(arrays)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
        np.testing.assert_array_equal(s.engine.global_state[k], want[k])
    assert metrics["accepted"] == 3 and metrics["failed"] == 0 and metrics["loss"] == 1.0


@pytest.mark.parametrize(
    "aggregator",
    ["median", {"name": "trimmed_mean", "beta": 0.34}, {"name": "norm_bounded", "clip_norm": 0.3}],
)
def test_the_strategy_runs_the_configured_aggregator(aggregator):
    """The strategy folds replies with ``algorithm.aggregator``: its result is that rule
    on the same updates, and differs from the mean (a width-1/4 client sends +100)."""
    raw = copy.deepcopy(CFG)
    raw["algorithm"]["aggregator"] = aggregator
    plan = server_plan(parse_config(raw))
    deltas = (1.0, 2.0, 100.0)
    grid = FakeGrid({n: good_node(n, delta=d) for n, d in zip(NODE_CONFIG, deltas, strict=True)})
    s = _strategy(plan, grid)
    arrays, metrics = _round(s, grid)
    ups = []
    for cid, w, d in zip(("c00", "c01", "c02"), (1.0, 0.5, 0.25), deltas, strict=True):
        ws = WidthSpec(w, "heterofl", 0)
        sub = slice_state(plan.initial_state, plan.spec, ws)
        ups.append(ClientUpdate(cid, {k: v + d for k, v in sub.items()}, 10, ws))
    rule = plan.cfg.algorithm.aggregator
    want = rule(plan.initial_state, ups, plan.spec, weighting="uniform")
    mean = aggregate(plan.initial_state, ups, plan.spec, weighting="uniform")
    got = from_record(arrays)
    assert metrics["accepted"] == 3
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    k0 = sorted(want)[0]  # its first element is held by all three: the outlier moves
    g0 = plan.initial_state[k0].flat[0]  # the mean, not the robust rule
    assert abs(want[k0].flat[0] - g0) < 3.0 < abs(mean[k0].flat[0] - g0)


def _bad(kind: str) -> Handler:
    base = good_node(102)

    def handle(msg: Message) -> Message | None:
        if msg.metadata.message_type.startswith("query"):
            return base(msg)
        arrays, ins = read_train_message(msg)
        k0 = sorted(arrays)[0]
        if kind == "extra":
            arrays["heads.digits__digit.weight"] = np.zeros((10, 4), np.float32)
        elif kind == "shape":
            arrays[k0] = np.zeros((3, 3), np.float32)
        elif kind == "nan":
            arrays[k0] = arrays[k0].copy()
            arrays[k0].flat[0] = np.nan
        elif kind == "hash":
            ins = TrainInstructions(**{**ins.__dict__, "base_hash": "0" * 64})
        elif kind == "silent":
            return None
        elif kind == "error":
            from flwr.app import Error

            return Message(Error(code=1, reason="boom"), reply_to=msg)
        return reply_message(msg, arrays, 10, {}, ins)

    return handle


@pytest.mark.parametrize(
    "kind,where,words",
    [
        ("extra", "rejected", "unexpected 1 key(s): ['heads.digits__digit.weight']"),
        ("shape", "rejected", "does not match"),
        ("nan", "rejected", "non-finite"),
        ("hash", "rejected", "base model hash"),
        ("silent", "failed", "no reply within reply-timeout (5 s)"),
        ("error", "failed", "boom"),
    ],
)
def test_a_bad_reply_is_recorded_and_the_round_goes_on_without_it(plan, kind, where, words):
    grid = FakeGrid({101: good_node(101), 102: _bad(kind), 103: good_node(103)})
    s = _strategy(plan, grid)
    before = {k: v.copy() for k, v in s.engine.global_state.items()}
    _, metrics = _round(s, grid)
    rep = s.report
    assert sorted(rep.accepted) == ["c00", "c02"]
    assert list(getattr(rep, where)) == ["c01"] and words in getattr(rep, where)["c01"]
    assert metrics[where] == 1
    # the result is what the two good clients alone give
    ups = [
        ClientUpdate(c, {k: v + 1.0 for k, v in slice_state(before, plan.spec, WidthSpec(w)).items()},
                     10, WidthSpec(w))
        for c, w in (("c00", 1.0), ("c02", 0.25))
    ]  # fmt: skip
    want = aggregate(before, ups, plan.spec, weighting="uniform")
    for k in want:
        np.testing.assert_array_equal(s.engine.global_state[k], want[k])


def test_server_checkpoints_every_round_and_resumes_after_the_last(plan, tmp_path):
    cfg = parse_config(copy.deepcopy(CFG))
    grid = FakeGrid({n: good_node(n) for n in NODE_CONFIG})
    run = DeployedRun(cfg, tmp_path / "run", reply_timeout=5.0)
    run.wait_for_nodes(grid, 0, 1.0)
    run.run_round(grid, 1)
    g1 = {k: v.copy() for k, v in run.engine.global_state.items()}
    meta = json.loads((tmp_path / "run/checkpoints/round_0001/meta.json").read_text())
    assert meta["clients_trained"] == ["c00", "c01", "c02"]
    assert set(meta["report"]["times"]) >= {"configure", "wait", "aggregate", "checkpoint"}

    again = DeployedRun(cfg, tmp_path / "run", reply_timeout=5.0)  # a restarted server
    assert again.start_round == 1
    for k in g1:
        np.testing.assert_array_equal(again.engine.global_state[k], g1[k])
    summary = again.run(grid, 2, 0, 1.0)
    assert summary["resumed_after"] == 1 and [r["round"] for r in summary["per_round"]] == [1, 2]
    other = copy.deepcopy(CFG)
    other["seed"] = 4
    with pytest.raises(ConfigError, match="holds rounds of another config"):
        DeployedRun(parse_config(other), tmp_path / "run", reply_timeout=5.0)


def test_plan_starts_from_the_simulators_initial_state():
    from fmtl_lightning.simulation import Simulation

    cfg = parse_config(copy.deepcopy(CFG))
    p = server_plan(cfg)
    sim = Simulation(cfg, "/tmp/unused-fmtl-sim", progress=False)
    assert p.shared_keys == sim.shared_keys
    for k, v in sim.global_state.items():
        np.testing.assert_array_equal(p.initial_state[k], v)


def test_the_deployed_server_refuses_label_split_it_cannot_honour(tmp_path):
    raw = copy.deepcopy(CFG)
    raw["algorithm"] = {"name": "fedavg", "masked_ce": True, "aggregator": "label_split"}
    with pytest.raises(ConfigError, match="algorithm.aggregator: label_split needs each client"):
        DeployedRun(parse_config(raw), tmp_path / "run", reply_timeout=5.0)
    assert not (tmp_path / "run").exists()  # refused before anything is written


@pytest.mark.parametrize(
    "cfg,words",
    [
        ({"width": 1.0, "tasks": "a/b"}, "'client-id' is missing"),
        ({"client-id": "c0", "width": 1.5, "tasks": "a/b"}, "'width' must be in (0, 1]"),
        ({"client-id": "c0", "width": 1.0, "tasks": "a/b", "runtime": "gpu"}, "'runtime'"),
        ({"client-id": "c0", "width": 1.0, "tasks": "a/b", "runtime": "edge"}, "'bundle'"),
    ],
)
def test_node_config_errors_name_the_key(cfg, words):
    with pytest.raises(NodeConfigError) as ei:
        NodeSettings.from_node_config(cfg)
    assert words in str(ei.value)


def test_info_reply_and_instructions_round_trip():
    s = NodeSettings.from_node_config(NODE_CONFIG[102])
    msg = Message(RecordDict(), dst_node_id=102, message_type="query.fmtl_info")
    r = info_reply(msg, _ctx(102, NODE_CONFIG[102]))
    assert dict(r.content[INFO_RECORD]) == dict(s.info_record())
    ins = TrainInstructions(2, 1, "c01", 1, 0.5, "fedrolex", "ab", 1, 16, 0.1, -1, 7, "")
    assert TrainInstructions.from_record(ins.to_record()) == ins
    assert ins.steps_or_none is None
    rec = to_record({"a": np.arange(6, dtype=np.float32).reshape(2, 3)})
    np.testing.assert_array_equal(from_record(rec)["a"], np.arange(6).reshape(2, 3))


def test_edge_and_dispatch_modules_import_without_torch():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['lightning'] = None\n"
        "import mobile_client.flower_app, fmtl_lightning.deploy.client_app\n"
        "import fmtl_lightning.deploy.strategy\n"
        "print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_tls_certificates_verify_for_the_given_hosts(tmp_path):
    from cryptography import x509

    from fmtl_lightning.deploy.tls import write_certificates

    p = write_certificates(tmp_path, ["10.0.0.5", "server.lab"])
    cert = x509.load_pem_x509_certificate(p.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(p.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(map(str, san.get_values_for_type(x509.IPAddress))) == {"10.0.0.5", "127.0.0.1"}
    assert set(san.get_values_for_type(x509.DNSName)) == {"server.lab", "localhost"}
    assert oct(p.server_key.stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("data", [CFG["data"], {"factory": "tests.fmtl_lightning.own_factories:digits28"}],
                         ids=["dataset", "data.factory-28px"])  # fmt: skip
def test_lightning_nodes_in_process_compute_what_the_simulator_computes(tmp_path, data):
    """Real Lightning node handlers (one reading its own .npz) behind a fake Grid:
    two deployed rounds equal two in-process rounds; heads persist in state-dir; the
    deployed metric rows and summary (every node scoring the aggregated model) are
    the simulation's, and the deploy report prints the simulation's table. Also with
    ``data.factory`` bringing the built-in tasks' data at 28x28 (their dataset: 8x8):
    the server, the nodes and the own-file node all take the factory's image size."""
    from fmtl_lightning.deploy.cli import deploy_report
    from fmtl_lightning.deploy.lightning_client import lightning_evaluate, lightning_train
    from fmtl_lightning.deploy.prepare import write_client_data
    from fmtl_lightning.engine.metrics import summarize
    from fmtl_lightning.report import format_table
    from fmtl_lightning.simulation import Simulation

    cfg = parse_config({**copy.deepcopy(CFG), "data": data})
    sim = Simulation(cfg, tmp_path / "sim", progress=False)
    assert sim.fed.image_size == (28 if "factory" in data else 8)
    own = write_client_data(sim.fed.clients[2], tmp_path / "c02.npz")
    configs = {n: {**NODE_CONFIG[n], "state-dir": str(tmp_path / f"n{n}")} for n in NODE_CONFIG}
    configs[103]["data"] = str(own)  # c02 trains on its own file, not on the dataset

    def node(n: int) -> Handler:
        def handle(msg: Message) -> Message:
            ctx = _ctx(n, configs[n])
            kind = msg.metadata.message_type
            if kind.startswith("query"):
                return info_reply(msg, ctx)
            return (lightning_evaluate if kind == "evaluate" else lightning_train)(msg, ctx)

        return handle

    grid = FakeGrid({n: node(n) for n in configs})
    run = DeployedRun(cfg, tmp_path / "run", reply_timeout=5.0)
    summary = run.run(grid, 2, 0, 1.0)
    sim.run_round()
    sim.run_round()
    for k, v in sim.global_state.items():
        np.testing.assert_allclose(run.engine.global_state[k], v, rtol=0, atol=1e-6, err_msg=k)
    rep = run.strategy.history[-1]
    assert sorted(rep.accepted) == ["c00", "c01", "c02"] and not rep.rejected and not rep.failed
    assert sorted(rep.evaluated) == ["c00", "c01", "c02"] and not rep.not_evaluated
    assert set(rep.evaluated["c02"]) >= {"acc/digits/parity", "test-loss", "num-examples"}
    assert [m.metadata.message_type for m in grid.sent[-3:]] == ["evaluate"] * 3
    # the same rows as the simulation (eval_every 1: both rounds), the same summary
    got, want = run.engine.history, sim.history
    assert [(r["round"], r["client"], r["width"], r["task"], r["acc"]) for r in got] == [
        (r["round"], r["client"], r["width"], r["task"], r["acc"]) for r in want
    ]
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], atol=1e-5)
    ref = summarize(want, "fedper", "t")
    assert {c: v["acc"] for c, v in summary["clients"].items()} == {
        c: v["acc"] for c, v in ref["clients"].items()
    }
    assert summary["mean_acc"] == ref["mean_acc"] and summary["not_evaluated"] == {}
    assert format_table(ref) in deploy_report(summary)
    from mobile_client.safetensors_np import load_file

    for n, cid in ((101, "c00"), (103, "c02")):
        arrays, meta = load_file(tmp_path / f"n{n}" / "client.safetensors")
        assert meta == {"client_id": cid, "round": "2"}
        for k, v in sim.pool.stores[cid].local.items():
            np.testing.assert_allclose(arrays[f"local/{k}"], v, rtol=0, atol=1e-6, err_msg=k)


# --- issue 16: hostile replies (defects 6, 7, 8) ---------------------------------------------


def custom_node(node_id: int, *, arrays=None, n=10, metrics=None, content=None, rounds=None):
    """A node whose train reply is altered in ``rounds`` (default: every round):
    ``arrays(dict) -> dict``, ``n``, ``metrics`` or ``content(RecordDict) -> RecordDict``."""
    base = good_node(node_id)

    def handle(msg: Message) -> Message:
        if msg.metadata.message_type.startswith("query"):
            return base(msg)
        got, ins = read_train_message(msg)
        if rounds is not None and ins.round not in rounds:
            return base(msg)
        st = {k: v + 1.0 for k, v in got.items()}
        if arrays is not None:
            st = arrays(st)
        reply = reply_message(msg, st, n, {"loss": 1.0} if metrics is None else metrics, ins)
        if content is not None:
            return Message(content(reply.content), reply_to=msg)
        return reply

    return handle


def _good_pair_result(plan, before):
    ups = [
        ClientUpdate(c, {k: v + 1.0 for k, v in slice_state(before, plan.spec, WidthSpec(w)).items()},
                     10, WidthSpec(w))
        for c, w in (("c00", 1.0), ("c02", 0.25))
    ]  # fmt: skip
    return aggregate(before, ups, plan.spec, weighting=plan.cfg.algorithm.weighting)


def _npy(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _with_array(fn):
    """Replace the first array of the reply with ``fn(Array) -> Array``."""
    from flwr.app import ArrayRecord

    def content(c: RecordDict) -> RecordDict:
        rec = c["arrays"]
        k0 = sorted(rec)[0]
        new = ArrayRecord({k: (fn(v) if k == k0 else v) for k, v in rec.items()})
        return RecordDict({"arrays": new, "metrics": c["metrics"], "config": c["config"]})

    return content


def _raw(data: bytes, stype: str = "numpy.ndarray"):
    from flwr.app import Array

    return lambda a: Array(a.dtype, tuple(a.shape), stype, data)


def _swap(name: str, rec):
    def content(c: RecordDict) -> RecordDict:
        return RecordDict({**{k: c[k] for k in c}, name: rec})

    return content


MALFORMED = {
    "empty data": _with_array(_raw(b"")),
    "truncated": _with_array(lambda a: _raw(a.data[:-3])(a)),
    "padded": _with_array(lambda a: _raw(a.data + b"\0\0\0\0")(a)),
    "pickled": _with_array(_raw(_npy(np.array([{"x": 1}], dtype=object)))),
    "npz bytes": _with_array(_raw(b"PK\x03\x04" + b"\0" * 64)),
    "lying header": _with_array(
        lambda a: _raw(a.data.replace(b"'shape': (", b"'shape': (99999999999, ", 1))(a)
    ),
    "not numpy": _with_array(lambda a: _raw(a.data, "torch.raw")(a)),
    "metrics record is a config": _swap("metrics", ConfigRecord({"num-examples": 10})),
    "config record is an array record": _swap("config", to_record({"x": np.zeros(1)})),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_a_malformed_reply_is_one_rejected_client_never_the_round(plan, kind):
    """An Array with empty data raised EOFError out of aggregate_train (the round died)."""
    grid = FakeGrid({101: good_node(101), 102: custom_node(102, content=MALFORMED[kind]),
                     103: good_node(103)})  # fmt: skip
    s = _strategy(plan, grid)
    before = {k: v.copy() for k, v in s.engine.global_state.items()}
    _, metrics = _round(s, grid)
    rep = s.report
    assert sorted(rep.accepted) == ["c00", "c02"] and list(rep.rejected) == ["c01"]
    assert rep.rejected["c01"].startswith("client 'c01'")
    assert metrics["rejected"] == 1 and metrics["failed"] == 0
    want = _good_pair_result(plan, before)
    for k in want:
        np.testing.assert_array_equal(s.engine.global_state[k], want[k])


def test_an_empty_array_reply_leaves_a_checkpoint_and_the_run_goes_on(tmp_path):
    cfg = parse_config(copy.deepcopy(CFG))
    bad = custom_node(102, content=MALFORMED["empty data"], rounds={1})
    grid = FakeGrid({101: good_node(101), 102: bad, 103: good_node(103)})
    run = DeployedRun(cfg, tmp_path / "run", reply_timeout=5.0)
    summary = run.run(grid, 2, 0, 1.0)
    assert [r["accepted"] for r in summary["per_round"]] == [["c00", "c02"], ["c00", "c01", "c02"]]
    assert "key " in summary["per_round"][0]["rejected"]["c01"]
    assert "not an .npy array (0 bytes)" in summary["per_round"][0]["rejected"]["c01"]


def test_check_reply_raises_only_reply_rejected_on_fuzzed_replies(plan):
    """Random bytes, shapes, dtypes and record values in a reply: ReplyRejected or accepted."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from fmtl_lightning.deploy.strategy import ReplyRejected

    grid = FakeGrid({n: good_node(n) for n in NODE_CONFIG})
    s = _strategy(plan, grid)
    from flwr.app import Array, ArrayRecord, MetricRecord

    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    msg = next(m for m in msgs if m.metadata.dst_node_id == 102)
    good = good_node(102)(msg)
    keys = sorted(good.content["arrays"])
    scalars = st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(), st.text(max_size=8))
    arrays = st.builds(
        lambda dtype, shape, stype, data: Array(dtype, tuple(shape), stype, data),
        st.sampled_from(["float32", "float64", "int64", "object", "<U3"]),
        st.lists(st.integers(-2, 40), max_size=3),
        st.sampled_from(["numpy.ndarray", "torch.raw", ""]),
        st.one_of(
            st.binary(max_size=300),
            st.sampled_from([b"", _npy(np.zeros((4, 8), np.float32)), _npy(np.zeros(3))]),
            st.builds(
                lambda b, i: b[:i],
                st.sampled_from([_npy(np.ones((2, 2), np.float32))]),
                st.integers(0, 200),
            ),
        ),
    )

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.dictionaries(st.sampled_from(keys + ["x"]), arrays, max_size=3),
        st.dictionaries(st.sampled_from(["num-examples", "loss", "acc/x"]), scalars, max_size=3),
        st.dictionaries(st.sampled_from(["client-id", "round", "base-hash"]), scalars, max_size=3),
        st.booleans(),
    )
    def check(bad_arrays, metrics, config, keep_rest):
        c = good.content
        rec = ArrayRecord({**({k: v for k, v in c["arrays"].items()} if keep_rest else {}),
                           **bad_arrays})  # fmt: skip
        mr = {**dict(c["metrics"]), **{k: v for k, v in metrics.items()
                                        if isinstance(v, int | float)}}  # fmt: skip
        cr = {**dict(c["config"]), **config}
        reply = Message(RecordDict({"arrays": rec, "metrics": MetricRecord(mr),
                                    "config": ConfigRecord(cr)}), reply_to=msg)  # fmt: skip
        try:
            s.check_reply(reply)
        except ReplyRejected as exc:
            assert str(exc).startswith("client 'c01'")

    check()


def _examples_cfg() -> dict:
    raw = copy.deepcopy(CFG)
    raw["algorithm"]["weighting"] = "examples"
    return raw


def _fill(value: float):
    def f(st: dict) -> dict:
        k0 = sorted(st)[0]
        return {**st, k0: np.full_like(st[k0], value)}

    return f


def test_a_huge_value_reply_is_rejected_and_the_run_stays_resumable(tmp_path):
    """3e38 (finite float32) times 10 examples overflowed: the round wrote an Inf global
    state, every later reply was rejected, and the server could not restart from it."""
    from safetensors.numpy import load_file

    cfg = parse_config(_examples_cfg())
    bad = custom_node(102, arrays=_fill(3e38), rounds={1})
    grid = FakeGrid({101: good_node(101), 102: bad, 103: good_node(103)})
    run = DeployedRun(cfg, tmp_path / "run", reply_timeout=5.0)
    run.wait_for_nodes(grid, 0, 1.0)
    rep = run.run_round(grid, 1)
    assert sorted(rep.accepted) == ["c00", "c02"] and list(rep.rejected) == ["c01"]
    assert "client 'c01', key " in rep.rejected["c01"] and "|x| > 1.84e+19" in rep.rejected["c01"]
    g1 = load_file(str(tmp_path / "run/checkpoints/round_0001/global.safetensors"))
    assert all(np.isfinite(v).all() for v in g1.values())
    again = DeployedRun(cfg, tmp_path / "run", reply_timeout=5.0)  # a restarted server
    assert again.start_round == 1
    summary = again.run(grid, 2, 0, 1.0)
    assert summary["per_round"][1]["accepted"] == ["c00", "c01", "c02"]
    assert all(np.isfinite(v).all() for v in again.engine.global_state.values())


@pytest.mark.parametrize("n,ok", [(2**62, False), (61, False), (60, True), (0, False), (-1, False)])
def test_num_examples_claims_are_bounded_by_max_examples(n, ok):
    """2**62 examples erased every other client's contribution under example weighting.
    The cap defaults to data.samples_per_client (60 in CFG)."""
    plan = server_plan(parse_config(_examples_cfg()))
    grid = FakeGrid({101: good_node(101), 102: custom_node(102, n=n), 103: good_node(103)})
    s = _strategy(plan, grid)
    assert s.engine.max_examples == 60
    _round(s, grid)
    if ok:
        assert sorted(s.report.accepted) == ["c00", "c01", "c02"]
        assert s.report.accepted["c01"]["num_examples"] == 60
    else:
        assert list(s.report.rejected) == ["c01"]
        assert (
            f"num-examples must be an int in [1, 60] (the ServerApp's max-examples), got {n}"
            in (s.report.rejected["c01"])
        )


def test_max_examples_is_configurable_and_checked(plan):
    grid = FakeGrid({101: good_node(101), 102: custom_node(102, n=500), 103: good_node(103)})
    s = FMTLStrategy(ServerEngine(plan, "unused", max_examples=1000), reply_timeout=5.0)
    s.register(grid)
    _round(s, grid)
    assert s.report.accepted["c01"]["num_examples"] == 500
    for bad in (-5, 2**60):
        with pytest.raises(ConfigError, match="max-examples must be in"):
            ServerEngine(plan, "unused", max_examples=bad)


def test_a_node_wider_than_the_plan_is_refused_a_narrower_one_accepted(plan):
    """A node declaring width 1.0 for a 0.5 client was accepted (a log warning) and then
    averaged at full width."""
    wide = {"client-id": "c01", "width": 1.0, "tasks": "digits/digit"}
    narrow = {"client-id": "c00", "width": 0.5, "tasks": "digits/digit"}
    NODE_CONFIG[108], NODE_CONFIG[109] = wide, narrow
    try:
        s = _strategy(plan, FakeGrid({n: good_node(n) for n in (108, 109, 103)}))
    finally:
        NODE_CONFIG.pop(108), NODE_CONFIG.pop(109)
    assert sorted(s.nodes) == [103, 109] and s.nodes[109].width == 0.5
    assert (
        "client 'c01' (node 108): width 1 is wider than the 0.5 the run config gives it"
        in (s.refused[108])
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_metric_is_refused_and_the_round_loss_stays_finite(plan, value):
    """A reply with loss NaN made the round's loss NaN."""
    grid = FakeGrid({101: good_node(101), 102: custom_node(102, metrics={"loss": value}),
                     103: good_node(103)})  # fmt: skip
    s = _strategy(plan, grid)
    _, metrics = _round(s, grid)
    assert list(s.report.rejected) == ["c01"]
    assert "client 'c01' metric 'loss': expected a finite number" in s.report.rejected["c01"]
    assert metrics["loss"] == 1.0


def test_the_round_loss_of_huge_finite_losses_is_finite(plan):
    big = 1.7e308
    grid = FakeGrid({n: custom_node(n, metrics={"loss": big}) for n in NODE_CONFIG})
    s = _strategy(plan, grid)
    _, metrics = _round(s, grid)
    assert len(s.report.accepted) == 3 and metrics["loss"] == big


def test_a_non_finite_aggregate_is_never_adopted_or_written(tmp_path, monkeypatch):
    """Defence in depth: should the aggregator ever return NaN, the server keeps its state."""
    import fmtl_lightning.aggregators.mean as mean_mod  # the default aggregator's math

    def broken(g, ups, spec, **kw):
        return {k: np.full_like(v, np.nan) for k, v in g.items()}

    monkeypatch.setattr(mean_mod, "aggregate", broken)
    cfg = parse_config(copy.deepcopy(CFG))
    grid = FakeGrid({n: good_node(n) for n in NODE_CONFIG})
    run = DeployedRun(cfg, tmp_path / "run", reply_timeout=5.0)
    before = {k: v.copy() for k, v in run.engine.global_state.items()}
    run.wait_for_nodes(grid, 0, 1.0)
    rep = run.run_round(grid, 1)
    assert "non-finite" in rep.failed["<aggregate>"] and "kept" in rep.failed["<aggregate>"]
    for k, v in before.items():
        np.testing.assert_array_equal(run.engine.global_state[k], v)
    assert DeployedRun(cfg, tmp_path / "run", reply_timeout=5.0).start_round == 1


def test_a_node_without_a_score_is_named_with_its_reason_never_averaged(plan, tmp_path):
    """c02's evaluate reply comes from the edge handler (no score: its data file has no
    test split), c01 scores other weights than those sent: neither enters the rows; the
    report names both."""
    from flwr.app import ConfigRecord as CR

    from fmtl_lightning.deploy.cli import deploy_report
    from fmtl_lightning.deploy.edge_eval import edge_evaluate
    from fmtl_lightning.deploy.evaluation import eval_reply

    def scoring(n: int, acc: float, tamper: bool = False) -> Handler:
        base = good_node(n)

        def handle(msg: Message) -> Message:
            if msg.metadata.message_type != "evaluate":
                return base(msg)
            _, ins = read_train_message(msg)
            if tamper:
                rec = ins.to_record()
                rec["base-hash"] = "0" * 64
                ins = TrainInstructions.from_record(CR(rec))
            return eval_reply(msg, ins, {"acc/digits/digit": acc, "loss/digits/digit": 0.5}, 7)

        return handle

    train_only = tmp_path / "train_only.npz"
    np.savez(train_only, x=np.zeros((2, 1, 8, 8), np.float32))
    why = (
        f"edge node: its data file {train_only} has no test split (x_test, y_test__digits__parity)"
    )

    def edge(msg: Message) -> Message:
        if msg.metadata.message_type == "evaluate":
            return edge_evaluate(msg, _ctx(103, {**NODE_CONFIG[103], "runtime": "edge", "bundle": "b",
                                                 "data": str(train_only),
                                                 "state-dir": str(tmp_path / "s")}))  # fmt: skip
        return good_node(103)(msg)

    grid = FakeGrid({101: scoring(101, 0.75), 102: scoring(102, 0.5, tamper=True), 103: edge})
    run = DeployedRun(parse_config(copy.deepcopy(CFG)), tmp_path / "run", reply_timeout=5.0)
    summary = run.run(grid, 1, 0, 1.0)
    assert [(r["client"], r["acc"]) for r in run.engine.history] == [("c00", 0.75)]
    assert summary["mean_acc"] == 0.75 and list(summary["clients"]) == ["c00"]
    assert summary["not_evaluated"]["c02"] == why
    assert "evaluated other weights" in summary["not_evaluated"]["c01"]
    text = deploy_report(summary)
    assert f"c02: no test accuracy: {why}" in text
    assert "mean and worst are over the clients with a score: c00" in text


@pytest.mark.parametrize("algorithm,slicing", [("ditto", "heterofl"), ("fedavg_ft", "fedrolex")])
def test_deployed_scores_equal_the_simulations_with_static_bn_personal_and_fine_tune(
    algorithm, slicing, tmp_path
):
    """A static-batch-norm CNN: the nodes' statistics pass, Ditto's personal model,
    FedAvg-FT's fine-tune on a copy and FedRolex's window give the simulation's rows."""
    from fmtl_lightning.deploy.lightning_client import lightning_evaluate, lightning_train
    from fmtl_lightning.simulation import Simulation

    raw = copy.deepcopy(CFG)
    raw["model"] = {"family": "cnn", "norm": "static_batch"}
    raw["algorithm"] = {"name": algorithm, "weighting": "uniform", "slicing": slicing}
    cfg = parse_config(raw)
    configs = {n: {**NODE_CONFIG[n], "state-dir": str(tmp_path / f"n{n}")} for n in NODE_CONFIG}

    def node(n: int) -> Handler:
        def handle(msg: Message) -> Message:
            ctx, kind = _ctx(n, configs[n]), msg.metadata.message_type
            if kind.startswith("query"):
                return info_reply(msg, ctx)
            return (lightning_evaluate if kind == "evaluate" else lightning_train)(msg, ctx)

        return handle

    run = DeployedRun(cfg, tmp_path / "run", reply_timeout=5.0)
    run.run(FakeGrid({n: node(n) for n in configs}), 2, 0, 1.0)
    sim = Simulation(cfg, tmp_path / "sim", progress=False)
    sim.run_round()
    sim.run_round()
    key = ("round", "client", "width", "task", "acc")
    assert [tuple(r[k] for k in key) for r in run.engine.history] == [
        tuple(r[k] for k in key) for r in sim.history
    ]
    np.testing.assert_allclose([r["loss"] for r in run.engine.history],
                               [r["loss"] for r in sim.history], atol=1e-5)  # fmt: skip
