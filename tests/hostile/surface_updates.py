"""Surface 1: update files, read by the server and folded into the global state.

Each case writes one client's update file (safetensors: shared arrays at the width it
was sent, metadata), mutated, and feeds it to the real entry points in the order the
simulation's server side applies them to an edge client's update:
``fmtl_lightning.edge_bridge.receive_update`` (``mobile_client.update.read_update`` with
the base hash that was sent, then ``validate_state`` at the sent width), then
``aggregate`` together with the other two clients' good updates, as
``Simulation.run_round`` does.

Two models: an MLP (no integer entries) and a BatchNorm CNN (0-d int64 counters,
norm statistics), each with clients at widths 1, 1/2 and 1/4, HeteroFL or FedRolex.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
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
    judge_exception,
    judge_refused,
    layout,
    same_arrays,
    tree_state,
)

BASE_CFG: dict[str, Any] = {
    "name": "sweep-updates",
    "seed": 3,
    "data": {"samples_per_client": 60, "partition": {"kind": "iid"}},
    "model": {"family": "mlp", "hidden": [8, 4], "norm": "none"},
    "clients": [
        {"count": 1, "tasks": ["digits/digit"], "width": 1.0},
        {"count": 1, "tasks": ["digits/digit"], "width": 0.5},
        {"count": 1, "tasks": ["digits/parity"], "width": 0.25},
    ],
    "algorithm": {"name": "fedper", "weighting": "examples"},
    "federation": {"rounds": 2, "batch_size": 16},
    "compare_local": False,
}
BN_CFG = {**copy.deepcopy(BASE_CFG), "model": {"family": "cnn", "hidden": [4, 8], "norm": "batch"}}
MAX_EXAMPLES = 2**53


def plans() -> dict[str, Any]:
    from fmtl_lightning.config import parse_config
    from fmtl_lightning.engine.plan import server_plan

    return {
        name: server_plan(parse_config(copy.deepcopy(c)))
        for name, c in (("mlp", BASE_CFG), ("bn", BN_CFG))
    }


@dataclass
class Ctx:
    rng: np.random.Generator
    plan: Any
    ws: Any
    cid: str
    arrays: dict[str, np.ndarray]
    meta: dict[str, str]
    base: str
    extra: dict[str, Any] = field(default_factory=dict)

    def blob(self, arrays: dict | None = None, meta: Any = "same") -> bytes:
        return forge.safetensors(
            self.arrays if arrays is None else arrays, self.meta if meta == "same" else meta
        )

    def float_key(self) -> str:
        keys = [k for k, v in self.arrays.items() if v.dtype.kind == "f" and v.size]
        return keys[int(self.rng.integers(len(keys)))]

    def key(self) -> str:
        keys = list(self.arrays)
        return keys[int(self.rng.integers(len(keys)))]

    def int_key(self) -> str | None:
        keys = [k for k, v in self.arrays.items() if v.dtype.kind == "i"]
        return keys[int(self.rng.integers(len(keys)))] if keys else None


# ----------------------------------------------------------------------------- mutations
def _with_value(value: float, n: int = 1):
    def make(c: Ctx) -> bytes:
        a = dict(c.arrays)
        k = c.float_key()
        x = a[k].copy().reshape(-1)
        x[c.rng.choice(x.size, size=min(n, x.size), replace=False)] = np.float32(value)
        a[k] = x.reshape(a[k].shape)
        return c.blob(a)

    return make


def _retyped(dtype: str):
    def make(c: Ctx) -> bytes:
        a = dict(c.arrays)
        k = c.float_key()
        a[k] = a[k].astype(dtype)
        return c.blob(a)

    return make


def _raw_code(code: str, itemsize: int):
    """A key declared with dtype ``code`` (e.g. BF16, which numpy lacks) and fitting bytes."""

    def make(c: Ctx) -> bytes:
        k = c.float_key()
        header, chunks = forge.st_header(c.arrays, c.meta)
        keys = [x for x in header if x != "__metadata__"]
        i = keys.index(k)
        chunks[i] = chunks[i][: c.arrays[k].size * itemsize]
        off = 0
        for j, key in enumerate(keys):
            header[key]["data_offsets"] = [off, off + len(chunks[j])]
            off += len(chunks[j])
        header[k]["dtype"] = code
        return forge.st_bytes(header, b"".join(chunks))

    return make


def _reshaped(how: str):
    def make(c: Ctx) -> bytes:
        a = dict(c.arrays)
        k = c.float_key()
        x = a[k]
        if how == "other_width":
            from fmtl_lightning.roles import WidthSpec
            from fmtl_lightning.slicing import slice_state

            others = [w for w in (1.0, 0.5, 0.25) if w != c.ws.width]
            ws = WidthSpec(others[int(c.rng.integers(len(others)))])
            sub = slice_state(c.plan.initial_state, c.plan.spec, ws)
            moved = [k2 for k2 in sub if sub[k2].shape != c.arrays[k2].shape]
            k = moved[int(c.rng.integers(len(moved)))]
            a[k] = sub[k].copy()
            return c.blob(a)
        elif how == "transposed" and x.ndim >= 2 and x.shape != x.T.shape:
            x = np.ascontiguousarray(x.T)
        elif how == "flat":
            x = x.reshape(-1) if x.ndim != 1 else x.reshape(1, -1)
        elif how == "extra_dim":
            x = x[None]
        elif how == "scalar":
            x = np.float32(x.reshape(-1)[0]).reshape(()) if x.shape != () else x.reshape(1)
        elif how == "empty":
            x = np.zeros((0, *x.shape[1:]), np.float32)
        else:
            x = x[None, None]
        a[k] = x
        return c.blob(a)

    return make


def _header_edit(fn):
    def make(c: Ctx) -> bytes:
        header, chunks = forge.st_header(c.arrays, c.meta)
        data = b"".join(chunks)
        out = fn(c, header, data)
        return out if isinstance(out, bytes) else forge.st_bytes(header, data)

    return make


def _tensor_keys(h: dict) -> list[str]:
    return [k for k in h if k != "__metadata__"]


def _pick(c: Ctx, h: dict) -> str:
    keys = _tensor_keys(h)
    return keys[int(c.rng.integers(len(keys)))]


def _offsets(kind: str):
    def fn(c: Ctx, h: dict, data: bytes):
        k = _pick(c, h)
        s, e = h[k]["data_offsets"]
        h[k]["data_offsets"] = {
            "reversed": [e, s],
            "overlap": [max(0, s - 4), e - 4] if s >= 4 else [s + 4, e + 4],
            "beyond": [s, len(data) + 8],
            "negative": [-8, e],
            "float": [float(s), float(e)],
            "huge": [s, 2**64 + e],
            "short": [s, e - 1] if e > s else [s, e + 1],
        }[kind]

    return fn


def _shape_header(kind: str):
    def fn(c: Ctx, h: dict, data: bytes):
        k = _pick(c, h)
        h[k]["shape"] = {
            "negative": [-1, *h[k]["shape"][1:]] if h[k]["shape"] else [-1],
            "huge": [2**40, 2**40],
            "float": [float(s) for s in h[k]["shape"]] or [1.0],
            "string": [str(s) for s in h[k]["shape"]] or ["1"],
        }[kind]

    return fn


def _meta(field_: str, value: Any):
    """Set metadata ``field_`` to ``value`` (``...``: delete it)."""

    def make(c: Ctx) -> bytes:
        m: dict[str, Any] = dict(c.meta)
        if value is ...:
            m.pop(field_, None)
        else:
            m[field_] = value(c) if callable(value) else value
        return c.blob(meta=m)

    return make


def _truncate(c: Ctx) -> bytes:
    b = c.blob()
    return b[: int(c.rng.integers(0, len(b)))]


def _flip(region: str):
    def make(c: Ctx) -> bytes:
        b = bytearray(c.blob())
        n = int.from_bytes(b[:8], "little")
        lo, hi = {"any": (0, len(b)), "header": (8, 8 + n), "data": (8 + n, len(b))}[region]
        i = int(c.rng.integers(lo, hi))
        b[i] ^= 1 << int(c.rng.integers(8))
        return bytes(b)

    return make


def _header_len(kind: str):
    def make(c: Ctx) -> bytes:
        b = c.blob()
        n = int.from_bytes(b[:8], "little")
        new = {"plus": n + 8, "minus": n - 8, "huge": 2**63, "zero": 0, "all": len(b)}[kind]
        return new.to_bytes(8, "little") + b[8:]

    return make


def _dup_key(c: Ctx) -> bytes:
    header, chunks = forge.st_header(c.arrays, c.meta)
    text = json.dumps(header)
    k = _pick(c, header)
    entry = json.dumps({k: header[k]})[1:-1]
    return forge.st_bytes(None, b"".join(chunks), header_text=text[:-1] + ", " + entry + "}")


def _reordered(c: Ctx) -> bytes:
    keys = list(c.arrays)
    order = c.rng.permutation(len(keys))
    return c.blob({keys[i]: c.arrays[keys[i]] for i in order})


def _counter(value: int):
    def make(c: Ctx) -> bytes:
        k = c.int_key()
        if k is None:  # the MLP has no integer entries: a float key gets an int64 array
            k = c.float_key()
        a = dict(c.arrays)
        a[k] = np.full(a[k].shape, value, dtype=np.int64)
        return c.blob(a)

    return make


def _missing_key(c: Ctx) -> bytes:
    a = dict(c.arrays)
    del a[c.key()]
    return c.blob(a)


def _extra_key(name: str):
    def make(c: Ctx) -> bytes:
        return c.blob({**c.arrays, name: np.zeros(3, np.float32)})

    return make


def _renamed(c: Ctx) -> bytes:
    a = dict(c.arrays)
    k = c.key()
    a[k + "_"] = a.pop(k)
    return c.blob(a)


def _wrong_base(c: Ctx) -> bytes:
    from mobile_client.update import state_hash

    other = {k: v + np.ones_like(v) for k, v in c.arrays.items()}
    return c.blob(meta={**c.meta, "base_hash": state_hash(other)})


def _bare(blob: bytes):
    return lambda c: blob


MUTATIONS: list[Mut] = [
    Mut("valid", lambda c: c.blob(), VALID),
    Mut("valid/reordered tensors", _reordered, VALID),
    Mut("valid/extra metadata field", _meta("note", "hello"), VALID),
    Mut("valid/empty metrics", _meta("metrics", "{}"), VALID),
    Mut("valid/value 1e19 (within bound)", _with_value(1e19), VALID),
    Mut("valid/value -0.0 and denormal", _with_value(1e-45, 3), VALID),
    Mut("valid/huge finite metric", _meta("metrics", '{"loss": 1e308}'), VALID),
    Mut("file/truncated", _truncate, MUST),
    Mut("file/garbage appended", lambda c: c.blob() + b"\0garbage", MUST),
    Mut("file/empty", _bare(b""), MUST),
    Mut("file/7 bytes", _bare(b"\x08\0\0\0\0\0\0"), MUST),
    Mut("file/is a directory", lambda c: "dir", MUST),
    Mut("file/missing", lambda c: "missing", MUST),
    Mut("file/symlink to /dev/null", lambda c: "devnull", MUST),
    Mut("file/byte flip anywhere", _flip("any"), EITHER),
    Mut("file/byte flip in header", _flip("header"), EITHER),
    Mut("file/byte flip in data", _flip("data"), EITHER),
    Mut("header/length +8", _header_len("plus"), MUST),
    Mut("header/length -8", _header_len("minus"), MUST),
    Mut("header/length 2**63", _header_len("huge"), MUST),
    Mut("header/length 0", _header_len("zero"), MUST),
    Mut("header/length = file", _header_len("all"), MUST),
    Mut("header/a JSON list", lambda c: forge.st_bytes([1, 2], b""), MUST),
    Mut("header/invalid UTF-8", _bare(b"\x08" + b"\0" * 7 + b'{"\xff":1} '), MUST),
    Mut("header/NaN literal", lambda c: forge.st_bytes(None, b"", header_text='{"a": NaN}'), MUST),
    Mut("header/deep nesting", lambda c: forge.st_bytes(None, b"", header_text="[" * 100000), MUST),
    Mut("header/duplicate tensor key (same entry)", _dup_key, EITHER),
    Mut(
        "header/metadata not an object",
        _header_edit(lambda c, h, d: h.__setitem__("__metadata__", [1])),
        MUST,
    ),
    Mut("header/metadata value not a string", _meta("round", 1), MUST),
    Mut("header/no metadata", lambda c: c.blob(meta=None), MUST),
    *[
        Mut(f"offsets/{k}", _header_edit(_offsets(k)), MUST)
        for k in ("reversed", "overlap", "beyond", "negative", "float", "huge", "short")
    ],
    *[
        Mut(f"shape header/{k}", _header_edit(_shape_header(k)), MUST)
        for k in ("negative", "huge", "float", "string")
    ],
    Mut(
        "dtype header/unknown code",
        _header_edit(lambda c, h, d: h[_pick(c, h)].__setitem__("dtype", "Q7")),
        MUST,
    ),
    Mut(
        "dtype header/lowercase f32",
        _header_edit(lambda c, h, d: h[_pick(c, h)].__setitem__("dtype", "f32")),
        MUST,
    ),
    *[
        Mut(f"values/{name}", _with_value(v, n), MUST)
        for name, v, n in (
            ("NaN", np.nan, 1),
            ("+Inf", np.inf, 1),
            ("-Inf", -np.inf, 1),
            ("all NaN", np.nan, 10**6),
            ("3e38", 3e38, 1),
            ("-3e38", -3e38, 2),
            ("1e20 (past the bound)", 1e20, 1),
            ("float32 max", float(np.finfo(np.float32).max), 1),
        )
    ],
    Mut("values/just past the bound", _with_value(bound_of(np.dtype(np.float32)) * 1.01), MUST),
    *[
        Mut(f"dtype/{d}", _retyped(d), MUST)
        for d in ("float64", "float16", "int32", "int64", "uint8", "bool", "int8")
    ],
    Mut("dtype/BF16", _raw_code("BF16", 2), MUST),
    Mut("dtype/F8_E4M3", _raw_code("F8_E4M3", 1), MUST),
    *[
        Mut(f"shape/{h}", _reshaped(h), MUST)
        for h in ("other_width", "transposed", "flat", "extra_dim", "scalar", "empty")
    ],
    Mut("counter/huge", _counter(2**62), EITHER),
    Mut("counter/negative", _counter(-5), EITHER),
    Mut("keys/missing", _missing_key, MUST),
    Mut("keys/extra", _extra_key("backbone.extra.weight"), MUST),
    Mut("keys/extra traversal name", _extra_key("../../etc/passwd"), MUST),
    Mut("keys/extra empty name", _extra_key(""), MUST),
    Mut("keys/renamed", _renamed, MUST),
    Mut("keys/none at all", lambda c: c.blob({}), MUST),
    *[
        Mut(f"meta/missing {f}", _meta(f, ...), MUST)
        for f in (
            "format",
            "format_version",
            "client_id",
            "round",
            "width",
            "num_examples",
            "base_hash",
            "metrics",
        )
    ],
    Mut("meta/format wrong", _meta("format", "fmtl-updatf"), MUST),
    Mut("meta/format_version 2", _meta("format_version", "2"), MUST),
    Mut("meta/format_version 01", _meta("format_version", "01"), EITHER),
    Mut("meta/client_id empty", _meta("client_id", ""), MUST),
    Mut("meta/client_id traversal", _meta("client_id", "../../x\n"), EITHER),
    Mut("meta/client_id other client", _meta("client_id", "c01"), EITHER),
    *[Mut(f"meta/round {v!r}", _meta("round", v), MUST) for v in ("-3", "1e3", "3.5", "", "abc")],
    Mut("meta/round 7", _meta("round", "7"), EITHER),
    Mut("meta/round 10**30", _meta("round", "9" * 30), EITHER),
    *[
        Mut(f"meta/width {v!r}", _meta("width", v), MUST)
        for v in ("0", "1.5", "nan", "inf", "-0.5", "", "1e-400")
    ],
    Mut("meta/width other", _meta("width", "0.3"), EITHER),
    *[
        Mut(f"meta/num_examples {v!r}", _meta("num_examples", v), MUST)
        for v in ("0", "-1", str(2**62), str(2**53 + 1), "1e3", "abc", "", "9" * 400, "9" * 5000)
    ],
    Mut("meta/num_examples ' 7'", _meta("num_examples", " 7"), EITHER),
    Mut("meta/num_examples '7_000'", _meta("num_examples", "7_000"), EITHER),
    Mut("meta/num_examples 2**53", _meta("num_examples", str(2**53)), EITHER),
    Mut("meta/base_hash wrong", _wrong_base, MUST),
    Mut("meta/base_hash empty", _meta("base_hash", ""), MUST),
    *[
        Mut(f"meta/metrics {v[:24]!r}", _meta("metrics", v), MUST)
        for v in (
            '{"loss": NaN}',
            '{"loss": Infinity}',
            '{"loss": -Infinity}',
            '{"loss": 1e999}',
            "[]",
            '{"loss": "x"}',
            '{"loss": true}',
            '{"loss": null}',
            "{",
            "",
            '{"a": {"b": 1}}',
            "[" * 100000,
            '{"loss": [1.0]}',
        )
    ],
]


# ----------------------------------------------------------------------------- the surface
class UpdateSurface:
    name = "update files"
    mutations = MUTATIONS

    def __init__(self, work: Path, **_: object) -> None:
        self.work = work
        self.plans = plans()
        # snapshot of each global state: aggregation must never modify it
        self.frozen = {k: copy.deepcopy(p.initial_state) for k, p in self.plans.items()}

    def _ctx(self, rng: np.random.Generator) -> tuple[Ctx, list]:
        from fmtl_lightning.aggregation import ClientUpdate
        from fmtl_lightning.roles import WidthSpec
        from fmtl_lightning.slicing import slice_state
        from mobile_client.update import UpdateMeta, state_hash

        name = ["mlp", "bn"][int(rng.integers(2))]
        plan = self.plans[name]
        mode = ["heterofl", "fedrolex"][int(rng.integers(2))]
        round_idx = int(rng.integers(0, 5))
        target = int(rng.integers(len(plan.clients)))
        good: list = []
        ctx = None
        for i, c in enumerate(plan.clients):
            ws = WidthSpec(c.width, mode, round_idx)
            sent = slice_state(plan.initial_state, plan.spec, ws)
            trained = {
                k: np.asarray(
                    v + rng.normal(0, 0.1, v.shape) if v.dtype.kind == "f" else v + 3, dtype=v.dtype
                )
                for k, v in sent.items()
            }
            n = int(rng.integers(1, 61))
            if i != target:
                good.append(ClientUpdate(c.client_id, trained, n, ws))
                continue
            base = state_hash(sent)
            meta = UpdateMeta(c.client_id, round_idx + 1, ws.width, n, base, {"loss": 0.5})
            ctx = Ctx(
                rng,
                plan,
                ws,
                c.client_id,
                trained,
                meta.to_strings(),
                base,
                {"name": name, "sent": sent},
            )
        assert ctx is not None
        return ctx, good

    def run(self, mut: Mut, rng: np.random.Generator, i: int) -> Case:
        from fmtl_lightning.aggregation import ClientUpdate, aggregate
        from fmtl_lightning.edge_bridge import receive_update

        ctx, good = self._ctx(rng)
        label = f"{mut.name} [{ctx.extra['name']}, w={ctx.ws.width:g} {ctx.ws.mode}]"
        d = self.work / f"u{i}"
        d.mkdir(parents=True)
        path = d / "update.safetensors"
        made = mut.make(ctx)
        if made == "dir":
            path.mkdir()
        elif made == "devnull":
            path.symlink_to("/dev/null")
        elif made != "missing":
            path.write_bytes(made)
        before = tree_state([d])
        plan = ctx.plan
        try:
            arrays, meta = receive_update(
                path, plan.spec, ctx.ws, plan.shared_keys, ctx.base, ctx.cid
            )
            mine = ClientUpdate(ctx.cid, arrays, meta.num_examples, ctx.ws)
            ups = sorted([*good, mine], key=lambda u: u.client_id)
            new = aggregate(plan.initial_state, ups, plan.spec, weighting="examples")
        except BaseException as exc:  # noqa: BLE001 - judged, never hidden
            outcome, detail = judge_exception(exc)
            if outcome == "refused":
                outcome, detail = judge_refused(mut.expect, detail)
            return self._finish(mut, label, outcome, detail, d, before, ctx)
        want = layout({k: ctx.extra["sent"][k] for k in plan.shared_keys})
        problems = array_problems(arrays, want, "update")
        problems += _meta_problems(meta)
        wrong = array_problems(new, layout(plan.initial_state), "new global state")
        outcome, detail = judge_accepted(mut.expect, problems, wrong, mut.name)
        return self._finish(mut, label, outcome, detail, d, before, ctx)

    def _finish(
        self, mut: Mut, label: str, outcome: str, detail: str, d: Path, before: dict, ctx: Ctx
    ) -> Case:
        name = ctx.extra["name"]
        if tree_state([d]) != before:
            outcome, detail = "silently_wrong", f"the update file changed on disk; {detail}"
        if not same_arrays(self.plans[name].initial_state, self.frozen[name]):
            outcome, detail = "silently_wrong", f"the global state was modified; {detail}"
            self.plans[name].initial_model.update(copy.deepcopy(self.frozen[name]))
        return Case(self.name, label, outcome, detail)


def _meta_problems(meta: Any) -> list[str]:
    import math

    out = []
    if not isinstance(meta.client_id, str) or not meta.client_id:
        out.append(f"client_id {meta.client_id!r}")
    if not 0 <= meta.round:
        out.append(f"round {meta.round}")
    if not 0 < meta.width <= 1:
        out.append(f"width {meta.width}")
    if not 1 <= meta.num_examples <= MAX_EXAMPLES:
        out.append(f"num_examples {meta.num_examples}")
    bad = {k: v for k, v in meta.metrics.items() if not math.isfinite(v)}
    if bad:
        out.append(f"non-finite metrics {bad}")
    return out
