"""Surface 2: Flower train replies, checked and aggregated by the deployed server's strategy.

Each case runs one real round of :class:`fmtl_lightning.deploy.strategy.FMTLStrategy`
(registration, ``configure_train``, ``aggregate_train``) on a fake grid of three nodes
(widths 1, 1/2, 1/4). Two nodes reply as a good node does; the third's reply is
mutated: its ArrayRecord (``.npy`` bytes, keys, dtypes, shapes, values, record types),
MetricRecord (``num-examples``, metrics), ConfigRecord (client id, round, base hash), or
the message itself (an error, silence, a stranger's reply, duplicates).

The bad reply must be rejected through the strategy's own checks (``ReplyRejected`` /
``ProtocolError``; the catch-all "unexpected ..." branch counts as a traceback), the
good clients accepted, and the new global state must equal :func:`aggregate` over the
replies that should count, each client once.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tests.hostile import forge
from tests.hostile.core import (
    EITHER,
    MUST,
    VALID,
    Case,
    Mut,
    array_problems,
    bound_of,
    judge_accepted,
    layout,
    one_line,
    same_arrays,
)
from tests.hostile.surface_updates import BASE_CFG, BN_CFG

NODES = {101: "c00", 102: "c01", 103: "c02"}


class FakeGrid:
    """Answers info queries as the node configs say; train messages are answered by the case."""

    def __init__(self, plan: Any) -> None:
        self.configs = {
            n: {"client-id": c.client_id, "width": c.width, "tasks": ",".join(c.tasks)}
            for n, c in zip(NODES, plan.clients, strict=True)
        }

    def get_node_ids(self) -> list[int]:
        return list(NODES)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Context, RecordDict

        from mobile_client.flower_app import info_reply

        return [
            info_reply(
                m,
                Context(
                    0,
                    m.metadata.dst_node_id,
                    self.configs[m.metadata.dst_node_id],
                    RecordDict(),
                    {},
                ),
            )
            for m in messages
        ]


class RunIdentity:
    """Messages are stamped with the run/task of the process, which Flower sets in a run."""

    def __enter__(self) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        self.saved = {n: TaskIdentity.__dict__.get(n) for n in ("_run_id", "_task_id", "_node_id")}
        for n in self.saved:
            setattr(TaskIdentity, n, 1)

    def __exit__(self, *exc: object) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        for n, v in self.saved.items():
            setattr(TaskIdentity, n, v)


@dataclass
class Ctx:
    rng: np.random.Generator
    plan: Any
    msg: Any  # the train message to the target node
    arrays: dict[str, np.ndarray]  # what the good node would send back
    ins: Any
    n: int
    other_msgs: list

    def arrays_record(self, arrays: dict[str, Any] | None = None):
        from flwr.app import Array, ArrayRecord

        from mobile_client.flower_app import to_record

        a = self.arrays if arrays is None else arrays
        if all(isinstance(v, np.ndarray) for v in a.values()):
            return to_record(a)
        rec = {}
        for k, v in a.items():
            if isinstance(v, bytes):
                v = Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=v)
            elif isinstance(v, np.ndarray):
                v = Array(np.asarray(v, order="C"))  # 0-d stays 0-d
            rec[k] = v
        return ArrayRecord(rec)

    def reply(
        self,
        *,
        arrays: Any = None,
        metrics: dict | None = None,
        config: dict | None = None,
        records: dict | None = None,
        drop: tuple[str, ...] = (),
        to: Any = None,
    ):
        from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

        rd: dict[str, Any] = {
            "arrays": arrays if isinstance(arrays, ArrayRecord) else self.arrays_record(arrays),
            "metrics": MetricRecord(
                {"num-examples": self.n, "loss": 1.0} if metrics is None else metrics
            ),
            "config": ConfigRecord(
                {
                    "client-id": self.ins.client_id,
                    "round": self.ins.round,
                    "width": self.ins.width,
                    "base-hash": self.ins.base_hash,
                }
                if config is None
                else config
            ),
        }
        rd.update(records or {})
        for d in drop:
            rd.pop(d)
        return Message(RecordDict(rd), reply_to=self.msg if to is None else to)

    def metrics(self, **kw: Any) -> dict:
        m: dict[str, Any] = {"num-examples": self.n, "loss": 1.0}
        for k, v in kw.items():
            k = k.replace("_", "-")
            if v is ...:
                m.pop(k, None)
            else:
                m[k] = v
        return m

    def config(self, **kw: Any) -> dict:
        c: dict[str, Any] = {
            "client-id": self.ins.client_id,
            "round": self.ins.round,
            "width": self.ins.width,
            "base-hash": self.ins.base_hash,
        }
        for k, v in kw.items():
            k = k.replace("_", "-")
            if v is ...:
                c.pop(k, None)
            else:
                c[k] = v
        return c

    def float_key(self) -> str:
        keys = [k for k, v in self.arrays.items() if v.dtype.kind == "f" and v.size]
        return keys[int(self.rng.integers(len(keys)))]


# ----------------------------------------------------------------------------- mutations
def _one(fn: Callable[[Ctx], Any]) -> Callable[[Ctx], list]:
    return lambda c: [fn(c)]


def _arrays(fn: Callable[[Ctx, dict, str], None]) -> Callable[[Ctx], list]:
    """Edit a copy of the good arrays (values may become raw ``.npy`` bytes or Arrays)."""

    def make(c: Ctx) -> list:
        a: dict[str, Any] = dict(c.arrays)
        fn(c, a, c.float_key())
        return [c.reply(arrays=a)]

    return make


def _value(v: float, n: int = 1):
    def fn(c: Ctx, a: dict, k: str) -> None:
        x = a[k].copy().reshape(-1)
        x[c.rng.choice(x.size, size=min(n, x.size), replace=False)] = np.float32(v)
        a[k] = x.reshape(a[k].shape)

    return fn


def _npy(make_bytes: Callable[[np.ndarray], bytes]):
    def fn(c: Ctx, a: dict, k: str) -> None:
        a[k] = make_bytes(a[k])

    return fn


def _retype(dtype: str):
    def fn(c: Ctx, a: dict, k: str) -> None:
        a[k] = a[k].astype(dtype)

    return fn


def _reshape(how: str):
    def fn(c: Ctx, a: dict, k: str) -> None:
        x = a[k]
        if how == "other_width":
            from fmtl_lightning.roles import WidthSpec
            from fmtl_lightning.slicing import slice_state

            others = [w for w in (1.0, 0.5, 0.25) if w != c.ins.width]
            ws = WidthSpec(others[int(c.rng.integers(len(others)))])
            sub = slice_state(c.plan.initial_state, c.plan.spec, ws)
            moved = [k2 for k2 in sub if sub[k2].shape != a[k2].shape]
            k = moved[int(c.rng.integers(len(moved)))]
            a[k] = sub[k].copy()
            return
        a[k] = {
            "transposed": lambda: np.ascontiguousarray(x.T) if x.ndim > 1 else x[None],
            "flat": lambda: x.reshape(-1) if x.ndim > 1 else x.reshape(1, -1),
            "scalar": lambda: np.asarray(x.reshape(-1)[0]),
            "empty": lambda: np.zeros((0, *x.shape[1:]), x.dtype),
        }[how]()

    return fn


def _missing(c: Ctx, a: dict, k: str) -> None:
    del a[list(a)[int(c.rng.integers(len(a)))]]


def _renamed(c: Ctx, a: dict, k: str) -> None:
    a[k + "_"] = a.pop(k)


def _stype(c: Ctx, a: dict, k: str) -> None:
    from flwr.app import Array

    a[k] = Array(dtype="float32", shape=a[k].shape, stype="torch.Tensor", data=forge.npy(a[k]))


def _pickled(x: np.ndarray) -> bytes:
    obj = np.empty(x.shape, dtype=object)
    obj.reshape(-1)[:] = list(x.reshape(-1))
    return forge.npy(obj)


def _lying(x: np.ndarray) -> bytes:
    return forge.npy_forged("<f4", (x.size + 10**6,), x.astype("<f4").tobytes())


def _dup_same(c: Ctx) -> list:
    r = c.reply()
    return [r, c.reply()]


def _dup_diff(c: Ctx) -> list:
    a = {k: v + np.float32(5) if v.dtype.kind == "f" else v for k, v in c.arrays.items()}
    return [c.reply(), c.reply(arrays=a)]


def _stranger(c: Ctx) -> list:
    from flwr.app import Message, RecordDict

    fake = Message(RecordDict(), dst_node_id=999, message_type="train")
    return [c.reply(to=fake)]


def _error(c: Ctx) -> list:
    from flwr.app import Error, Message

    return [Message(Error(code=1, reason="boom"), reply_to=c.msg)]


def _record(name: str, kind: str):
    def make(c: Ctx) -> list:
        from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

        rec = {
            "metric": MetricRecord({"a": 1.0}),
            "config": ConfigRecord({"a": "b"}),
            "array": ArrayRecord(),
        }[kind]
        return [c.reply(records={name: rec})]

    return make


def _m(**kw: Any):
    return _one(lambda c: c.reply(metrics=c.metrics(**kw)))


def _c(**kw: Any):
    return _one(lambda c: c.reply(config=c.config(**kw)))


MUTATIONS: list[Mut] = [
    Mut("valid", _one(lambda c: c.reply()), VALID),
    Mut(
        "valid/keys reordered",
        _one(lambda c: c.reply(arrays=dict(reversed(list(c.arrays.items()))))),
        VALID,
    ),
    Mut("valid/extra metric", _m(**{"acc/x": 0.5}), VALID),
    Mut("valid/num-examples = max", _m(num_examples=60), VALID),
    Mut("valid/huge finite loss", _m(loss=1e308), VALID),
    Mut("valid/fortran-order arrays", _arrays(_npy(lambda x: forge.npy(x, fortran=True))), VALID),
    Mut("valid/npy version 2.0", _arrays(_npy(lambda x: forge.npy(x, version=(2, 0)))), VALID),
    Mut("valid/extra record", _record("extra", "config"), VALID),
    Mut("valid/value 1e19 (within bound)", _arrays(_value(1e19)), VALID),
    Mut("npy/version 3.0", _arrays(_npy(lambda x: forge.npy(x, version=(3, 0)))), EITHER),
    Mut("npy/big-endian float32", _arrays(_npy(lambda x: forge.npy(x.astype(">f4")))), EITHER),
    Mut("npy/empty data", _arrays(_npy(lambda x: b"")), MUST),
    Mut(
        "npy/truncated",
        _arrays(
            lambda c, a, k: a.__setitem__(
                k, forge.npy(a[k])[: int(c.rng.integers(1, len(forge.npy(a[k]))))]
            )
        ),
        MUST,
    ),
    Mut("npy/garbage", _arrays(_npy(lambda x: b"\x93NUMPY garbage" * 7)), MUST),
    Mut("npy/trailing bytes", _arrays(_npy(lambda x: forge.npy(x) + b"\0" * 4)), MUST),
    Mut("npy/header claims more", _arrays(_npy(_lying)), MUST),
    Mut("npy/negative shape", _arrays(_npy(lambda x: forge.npy_forged("<f4", "(-1,)", b""))), MUST),
    Mut(
        "npy/shape not a tuple", _arrays(_npy(lambda x: forge.npy_forged("<f4", "'a'", b""))), MUST
    ),
    Mut("npy/object (pickle)", _arrays(_npy(_pickled)), MUST),
    Mut(
        "npy/structured dtype",
        _arrays(_npy(lambda x: forge.npy(np.zeros(x.shape, dtype=[("a", "<f4")])))),
        MUST,
    ),
    *[
        Mut(f"dtype/{d}", _arrays(_retype(d)), MUST)
        for d in ("float64", "float16", "int32", "int64", "bool", "complex64", "uint8")
    ],
    *[
        Mut(f"shape/{h}", _arrays(_reshape(h)), MUST)
        for h in ("other_width", "transposed", "flat", "scalar", "empty")
    ],
    *[
        Mut(f"values/{name}", _arrays(_value(v, n)), MUST)
        for name, v, n in (
            ("NaN", np.nan, 1),
            ("+Inf", np.inf, 1),
            ("-Inf", -np.inf, 2),
            ("3e38", 3e38, 1),
            ("1e20 (past the bound)", 1e20, 1),
            ("all NaN", np.nan, 10**6),
        )
    ],
    Mut("values/just past the bound", _arrays(_value(bound_of(np.dtype("f4")) * 1.01)), MUST),
    Mut("keys/missing", _arrays(_missing), MUST),
    Mut(
        "keys/extra",
        _arrays(lambda c, a, k: a.__setitem__("heads.x.weight", np.zeros(3, "f4"))),
        MUST,
    ),
    Mut(
        "keys/1000 extra",
        _arrays(lambda c, a, k: a.update({f"k{i}": np.zeros(1, "f4") for i in range(1000)})),
        MUST,
    ),
    Mut("keys/renamed", _arrays(_renamed), MUST),
    Mut("keys/none", _one(lambda c: c.reply(arrays={})), MUST),
    Mut("array/not numpy stype", _arrays(_stype), MUST),
    Mut("record/arrays is a MetricRecord", _record("arrays", "metric"), MUST),
    Mut("record/metrics is a ConfigRecord", _record("metrics", "config"), MUST),
    Mut("record/config is an ArrayRecord", _record("config", "array"), MUST),
    *[
        Mut(f"record/no {r}", _one(lambda c, r=r: c.reply(drop=(r,))), MUST)
        for r in ("arrays", "metrics", "config")
    ],
    *[
        Mut(f"num-examples {v!r}", _m(num_examples=v), MUST)
        for v in (0, -1, 61, 2**53, 2**62, 2**70, 10.0, math.nan, [10], ...)
    ],
    *[Mut(f"metric loss {v!r}", _m(loss=v), MUST) for v in (math.nan, math.inf, -math.inf)],
    Mut("metric list with NaN", _m(acc=[1.0, math.nan]), MUST),
    Mut("metric empty list", _m(acc=[]), MUST),
    Mut(
        "config client-id of another client",
        _one(
            lambda c: c.reply(
                config=c.config(client_id="c01" if c.ins.client_id == "c00" else "c00")
            )
        ),
        MUST,
    ),
    *[Mut(f"config client-id {v!r}", _c(client_id=v), MUST) for v in ("", 1, ...)],
    *[Mut(f"config round {v!r}", _c(round=v), MUST) for v in (2, 0, -1, "1", ...)],
    Mut("config round 1.0", _c(round=1.0), EITHER),
    *[Mut(f"config base-hash {v!r}", _c(base_hash=v), MUST) for v in ("0" * 64, "", b"x", ...)],
    Mut("config width other", _c(width=0.3), EITHER),
    Mut("message/error reply", _error, MUST),
    Mut("message/no reply", lambda c: [], MUST),
    Mut("message/stranger's reply", _stranger, MUST),
    Mut("message/duplicate (same)", _dup_same, EITHER),
    Mut("message/duplicate (different arrays)", _dup_diff, EITHER),
]


# ----------------------------------------------------------------------------- the surface
class ReplySurface:
    name = "Flower replies"
    mutations = MUTATIONS

    def __init__(self, work: Path, **_: object) -> None:
        from fmtl_lightning.config import parse_config
        from fmtl_lightning.engine.plan import server_plan

        self.plans = {
            name: server_plan(parse_config(copy.deepcopy(c)))
            for name, c in (("mlp", BASE_CFG), ("bn", BN_CFG))
        }

    def run(self, mut: Mut, rng: np.random.Generator, i: int) -> Case:
        with RunIdentity():
            return self._run(mut, rng)

    def _run(self, mut: Mut, rng: np.random.Generator) -> Case:
        from flwr.app import ArrayRecord, ConfigRecord

        from fmtl_lightning.aggregation import ClientUpdate, aggregate
        from fmtl_lightning.deploy.strategy import FMTLStrategy
        from fmtl_lightning.engine import ServerEngine
        from fmtl_lightning.roles import WidthSpec
        from mobile_client.flower_app import from_record, read_train_message, reply_message

        name = ["mlp", "bn"][int(rng.integers(2))]
        plan = self.plans[name]
        grid = FakeGrid(plan)
        s = FMTLStrategy(ServerEngine(plan, "unused"), reply_timeout=5.0)
        s.register(grid)
        msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
        t = int(rng.integers(len(msgs)))
        replies, good, ctx = [], [], None
        for j, m in enumerate(msgs):
            arrays, ins = read_train_message(m)
            trained = {
                k: np.asarray(
                    v + rng.normal(0, 0.1, v.shape) if v.dtype.kind == "f" else v + 3, dtype=v.dtype
                )
                for k, v in arrays.items()
            }
            n = int(rng.integers(1, 61))
            ws = WidthSpec(ins.width, ins.slicing, ins.round_idx)
            if j != t:
                replies.append(reply_message(m, trained, n, {"loss": 1.0}, ins))
                # the reference aggregate gets the declared shapes, whatever the wire did
                declared = {k: v.reshape(plan.spec.shape_at(k, ws)) for k, v in trained.items()}
                good.append(ClientUpdate(ins.client_id, declared, n, ws))
                continue
            ctx = Ctx(rng, plan, m, trained, ins, n, [])
        assert ctx is not None
        cid, ws_t = ctx.ins.client_id, WidthSpec(ctx.ins.width, ctx.ins.slicing, ctx.ins.round_idx)
        mine = mut.make(ctx)
        replies[t:t] = mine
        label = f"{mut.name} [{name}, {cid} w={ctx.ins.width:g}]"
        try:
            rec, mr = s.aggregate_train(1, replies)
        except BaseException as exc:  # noqa: BLE001 - judged, never hidden
            return Case(
                self.name,
                label,
                "traceback",
                f"aggregate_train raised {type(exc).__name__}: {one_line(str(exc))}",
            )
        rep = s.report
        unexpected = {k: v for k, v in rep.rejected.items() if v.startswith("unexpected ")}
        if unexpected:
            return Case(self.name, label, "traceback", one_line(str(unexpected)))
        wrong = [
            f"good client {u.client_id} not accepted: "
            f"{rep.rejected.get(u.client_id) or rep.failed.get(u.client_id)}"
            for u in good
            if u.client_id not in rep.accepted
        ]
        strangers = [k for k in rep.accepted if k not in NODES.values()]
        wrong += [f"accepted {k}, a node that was sent nothing" for k in strangers]
        wrong += array_problems(s.engine.global_state, layout(plan.initial_state), "global state")
        got = from_record(rec)
        if not same_arrays(got, s.engine.global_state):
            wrong.append("the returned ArrayRecord differs from the strategy's global state")
        if "loss" in mr and not math.isfinite(float(mr["loss"])):
            wrong.append(f"round loss {mr['loss']}")
        if wrong:  # the round itself went wrong: no reference to compare with
            return Case(self.name, label, "silently_wrong", "; ".join(wrong[:3]))
        if cid not in rep.accepted:
            want = aggregate(
                plan.initial_state,
                sorted(good, key=lambda u: u.client_id),
                plan.spec,
                weighting=plan.cfg.algorithm.weighting,
            )
            if not same_arrays(s.engine.global_state, want):
                wrong.append("global state differs from aggregate() over the good replies")
            why = rep.rejected.get(cid) or rep.failed.get(cid) or "(not recorded)"
            why = why if repr(cid) in why else f"{cid!r} (report key): {why}"
            if wrong:
                return Case(self.name, label, "silently_wrong", "; ".join(wrong[:3]))
            outcome = "valid_refused" if mut.expect is VALID else "refused"
            return Case(self.name, label, outcome, one_line(why))
        # accepted: is what was accepted valid, and counted once?
        problems: list[str] = []
        candidates = []
        for r in mine:
            try:
                arrays = from_record(r.content["arrays"])
            except Exception as exc:  # noqa: BLE001
                problems.append(f"accepted a reply whose arrays do not decode: {exc}")
                continue
            want = {
                k: (plan.spec.shape_at(k, ws_t), np.dtype(plan.spec[k].dtype))
                for k in plan.shared_keys
            }
            problems += array_problems(arrays, want, "reply arrays")
            problems += _claim_problems(r, ctx, s.engine.max_examples)
            n = r.content["metrics"].get("num-examples")
            candidates.append(ClientUpdate(cid, arrays, n, ws_t))
        if not problems:
            wants = [
                aggregate(
                    plan.initial_state,
                    sorted([*good, u], key=lambda u: u.client_id),
                    plan.spec,
                    weighting=plan.cfg.algorithm.weighting,
                )
                for u in candidates
            ]
            if not any(same_arrays(s.engine.global_state, w) for w in wants):
                wrong.append(
                    f"global state is not aggregate() over the good replies and one of "
                    f"{cid}'s {len(mine)} replies (counted more than once?)"
                )
        outcome, detail = judge_accepted(mut.expect, problems, wrong, mut.name)
        return Case(self.name, label, outcome, detail)


def _claim_problems(r: Any, c: Ctx, max_examples: int) -> list[str]:
    out = []
    m, cfg = r.content["metrics"], r.content["config"]
    n = m.get("num-examples")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_examples:
        out.append(f"num-examples {n!r}")
    for k, v in m.items():
        if k != "num-examples" and (not isinstance(v, int | float) or not math.isfinite(v)):
            out.append(f"metric {k} = {v!r}")
    if cfg.get("client-id") != c.ins.client_id:
        out.append(f"client-id {cfg.get('client-id')!r}")
    if cfg.get("round") != c.ins.round:
        out.append(f"round {cfg.get('round')!r}")
    if cfg.get("base-hash") != c.ins.base_hash:
        out.append(f"base-hash {cfg.get('base-hash')!r}")
    return out
