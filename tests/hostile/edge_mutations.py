"""The mutations of the ``fmtl-edge`` surface (:mod:`tests.hostile.surface_edge`).

A mutation builds one command in a case context (:class:`Ctx`): which files it writes
(a mutated predict input, ``--data`` or ``--start-from`` file, a copy of the bundle with
its manifest or one of its files changed), the argv, and what an accepted run must
produce (rows of predictions, the update's start arrays, its round).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tests.hostile import forge
from tests.hostile.core import EITHER, MUST, VALID, Mut

if TYPE_CHECKING:
    from tests.hostile.surface_edge import EdgeSurface

TASKS = ("digits/digit", "digits/attrs")
N_DATA = 40


def edge_config(tasks: tuple[str, ...]) -> dict[str, Any]:
    return {
        "name": "sweep-edge",
        "seed": 0,
        "data": {"samples_per_client": N_DATA},
        "model": {"family": "mlp", "hidden": [8], "norm": "none"},
        "clients": [{"count": 1, "tasks": list(tasks), "width": 0.5}],
        "algorithm": {"name": "fedper"},
        "federation": {"rounds": 1},
        "compare_local": False,
    }


@dataclass
class Ctx:
    """One case: where its files go, and what the command is expected to do."""

    rng: np.random.Generator
    s: EdgeSurface
    dir: Path
    kind: str = "predict"
    argv: list[str] = field(default_factory=list)
    bundle: Path | None = None  # a mutated copy (None: the pristine bundle)
    rows: int | None = None  # predict: expected output lines (None: unknown)
    start: dict[str, np.ndarray] | None = None  # train: the --start-from arrays
    out: Path | None = None
    round: int | None = None

    # --------------------------------------------------------------- files
    def file(self, name: str, data: bytes) -> str:
        p = self.dir / name
        p.write_bytes(data)
        return str(p)

    def copy_bundle(self) -> Path:
        if self.bundle is None:
            self.bundle = self.dir / "bundle"
            shutil.copytree(self.s.bundle, self.bundle)
        return self.bundle

    def manifest(self) -> dict[str, Any]:
        return json.loads((self.copy_bundle() / "manifest.json").read_text())

    def write_manifest(self, m: Any, text: str | None = None) -> None:
        (self.copy_bundle() / "manifest.json").write_text(
            text if text is not None else json.dumps(m)
        )

    def replace_in_bundle(self, rel: str, data: bytes, *, update_sha: bool = True) -> None:
        import hashlib

        b = self.copy_bundle()
        (b / rel).write_bytes(data)
        if update_sha:
            digest = hashlib.sha256(data).hexdigest()
            text = (b / "manifest.json").read_text()
            old = hashlib.sha256((self.s.bundle / rel).read_bytes()).hexdigest()
            (b / "manifest.json").write_text(text.replace(old, digest))

    # --------------------------------------------------------------- commands
    def b(self) -> str:
        return str(self.bundle or self.s.bundle)

    def predict(self, inputs: list[str], rows: int | None, *extra: str, task: str | None = None):
        task = task or self.s.tasks[int(self.rng.integers(len(self.s.tasks)))]
        self.kind, self.rows = "predict", rows
        self.argv = ["predict", self.b(), "--task", task, "--probs", *extra, *inputs]

    def train(
        self,
        *extra: str,
        data: str | None = None,
        start: str | None = None,
        out: str | None = None,
        start_arrays: dict | None = None,
    ) -> None:
        self.kind = "train"
        self.out = Path(out) if out is not None else self.dir / "update.safetensors"
        self.start = start_arrays
        argv = [
            "train",
            self.b(),
            "--data",
            data or str(self.s.inputs["data.npz"]),
            "--out",
            str(self.out),
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--lr",
            "0.05",
        ]
        if start is not None:
            argv += ["--start-from", start]
        self.argv = argv + list(extra)

    def info(self, *extra: str) -> None:
        self.kind = "info"
        self.argv = ["info", self.b(), "--memory-mb", "100", *extra]

    def any_command(self) -> None:
        """info, predict a valid image or train on the valid data, at random."""
        k = int(self.rng.integers(3))
        if k == 0:
            self.info()
        elif k == 1:  # the first head's task: the one manifest mutations edit
            self.predict(
                [str(self.s.inputs["batch.npy"])], 5, task=self.s.manifest["heads"][0]["task"]
            )
        else:
            self.train()


# ----------------------------------------------------------------------------- mutations
def _px(c: Ctx) -> np.ndarray:
    return c.s.px[:5].copy()


def _pred_npy(fn: Callable[[Ctx], np.ndarray | bytes], rows: int | None = None):
    def make(c: Ctx) -> None:
        x = fn(c)
        data = x if isinstance(x, bytes) else forge.npy(x)
        c.predict([c.file("in.npy", data)], rows)

    return make


def _pred_file(name: str, fn: Callable[[Ctx], bytes], rows: int | None = None):
    return lambda c: c.predict([c.file(name, fn(c))], rows)


def _float_x(value: float, n: int = 1):
    def fn(c: Ctx) -> np.ndarray:
        x = c.s.xf[:5].copy()
        flat = x.reshape(-1)
        flat[c.rng.choice(flat.size, size=min(n, flat.size), replace=False)] = value
        return x

    return fn


def _truncated(data: bytes, rng: np.random.Generator) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def _flipped(data: bytes, rng: np.random.Generator, lo: int = 0, hi: int | None = None) -> bytes:
    b = bytearray(data)
    i = int(rng.integers(lo, len(b) if hi is None else hi))
    b[i] ^= 1 << int(rng.integers(8))
    return bytes(b)


def _png(**kw: Any) -> Callable[[Ctx], bytes]:
    return lambda c: forge.png(c.s.px[0], **kw)


def _png_cut_ihdr(c: Ctx) -> bytes:
    good = forge.png(c.s.px[0])
    n = int(c.rng.integers(1, 13))  # the IHDR chunk (8 + 13 + 4 bytes) cut short
    return good[:8] + forge.struct.pack(">I", 13) + b"IHDR" + good[16 : 16 + 13 - n]


def _data(fn: Callable[[Ctx, dict], None] | None = None, raw: Callable[[Ctx], bytes] | None = None):
    """Train on a mutated ``--data`` file."""

    def make(c: Ctx) -> None:
        if raw is not None:
            data = raw(c)
        else:
            d = {k: v.copy() for k, v in c.s.data.items()}
            fn(c, d)  # type: ignore[misc]
            data = forge.npz(d)
        c.train(data=c.file("data.npz", data))

    return make


def _ykey(c: Ctx, kind: str | None = None) -> str:
    keys = [k for k in c.s.data if k.startswith("y__")]
    if kind == "multiclass":
        keys = [k for k in keys if c.s.data[k].ndim == 1]
    elif kind == "multilabel":
        keys = [k for k in keys if c.s.data[k].ndim == 2]
    return keys[int(c.rng.integers(len(keys)))] if keys else ""


def _set_x_value(value: float):
    def fn(c: Ctx, d: dict) -> None:
        flat = d["x"].reshape(-1)
        flat[int(c.rng.integers(flat.size))] = value

    return fn


def _start(
    fn: Callable[[Ctx, dict, dict], Any] | None = None, raw: Callable[[Ctx], bytes] | None = None
):
    """Train from a mutated ``--start-from`` update."""

    def make(c: Ctx) -> None:
        arrays = {k: v.copy() for k, v in c.s.start.items()}
        meta = dict(c.s.start_meta)
        if raw is not None:
            data = raw(c)
        else:
            out = fn(c, arrays, meta) if fn is not None else None
            data = out if isinstance(out, bytes) else forge.safetensors(arrays, meta)
        c.train(start=c.file("start.safetensors", data), start_arrays=arrays)

    return make


def _skey(c: Ctx) -> str:
    keys = sorted(c.s.start)
    return keys[int(c.rng.integers(len(keys)))]


def _args(*extra: str, kind: str = "train"):
    def make(c: Ctx) -> None:
        if kind == "train":
            c.train(*extra)
        else:
            c.predict([str(c.s.inputs["batch.npy"])], 5, *extra)

    return make


def _manifest(fn: Callable[[Ctx, dict], Any], command: str = "any"):
    """Edit a copy of the bundle's manifest.json, then run a command on it."""

    def make(c: Ctx) -> None:
        m = c.manifest()
        out = fn(c, m)
        c.write_manifest(m, out if isinstance(out, str) else None)
        {
            "any": c.any_command,
            "info": c.info,
            "train": c.train,
            "predict": lambda: c.predict([str(c.s.inputs["batch.npy"])], 5),
        }[command]()

    return make


