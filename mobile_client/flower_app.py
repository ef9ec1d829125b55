"""Flower wire protocol of fmtl-lightning, and the edge ClientApp (numpy + onnxruntime + flwr).

The ground floor owns the wire formats, so the records a SuperLink and a SuperNode
exchange are defined here, once, and ``fmtl_lightning.deploy`` imports them.

Messages (Flower ``Message`` API, one ``RecordDict`` each):

* ``query.fmtl_info`` (server -> node): the reply's ``"info"`` ConfigRecord states what
  the node is, from its node config: ``client-id``, ``width``, ``tasks`` (comma
  separated), ``runtime`` (``lightning`` | ``edge``).
* ``train`` (server -> node): ``"arrays"`` ArrayRecord = the global shared arrays cut
  to the node's width (keys are state-dict names), ``"config"`` ConfigRecord =
  :class:`TrainInstructions` (round, width, slicing, base hash of the arrays, local
  training settings, and the run's YAML config for Lightning nodes).
* reply to ``train``: ``"arrays"`` = the trained shared arrays (same keys and shapes),
  ``"metrics"`` MetricRecord (``num-examples``, ``loss``, ``acc/<task>``, ...),
  ``"config"`` ConfigRecord (``client-id``, ``round``, ``width``, ``base-hash``).

Node config (``flower-supernode --node-config '...'``), keys:
``client-id`` (which client of the run config this node is: it names its data shard
and seeds), ``width``, ``tasks``, ``runtime``, ``state-dir`` (heads and personal state
persist there between rounds), and for an edge node ``bundle`` (a directory written
by ``fmtl export``) and ``data`` (an ``.npz`` with ``x`` and ``y__<task>``, as
``fmtl-edge train`` reads). ``delay-s`` sleeps before training (fault-injection tests).

Run the edge node alone with ``clientapp = "mobile_client.flower_app:app"``; in a mixed
federation ``fmtl_lightning.deploy.client_app:app`` dispatches on ``runtime``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SType

from mobile_client.errors import FMTLError, InputError
from mobile_client.inputs import read_client_data, read_npy_bytes
from mobile_client.update import state_hash

INFO_MESSAGE = "query.fmtl_info"
ARRAYS, CONFIG, METRICS, INFO_RECORD = "arrays", "config", "metrics", "info"
RUNTIMES = ("lightning", "edge")
PROTOCOL_VERSION = 1


class NodeConfigError(FMTLError, ValueError):
    """A SuperNode's ``--node-config`` is missing a key or holds a bad value (names it)."""


class ProtocolError(FMTLError, ValueError):
    """A message lacks a record or field, or holds one of the wrong type (names it)."""