def _set(path: str, value: Any, command: str = "any"):
    """Set a dotted path (``heads.0.labels``) of the manifest; ``...`` deletes it."""

    def fn(c: Ctx, m: dict) -> None:
        *parents, last = path.split(".")
        node: Any = m
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        key: Any = int(last) if isinstance(node, list) else last
        if value is ...:
            del node[key]
        else:
            node[key] = value(c, node[key]) if callable(value) else value

    return _manifest(fn, command)


def _leaves(obj: Any, prefix: str = "") -> list[str]:
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _leaves(v, f"{prefix}{k}.")]
    if isinstance(obj, list) and obj:
        return [p for i, v in enumerate(obj) for p in _leaves(v, f"{prefix}{i}.")]
    return [prefix[:-1]]


HOSTILE_JSON = [None, True, -1, 0, 1e308, "x", [], {}, 2**64, -0.5, "../../etc/passwd"]


def _random_leaf(c: Ctx, m: dict) -> None:
    path = [p for p in _leaves(m) if not p.endswith("sha256")]
    chosen = path[int(c.rng.integers(len(path)))]
    value = HOSTILE_JSON[int(c.rng.integers(len(HOSTILE_JSON)))]
    *parents, last = chosen.split(".")
    node: Any = m
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    node[int(last) if isinstance(node, list) else last] = value


def _random_delete(c: Ctx, m: dict) -> None:
    path = [p for p in _leaves(m)]
    *parents, last = path[int(c.rng.integers(len(path)))].split(".")
    node: Any = m
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    del node[int(last) if isinstance(node, list) else last]


def _bundle_file(kind: str, how: str):
    """Replace a bundle file of ``kind`` (backbone/head/train_step/weights) (sha updated)."""

    def make(c: Ctx) -> None:
        rel = c.s.files[kind]
        data = (c.s.bundle / rel).read_bytes()
        new = {
            "truncated": lambda: _truncated(data, c.rng),
            "garbage": lambda: bytes(c.rng.integers(0, 256, 300, dtype=np.uint8)),
            "empty": lambda: b"",
            "flipped": lambda: _flipped(data, c.rng),
            "other graph": lambda: (
                c.s.bundle / c.s.files["head" if kind != "head" else "backbone"]
            ).read_bytes(),
            "empty npz": lambda: forge.npz({}),
            "npz missing key": lambda: forge.npz(dict(list(c.s.weights.items())[1:])),
            "npz extra key": lambda: forge.npz({**c.s.weights, "extra.weight": np.zeros(3, "f4")}),
            "npz NaN": lambda: forge.npz(
                {
                    k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v
                    for k, v in c.s.weights.items()
                }
            ),
            "npz float64": lambda: forge.npz({k: v.astype("f8") for k, v in c.s.weights.items()}),
            "npz wrong shape": lambda: forge.npz(
                {k: v.reshape(-1) for k, v in c.s.weights.items()}
            ),
            "npz pickled": lambda: forge.npz(
                {k: np.array([None], dtype=object) for k in c.s.weights}
            ),
        }[how]()
        c.replace_in_bundle(rel, new, update_sha=(how != "flipped"))
        if kind in ("backbone", "head"):  # the command that loads the file
            c.predict([str(c.s.inputs["batch.npy"])], 5, task=c.s.manifest["heads"][0]["task"])
        else:
            c.train()

    return make


def _cross_ref(what: str):
    def fn(c: Ctx, m: dict) -> None:
        cl = m["clients"][0]
        step = m["widths"][0]["train_steps"][0]["file"]
        if what == "shared_keys":
            cl["shared_keys"] = [*cl["shared_keys"], "backbone.missing.weight"]
        elif what == "weights map":
            k = next(iter(step["weights"]))
            step["weights"][k] = "backbone.missing.weight"
        elif what == "weight_outputs map":
            k = next(iter(step["weight_outputs"]))
            step["weight_outputs"][k] = "backbone.missing.weight"
        elif what == "target_inputs":
            t = next(iter(step["target_inputs"]))
            step["target_inputs"][t] = "y_missing"
        elif what == "head client":
            m["heads"][0]["client"] = "c99"
        elif what == "client width":
            cl["width"] = 0.3
        elif what == "duplicate client":
            m["clients"].append(json.loads(json.dumps(cl)))
        elif what == "train_step clients":
            m["widths"][0]["train_steps"][0]["clients"] = ["c99"]
            m["widths"][0]["train_steps"][0]["tasks"] = ["digits/other"]
        elif what == "swap backbone/head paths":
            w, h = m["widths"][0]["backbone"], m["heads"][0]["file"]
            w["path"], h["path"] = h["path"], w["path"]
            w["sha256"], h["sha256"] = h["sha256"], w["sha256"]
        elif what == "columns out of range":
            m["heads"][0]["columns"] = [0, 99]
        elif what == "columns reversed":
            m["heads"][0]["columns"] = [5, 2]
        elif what == "labels empty":
            m["heads"][0]["labels"] = []
        elif what == "labels too few":
            m["heads"][0]["labels"] = m["heads"][0]["labels"][:1]
        elif what == "labels not strings":
            m["heads"][0]["labels"] = list(range(len(m["heads"][0]["labels"])))
        elif what == "kind flipped":
            k = m["heads"][0]["kind"]
            m["heads"][0]["kind"] = "multilabel" if k == "multiclass" else "multiclass"
        elif what == "feature_dim":
            m["widths"][0]["feature_dim"] = 1000
        elif what == "no train steps":
            m["widths"][0]["train_steps"] = []

    return fn


def _normalisation(field_: str, value: Any):
    def fn(c: Ctx, m: dict) -> str:
        for n in [m["normalisation"], *(cl["normalisation"] for cl in m["clients"])]:
            n[field_] = value
        return json.dumps(m)  # NaN/Infinity literals, as Python's json writes them

    return fn