# ----------------------------------------------------------------------------- arrays
def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays -> ArrayRecord (keys kept; ``np.save`` bytes, never pickles).

    Shapes travel as they are: a 0-d array (e.g. ``num_batches_tracked``) stays 0-d.
    """
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})


def from_record(record: Any, where: str = ARRAYS) -> dict[str, np.ndarray]:
    """ArrayRecord -> named numpy arrays; an entry that is not one ``.npy`` array
    (empty, truncated, padded, pickled, an object dtype, a header that claims more
    bytes than follow) raises :class:`ProtocolError` naming its key."""
    if not isinstance(record, ArrayRecord):
        raise ProtocolError(f"{where}: expected an ArrayRecord, got {type(record).__name__}")
    return {k: _decode(v, f"{where}: key {k!r}") for k, v in record.items()}


def _decode(a: Any, where: str) -> np.ndarray:
    """One ``Array`` -> ndarray, through the checked ``.npy`` reader (the header must
    account for exactly the bytes that follow it, checked before numpy allocates)."""
    if not isinstance(a, Array) or a.stype != SType.NUMPY or not isinstance(a.data, bytes):
        raise ProtocolError(f"{where}: not a numpy-serialised Array")
    return read_npy_bytes(a.data, where, error=ProtocolError)


# ----------------------------------------------------------------------------- node config
def _path(v: Any) -> Path | None:
    return Path(str(v)).expanduser() if v not in (None, "") else None


@dataclass(frozen=True)
class NodeSettings:
    """What a SuperNode states about itself in its node config (see the module docstring)."""

    client_id: str
    width: float
    tasks: tuple[str, ...]
    runtime: str = "lightning"
    state_dir: Path | None = None
    bundle: Path | None = None
    data: Path | None = None
    delay_s: float = 0.0

    declared: bool = True  # False: a virtual node of Flower's simulation engine

    @classmethod
    def from_context(cls, context: Context) -> NodeSettings:
        """From a ClientApp context: its node config, or, for a virtual node of Flower's
        simulation engine (node config = ``partition-id`` only), client ``c{partition-id}``
        with width and tasks left to the server and state under ``run-dir/sim_nodes``."""
        nc = context.node_config
        if "client-id" not in nc and "partition-id" in nc:
            cid = f"c{int(nc['partition-id']):02d}"
            root = Path(str(context.run_config.get("run-dir", "runs/flower"))) / "sim_nodes"
            return cls(cid, 1.0, (), "lightning", root / cid, declared=False)
        return cls.from_node_config(nc)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSettings:
        def need(key: str) -> Any:
            if key not in node_config or node_config[key] in ("", None):
                raise NodeConfigError(
                    f"node config: key {key!r} is missing (given: {sorted(node_config)}); "
                    'start the SuperNode with --node-config \'client-id="c00" width=1.0 '
                    'tasks="mnist/digit" state-dir="/var/fmtl/c00"\''
                )
            return node_config[key]

        try:
            width = float(need("width"))
        except (TypeError, ValueError) as exc:
            raise NodeConfigError(f"node config: 'width' is {node_config['width']!r}") from exc
        if not 0.0 < width <= 1.0:
            raise NodeConfigError(f"node config: 'width' must be in (0, 1], got {width}")
        tasks = tuple(t.strip() for t in str(need("tasks")).split(",") if t.strip())
        if not tasks:
            raise NodeConfigError("node config: 'tasks' names no task")
        runtime = str(node_config.get("runtime", "lightning"))
        if runtime not in RUNTIMES:
            raise NodeConfigError(f"node config: 'runtime' is {runtime!r}, not one of {RUNTIMES}")
        s = cls(
            client_id=str(need("client-id")),
            width=width,
            tasks=tasks,
            runtime=runtime,
            state_dir=_path(node_config.get("state-dir")),
            bundle=_path(node_config.get("bundle")),
            data=_path(node_config.get("data")),
            delay_s=float(node_config.get("delay-s", 0.0)),
        )
        if runtime == "edge":
            for key in ("bundle", "data", "state-dir"):
                need(key)
        return s

    def info_record(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "client-id": self.client_id,
                "width": self.width,
                "tasks": ",".join(self.tasks),
                "runtime": self.runtime,
                "protocol": PROTOCOL_VERSION,
                "declared": self.declared,
            }
        )


# ----------------------------------------------------------------------------- instructions
@dataclass(frozen=True)
class TrainInstructions:
    """The ``"config"`` record of a train message."""

    round: int  # server round, from 1
    round_idx: int  # 0-based round index (FedRolex window offset, seeds)
    client_id: str
    client_idx: int  # position in the run config's client list (seeds)
    width: float
    slicing: str
    base_hash: str  # state_hash of the arrays sent
    epochs: int
    batch_size: int
    lr: float
    steps: int  # -1: whole epochs
    batch_seed: int  # seed of the batch order (same as the in-process simulator's)
    run_config: str = ""  # YAML of the run (Lightning nodes rebuild the same module)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({k.replace("_", "-"): v for k, v in asdict(self).items()})

    @classmethod
    def from_record(cls, rec: Any) -> TrainInstructions:
        if not isinstance(rec, ConfigRecord):
            raise ProtocolError(f"{CONFIG}: expected a ConfigRecord, got {type(rec).__name__}")
        kw = {}
        for name, f in cls.__dataclass_fields__.items():
            key = name.replace("_", "-")
            if key not in rec:
                if name == "run_config":
                    continue
                raise ProtocolError(f"{CONFIG}: field {key!r} is missing")
            conv = {"int": int, "float": float, "str": str}[str(f.type)]
            kw[name] = conv(rec[key])
        return cls(**kw)

    @property
    def steps_or_none(self) -> int | None:
        return None if self.steps < 0 else self.steps


def reply_message(
    msg: Message,
    shared: Mapping[str, np.ndarray],
    num_examples: int,
    metrics: Mapping[str, float],
    ins: TrainInstructions,
) -> Message:
    """The reply to a train message (see the module docstring)."""
    mr = MetricRecord({"num-examples": int(num_examples)})
    for k, v in metrics.items():
        mr[k] = float(v)
    cr = ConfigRecord(
        {
            "client-id": ins.client_id,
            "round": ins.round,
            "width": ins.width,
            "base-hash": ins.base_hash,
        }
    )
    return Message(RecordDict({ARRAYS: to_record(shared), METRICS: mr, CONFIG: cr}), reply_to=msg)


def read_train_message(msg: Message) -> tuple[dict[str, np.ndarray], TrainInstructions]:
    """Arrays and instructions of a train message; checks the arrays against the hash sent."""
    content = msg.content
    for name in (ARRAYS, CONFIG):
        if name not in content:
            raise ProtocolError(f"train message: record {name!r} is missing")
    received = from_record(content[ARRAYS])
    ins = TrainInstructions.from_record(content[CONFIG])
    got = state_hash(received)
    if got != ins.base_hash:
        raise ProtocolError(
            f"train message: arrays hash {got} differs from 'base-hash' {ins.base_hash}"
        )
    return received, ins


def write_status(state_dir: Path | None, **fields: Any) -> None:
    """``state-dir/status.json``: what the node is doing (round, phase, time), atomically."""
    if state_dir is None:
        return
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".status.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({**fields, "time": time.time(), "pid": os.getpid()}))
    os.replace(tmp, state_dir / "status.json")


# ----------------------------------------------------------------------------- edge node
def info_reply(msg: Message, context: Context) -> Message:
    s = NodeSettings.from_context(context)
    return Message(RecordDict({INFO_RECORD: s.info_record()}), reply_to=msg)


def _edge_data(path: Path, tasks: tuple[str, ...]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    if not path.is_file():
        raise InputError(f"node config 'data': {path} is not a file")
    return read_client_data(path, tasks)


def edge_message(
    msg: Message, context: Context, phase: str
) -> tuple[NodeSettings, dict[str, np.ndarray], TrainInstructions]:
    """An edge node's settings and a train/evaluate message's arrays and instructions,
    once the message is checked to be for this node's client; the node's status file
    then says it is in ``phase`` of the message's round."""
    s = NodeSettings.from_context(context)
    received, ins = read_train_message(msg)
    if ins.client_id != s.client_id:
        raise ProtocolError(f"{msg.metadata.message_type} message for {ins.client_id!r} "
                            f"reached node {s.client_id!r}")  # fmt: skip
    assert s.state_dir is not None and s.bundle is not None and s.data is not None
    write_status(s.state_dir, round=ins.round, phase=phase, client=s.client_id)
    return s, received, ins


def edge_train(msg: Message, context: Context) -> Message:
    """One round on an edge node: the exported SGD step graphs on ONNX Runtime."""
    from mobile_client.runtime import EdgeClient

    s, received, ins = edge_message(msg, context, "training")
    assert s.state_dir is not None and s.bundle is not None and s.data is not None
    if s.delay_s > 0:
        time.sleep(s.delay_s)
    client = EdgeClient(s.bundle, s.client_id)
    local_file = s.state_dir / "local.safetensors"
    if local_file.is_file():  # the heads this device trained in earlier rounds
        client.load_local(local_file)
    x, ys = _edge_data(s.data, tuple(client.entry.tasks))
    res = client.train(
        x,
        ys,
        width=ins.width,
        epochs=ins.epochs,
        batch_size=ins.batch_size,
        lr=ins.lr,
        steps=ins.steps_or_none,
        seed=ins.batch_seed,
        start_from=received,
    )
    client.save_local(local_file)
    write_status(s.state_dir, round=ins.round, phase="done", client=s.client_id)
    return reply_message(msg, res.shared, res.num_examples, res.metrics, ins)


app = ClientApp()
app.query("fmtl_info")(info_reply)
app.train()(edge_train)