MUTATIONS: list[Mut] = [
    # ---- controls
    Mut("valid/predict npy image", lambda c: c.predict([str(c.s.inputs["img.npy"])], 1), VALID),
    Mut("valid/predict npy batch", lambda c: c.predict([str(c.s.inputs["batch.npy"])], 5), VALID),
    Mut("valid/predict float npy", lambda c: c.predict([str(c.s.inputs["float.npy"])], 5), VALID),
    Mut("valid/predict npz", lambda c: c.predict([str(c.s.inputs["img.npz"])], 3), VALID),
    Mut("valid/predict png", lambda c: c.predict([str(c.s.inputs["img.png"])], 1), VALID),
    Mut(
        "valid/predict png sub/up filters",
        _pred_file("f.png", lambda c: forge.png(c.s.px[1], filt=1 + int(c.rng.integers(2))), 1),
        VALID,
    ),
    Mut("valid/predict pgm", lambda c: c.predict([str(c.s.inputs["img.pgm"])], 1), VALID),
    Mut(
        "valid/predict several",
        lambda c: c.predict([str(c.s.inputs[k]) for k in ("img.npy", "batch.npy", "img.pgm")], 7),
        VALID,
    ),
    Mut("valid/predict --client c00", _args("--client", "c00", kind="predict"), VALID),
    Mut("valid/info", lambda c: c.info(), VALID),
    Mut("valid/train", lambda c: c.train(), VALID),
    Mut("valid/train uint8 data", lambda c: c.train(data=str(c.s.inputs["data_u8.npz"])), VALID),
    Mut("valid/train --start-from", _start(), VALID),
    Mut("valid/train --head-only", _args("--head-only"), VALID),
    Mut(
        "valid/train --round 5", lambda c: (c.train("--round", "5"), setattr(c, "round", 5)), VALID
    ),
    Mut("valid/train batch-size 10**9", _args("--batch-size", str(10**9)), VALID),
    Mut(
        "valid/bundle given as manifest.json path",
        lambda c: (
            setattr(c, "bundle", c.s.bundle / "manifest.json"),
            c.train() if c.rng.random() < 0.5 else c.predict([str(c.s.inputs["img.npy"])], 1),
        ),
        VALID,
    ),
    Mut(
        "bundle/info on manifest.json path",
        lambda c: (setattr(c, "bundle", c.s.bundle / "manifest.json"), c.info()),
        EITHER,
    ),
    Mut("valid/data with extra keys", _data(lambda c, d: d.update(extra=np.zeros(3))), VALID),
    # ---- predict inputs: .npy
    Mut("npy/empty file", _pred_file("in.npy", lambda c: b""), MUST),
    Mut(
        "npy/truncated", _pred_file("in.npy", lambda c: _truncated(forge.npy(_px(c)), c.rng)), MUST
    ),
    Mut(
        "npy/byte flip", _pred_file("in.npy", lambda c: _flipped(forge.npy(_px(c)), c.rng)), EITHER
    ),
    Mut(
        "npy/float byte flip",
        _pred_file("in.npy", lambda c: _flipped(forge.npy(c.s.xf[:5]), c.rng, 128)),
        EITHER,
    ),
    Mut(
        "npy/header claims 10**9 rows",
        _pred_npy(lambda c: forge.npy_forged("|u1", (10**9, 8, 8), _px(c).tobytes())),
        MUST,
    ),
    Mut(
        "npy/header claims fewer bytes",
        _pred_npy(lambda c: forge.npy_forged("|u1", (1, 8, 8), _px(c).tobytes())),
        MUST,
    ),
    Mut(
        "npy/negative shape", _pred_npy(lambda c: forge.npy_forged("|u1", "(-1, 8, 8)", b"")), MUST
    ),
    Mut(
        "npy/object (pickle)",
        _pred_npy(lambda c: forge.npy(np.array([None, 1], dtype=object))),
        MUST,
    ),
    Mut("npy/structured", _pred_npy(lambda c: np.zeros((1, 8, 8), [("a", "u1")])), MUST),
    Mut("npy/complex64", _pred_npy(lambda c: c.s.xf[:2].astype("c8")), MUST),
    *[
        Mut(f"npy/dtype {d}", _pred_npy(lambda c, d=d: _px(c).astype(d)), EITHER)
        for d in ("float64", "int16", "bool", "float16", ">f4", "int64")
    ],
    *[
        Mut(f"npy/shape {s}", _pred_npy(lambda c, s=s: np.zeros(s, np.uint8)), MUST)
        for s in ((9, 9), (0, 8, 8), (1, 1, 1, 8, 8), (2, 8), (), (8,), (5, 2, 8, 8))
    ],
    *[
        Mut(f"npy/float {name}", _pred_npy(_float_x(v, n)), must)
        for name, v, n, must in (
            ("NaN", np.nan, 1, MUST),
            ("+Inf", np.inf, 1, MUST),
            ("-Inf", -np.inf, 3, MUST),
            ("3e38", 3e38, 1, EITHER),
            ("-3e38 everywhere", -3e38, 10**6, EITHER),
            ("1e20", 1e20, 1, EITHER),
            ("1e4", 1e4, 5, EITHER),
        )
    ],
    # ---- .npz, images, paths
    Mut("npz/no key x", _pred_file("in.npz", lambda c: forge.npz({"y": _px(c)})), MUST),
    Mut("npz/empty file", _pred_file("in.npz", lambda c: b""), MUST),
    Mut("npz/not a zip", _pred_file("in.npz", lambda c: b"PK\x03\x04garbage" * 4), MUST),
    Mut(
        "npz/truncated",
        _pred_file("in.npz", lambda c: _truncated(forge.npz({"x": _px(c)}), c.rng)),
        MUST,
    ),
    Mut(
        "npz/x is a pickle",
        _pred_file("in.npz", lambda c: forge.npz({"x": forge.npy(np.array([None], dtype=object))})),
        MUST,
    ),
    Mut(
        "npz/x truncated member",
        _pred_file("in.npz", lambda c: forge.npz({"x": forge.npy(_px(c))[:-7]})),
        MUST,
    ),
    Mut(
        "png/truncated inside IDAT",
        _pred_file(
            "in.png", lambda c: (b := forge.png(c.s.px[0]))[: int(c.rng.integers(41, len(b) - 16))]
        ),
        MUST,
    ),
    Mut(
        "png/truncated anywhere",
        _pred_file("in.png", lambda c: _truncated(forge.png(c.s.px[0]), c.rng)),
        EITHER,
    ),
    Mut("png/no IEND", _pred_file("in.png", lambda c: forge.png(c.s.px[0])[:-12]), EITHER),
    Mut("png/IHDR chunk cut short", _pred_file("in.png", _png_cut_ihdr), MUST),
    Mut(
        "png/byte flip",
        _pred_file("in.png", lambda c: _flipped(forge.png(c.s.px[0]), c.rng, 8)),
        EITHER,
    ),
    Mut("png/bad IHDR CRC", _pred_file("in.png", _png(crc_ok=False)), EITHER),
    Mut("png/unknown filter 7", _pred_file("in.png", _png(filt=7)), MUST),
    Mut("png/IHDR says 16x16", _pred_file("in.png", _png(ihdr_wh=(16, 16))), MUST),
    Mut("png/IHDR says 2**31 x 1", _pred_file("in.png", _png(ihdr_wh=(2**31, 1))), MUST),
    Mut("png/IHDR says 0x0", _pred_file("in.png", _png(ihdr_wh=(0, 0))), MUST),
    Mut("png/zlib garbage", _pred_file("in.png", _png(raw=b"\x78\x9c garbage")), MUST),
    Mut("png/no IDAT", _pred_file("in.png", _png(raw=b"")), MUST),
    Mut(
        "png/16x16 image",  # resized to the bundle's 8x8
        _pred_file("in.png", lambda c: forge.png(np.zeros((16, 16), np.uint8))),
        VALID,
    ),
    Mut("png/16-bit depth", _pred_file("in.png", _png(depth=16)), MUST),
    Mut(
        "png/RGB",
        _pred_file(
            "in.png", lambda c: forge.png(np.repeat(c.s.px[0][..., None], 3, axis=2), color=2)
        ),
        VALID,  # converted to the bundle's one channel
    ),
    Mut("png/interlaced flag", _pred_file("in.png", _png(interlace=1)), MUST),
    Mut(
        "png/ancillary chunk",
        _pred_file("in.png", _png(chunks_after=forge.png_chunk(b"tEXt", b"a\0b"))),
        VALID,
    ),
    Mut(
        "png/bomb (8 MB inflated)",
        _pred_file("in.png", _png(raw=forge.zlib.compress(b"\0" * (8 << 20)))),
        MUST,
    ),
    Mut("pgm/truncated header", _pred_file("in.pgm", lambda c: b"P5\n8 "), MUST),
    Mut(
        "pgm/maxval 0",
        _pred_file("in.pgm", lambda c: forge.pgm(c.s.px[0], header=b"P5\n8 8\n0\n")),
        MUST,
    ),
    Mut(
        "pgm/maxval 65535",
        _pred_file("in.pgm", lambda c: forge.pgm(c.s.px[0], header=b"P5\n8 8\n65535\n")),
        MUST,
    ),
    Mut(
        "pgm/negative width",
        _pred_file("in.pgm", lambda c: forge.pgm(c.s.px[0], header=b"P5\n-8 8\n255\n")),
        MUST,
    ),
    Mut(
        "pgm/huge dims",
        _pred_file(
            "in.pgm", lambda c: forge.pgm(c.s.px[0], header=b"P5\n99999999 99999999\n255\n")
        ),
        MUST,
    ),
    Mut("pgm/short pixels", _pred_file("in.pgm", lambda c: forge.pgm(c.s.px[0])[:-9]), MUST),
    Mut(
        "pgm/comment",
        _pred_file("in.pgm", lambda c: forge.pgm(c.s.px[0], header=b"P5\n# hi\n8 8\n255\n"), 1),
        VALID,
    ),
    Mut(
        "pgm/ascii P2",
        _pred_file(
            "in.pgm",
            lambda c: b"P2\n8 8\n255\n" + b" ".join(str(v).encode() for v in c.s.px[0].reshape(-1)),
        ),
        EITHER,
    ),
    Mut(
        "input/is a directory",
        lambda c: (c.dir.joinpath("d.npy").mkdir(), c.predict([str(c.dir / "d.npy")], None)),
        MUST,
    ),
    Mut("input/missing", lambda c: c.predict([str(c.dir / "nope.npy")], None), MUST),
    Mut("input/unknown suffix", _pred_file("in.txt", lambda c: forge.npy(_px(c))), MUST),
    Mut(
        "input/symlink to /dev/null",
        lambda c: (
            c.dir.joinpath("n.npy").symlink_to("/dev/null"),
            c.predict([str(c.dir / "n.npy")], None),
        ),
        MUST,
    ),
    # ---- predict/train arguments
    Mut(
        "args/--task unknown",
        lambda c: c.predict([str(c.s.inputs["img.npy"])], 1, task="digits/nope"),
        MUST,
    ),
    *[
        Mut(f"args/predict --width {w}", _args("--width", w, kind="predict"), MUST)
        for w in ("1.0", "0.3", "nan", "inf", "-1", "0")
    ],
    Mut("args/--client unknown", _args("--client", "c99", kind="predict"), MUST),
    Mut("args/--client traversal", _args("--client", "../../x", kind="predict"), MUST),
    *[Mut(f"args/--lr {v}", _args("--lr", v), MUST) for v in ("nan", "inf", "-1", "0", "-inf")],
    Mut("args/--lr 1e30", _args("--lr", "1e30"), EITHER),
    Mut("args/--epochs 0", _args("--epochs", "0"), EITHER),
    Mut("args/--epochs -1", _args("--epochs", "-1"), MUST),
    *[Mut(f"args/--batch-size {v}", _args("--batch-size", v), MUST) for v in ("0", "-1")],
    Mut("args/--round -3", lambda c: (c.train("--round", "-3"), setattr(c, "round", -3)), MUST),
    Mut(
        "args/--round 2**70",
        lambda c: (c.train("--round", str(2**70)), setattr(c, "round", 2**70)),
        EITHER,
    ),
    Mut("args/--seed -1", _args("--seed", "-1"), EITHER),
    Mut("args/--seed 2**70", _args("--seed", str(2**70)), EITHER),
    Mut("args/train --width 1.0", _args("--width", "1.0"), MUST),
    Mut("args/info --memory-mb nan", lambda c: c.info("--memory-mb", "nan"), MUST),
    Mut("args/info --memory-mb -1", lambda c: c.info("--memory-mb", "-1"), EITHER),
    Mut("args/unknown subcommand", lambda c: setattr(c, "argv", ["explode", c.b()]), MUST),
    Mut("args/no arguments", lambda c: setattr(c, "argv", []), MUST),
    # ---- outputs
    Mut(
        "out/into a missing directory",
        lambda c: c.train(out=str(c.dir / "no" / "u.safetensors")),
        MUST,
    ),
    Mut(
        "out/is a directory",
        lambda c: (c.dir.joinpath("o").mkdir(), c.train(out=str(c.dir / "o"))),
        MUST,
    ),
    Mut(
        "out/local-state path is a directory",
        lambda c: (
            c.dir.joinpath("u.local.safetensors").mkdir(),
            c.train(out=str(c.dir / "u.safetensors")),
        ),
        MUST,
    ),
    Mut(
        "out/same as --data",
        lambda c: (
            shutil.copy(c.s.inputs["data.npz"], c.dir / "d.npz"),
            c.train(data=str(c.dir / "d.npz"), out=str(c.dir / "d.npz")),
        ),
        MUST,
    ),
    Mut(
        "out/onto the bundle's weights",
        lambda c: (c.copy_bundle(), c.train(out=str(c.copy_bundle() / c.s.files["weights"]))),
        MUST,
    ),
    # ---- train data
    Mut("data/empty file", _data(raw=lambda c: b""), MUST),
    Mut("data/truncated", _data(raw=lambda c: _truncated(forge.npz(c.s.data), c.rng)), MUST),
    Mut("data/not a zip", _data(raw=lambda c: b"garbage" * 9), MUST),
    Mut("data/no x", _data(lambda c, d: d.pop("x")), MUST),
    Mut("data/no labels", _data(lambda c, d: d.pop(_ykey(c))), MUST),
    Mut(
        "data/labels as float",
        _data(
            lambda c, d: d.__setitem__(
                _ykey(c, "multiclass"), d[_ykey(c, "multiclass")].astype("f4")
            )
        ),
        MUST,
    ),
    Mut("data/class id 10", _data(lambda c, d: d[_ykey(c, "multiclass")].__setitem__(0, 10)), MUST),
    Mut("data/class id -1", _data(lambda c, d: d[_ykey(c, "multiclass")].__setitem__(0, -1)), MUST),
    Mut(
        "data/labels one short", _data(lambda c, d: d.__setitem__(_ykey(c), d[_ykey(c)][:-1])), MUST
    ),
    Mut(
        "data/labels (n, 1)",
        _data(
            lambda c, d: d.__setitem__(_ykey(c, "multiclass"), d[_ykey(c, "multiclass")][:, None])
        ),
        MUST,
    ),
    Mut(
        "data/multilabel 0.5",
        _data(
            lambda c, d: (
                d[_ykey(c, "multilabel")].__setitem__((0, 0), 0.5)
                if _ykey(c, "multilabel")
                else d.pop("x")
            )
        ),
        MUST,
    ),
    Mut(
        "data/multilabel as int",
        _data(
            lambda c, d: (
                d.__setitem__(_ykey(c, "multilabel"), d[_ykey(c, "multilabel")].astype("i8"))
                if _ykey(c, "multilabel")
                else None
            )
        ),
        EITHER,
    ),
    Mut("data/x NaN", _data(_set_x_value(np.nan)), MUST),
    Mut("data/x 3e38", _data(_set_x_value(3e38)), EITHER),
    Mut("data/x 1e20", _data(_set_x_value(1e20)), EITHER),
    Mut("data/x float64", _data(lambda c, d: d.__setitem__("x", d["x"].astype("f8"))), EITHER),
    Mut("data/x zero rows", _data(lambda c, d: d.update({k: v[:0] for k, v in d.items()})), MUST),
    Mut("data/x wrong shape", _data(lambda c, d: d.__setitem__("x", d["x"][:, :, :7])), MUST),
    Mut(
        "data/x pickled",
        _data(
            raw=lambda c: forge.npz({**c.s.data, "x": forge.npy(np.array([None], dtype=object))})
        ),
        MUST,
    ),
    Mut(
        "data/is a directory",
        lambda c: (c.dir.joinpath("dd.npz").mkdir(), c.train(data=str(c.dir / "dd.npz"))),
        MUST,
    ),
    # ---- --start-from
    Mut("start/missing a shared key", _start(lambda c, a, m: a.pop(_skey(c))), MUST),
    Mut(
        "start/extra key",
        _start(lambda c, a, m: a.__setitem__("nope.weight", np.zeros(3, "f4"))),
        MUST,
    ),
    Mut(
        "start/wrong shape",
        _start(lambda c, a, m: a.__setitem__(k := _skey(c), a[k].reshape(-1)[:-1])),
        MUST,
    ),
    Mut("start/NaN", _start(lambda c, a, m: a[_skey(c)].reshape(-1).__setitem__(0, np.nan)), MUST),
    Mut("start/3e38", _start(lambda c, a, m: a[_skey(c)].reshape(-1).__setitem__(0, 3e38)), EITHER),
    Mut(
        "start/float64",
        _start(lambda c, a, m: a.__setitem__(k := _skey(c), a[k].astype("f8"))),
        MUST,
    ),
    Mut(
        "start/truncated",
        _start(raw=lambda c: _truncated(forge.safetensors(c.s.start, c.s.start_meta), c.rng)),
        MUST,
    ),
    Mut("start/empty file", _start(raw=lambda c: b""), MUST),
    Mut("start/no tensors", _start(lambda c, a, m: forge.safetensors({}, m)), MUST),
    Mut(
        "start/heads only",
        _start(
            lambda c, a, m: forge.safetensors(
                {k: v for k, v in c.s.weights.items() if k not in c.s.start}, m
            )
        ),
        MUST,
    ),
    *[
        Mut(f"start/round {v!r}", _start(lambda c, a, m, v=v: m.__setitem__("round", v)), MUST)
        for v in ("-3", "abc", "1e3", "")
    ],
    Mut(
        "start/is a directory",
        lambda c: (c.dir.joinpath("s").mkdir(), c.train(start=str(c.dir / "s"))),
        MUST,
    ),
    Mut("start/missing", lambda c: c.train(start=str(c.dir / "nope.safetensors")), MUST),
    # ---- bundle: manifest JSON
    Mut(
        "manifest/truncated",
        _manifest(lambda c, m: _truncated(json.dumps(m).encode(), c.rng).decode("utf-8", "ignore")),
        MUST,
    ),
    Mut("manifest/empty", _manifest(lambda c, m: ""), MUST),
    Mut(
        "manifest/invalid UTF-8",
        lambda c: (
            (c.copy_bundle() / "manifest.json").write_bytes(b'{"format_version": 1, "x": "\xff"}'),
            c.any_command(),
        ),
        MUST,
    ),
    Mut("manifest/deep nesting", _manifest(lambda c, m: "[" * 100000), MUST),
    Mut("manifest/a list", _manifest(lambda c, m: "[1, 2]"), MUST),
    Mut("manifest/format_version 2", _set("format_version", 2), MUST),
    Mut("manifest/format_version true", _set("format_version", True), MUST),
    Mut(
        "manifest/is a directory",
        lambda c: (
            (c.copy_bundle() / "manifest.json").unlink(),
            (c.copy_bundle() / "manifest.json").mkdir(),
            c.any_command(),
        ),
        MUST,
    ),
    Mut(
        "manifest/missing",
        lambda c: ((c.copy_bundle() / "manifest.json").unlink(), c.any_command()),
        MUST,
    ),
    Mut("manifest/a random field deleted", _manifest(_random_delete), EITHER),
    Mut("manifest/a random field set to a hostile value", _manifest(_random_leaf), EITHER),
    *[
        Mut(f"manifest/normalisation {f} {v}", _manifest(_normalisation(f, v)), must)
        for f, v, must in (
            ("std", 0, MUST),
            ("std", -1.0, MUST),
            ("std", math.nan, MUST),
            ("std", math.inf, MUST),
            ("mean", math.nan, MUST),
            ("mean", math.inf, MUST),
            ("mean", 1e308, MUST),
            ("scale", math.nan, MUST),
            ("scale", math.inf, MUST),
            ("scale", 0, EITHER),
            ("std", 1e-45, EITHER),
            ("input_shape", [1, 9, 9], MUST),
            ("input_shape", [0, 8, 8], MUST),
            ("input_shape", [1, 10**6, 10**6], MUST),
            ("input_shape", [1, 8], MUST),
        )
    ],
    *[
        Mut(f"manifest/{w}", _manifest(_cross_ref(w)), must)
        for w, must in (
            ("shared_keys", MUST),
            ("weights map", MUST),
            ("weight_outputs map", MUST),
            ("target_inputs", MUST),
            ("head client", EITHER),
            ("client width", MUST),
            ("duplicate client", MUST),
            ("train_step clients", EITHER),
            ("swap backbone/head paths", MUST),
            ("columns out of range", MUST),
            ("columns reversed", MUST),
            ("labels empty", MUST),
            ("labels too few", MUST),
            ("labels not strings", MUST),
            ("kind flipped", EITHER),
            ("feature_dim", EITHER),
            ("no train steps", EITHER),
        )
    ],
    Mut(
        "manifest/path traversal",
        _set("widths.0.backbone.path", lambda c, v: f"../../bundle/{v}"),
        MUST,
    ),
    Mut("manifest/absolute path", _set("widths.0.backbone.path", "/etc/passwd"), MUST),
    Mut("manifest/path is a directory", _set("widths.0.backbone.path", "."), MUST),
    Mut("manifest/sha256 wrong", _set("widths.0.backbone.sha256", "0" * 64), MUST),
    Mut("manifest/opset a string", _set("opset", "x"), MUST),
    Mut("manifest/round -1", _set("round", -1), EITHER),
    # ---- bundle: files (sha256 in the manifest updated to match)
    *[
        Mut(f"bundle/{k} {h}", _bundle_file(k, h), MUST)
        for k, h in (
            ("backbone", "truncated"),
            ("backbone", "garbage"),
            ("backbone", "empty"),
            ("backbone", "other graph"),
            ("head", "truncated"),
            ("head", "other graph"),
            ("train_step", "garbage"),
            ("train_step", "other graph"),
            ("weights", "empty npz"),
            ("weights", "npz missing key"),
            ("weights", "npz NaN"),
            ("weights", "npz float64"),
            ("weights", "npz wrong shape"),
            ("weights", "npz pickled"),
            ("weights", "truncated"),
            ("backbone", "flipped"),
        )
    ],
    Mut("bundle/weights npz extra key", _bundle_file("weights", "npz extra key"), EITHER),
    Mut(
        "bundle/directory without manifest",
        lambda c: (setattr(c, "bundle", c.dir), c.any_command()),
        MUST,
    ),
    Mut("bundle/missing", lambda c: (setattr(c, "bundle", c.dir / "nope"), c.any_command()), MUST),
]
