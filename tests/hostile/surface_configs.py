"""Surface 4: run configs, through ``fmtl_lightning.config.load_config`` on a YAML file.

Bases: ``examples/demo.yaml``, ``examples/flower/fmtl.yaml`` and the tests' small
configs (kill sweep, edge, deploy, a BatchNorm/FedAvg/label-split one, a Ditto one with
dynamic widths and FedRolex, a FedRep/FedBN one). Each case mutates one as text
(truncation, byte flips, empty, a directory, invalid UTF-8, deep nesting, YAML tags,
aliases, duplicate keys) or as data (a field set to a hostile value, deleted, renamed,
an unknown field, the wrong container) and loads it.

An accepted config must satisfy invariants checked here independently of the
validator: every float finite and in its range, every integer bounded (seed, rounds,
counts, widths of layers, samples, steps), a run name that is one safe path
component. Then, as proof that accepted means runs, a few accepted mutated configs
(``--runs``, default 5, tiny bases only) are run for one round with the real CLI,
``fmtl simulate``, in a subprocess whose working directory holds the ``runs/`` dir:
it must finish (or still be training at the time limit), and write nothing outside it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tests.hostile.core import (
    EITHER,
    MUST,
    VALID,
    Case,
    Mut,
    judge_accepted,
    judge_exception,
    judge_refused,
    one_line,
    tree_state,
)

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 90.0  # seconds a sampled accepted config may train before it counts as running


def bases() -> dict[str, tuple[str, bool]]:
    """name -> (YAML text, tiny: cheap enough to run one round)."""
    from tests.hostile.kill_sweep import CONFIG as KILL
    from tests.hostile.surface_edge import TASKS, edge_config
    from tests.hostile.surface_updates import BASE_CFG, BN_CFG

    tiny: dict[str, dict] = {
        "kill": KILL,
        "edge": edge_config(TASKS),
        "deploy": BASE_CFG,
        "bn-fedavg-labelsplit": {
            **copy.deepcopy(BN_CFG),
            "algorithm": {
                "name": "fedavg",
                "masked_ce": True,
                "label_split": True,
                "weighting": "uniform",
            },
        },
        "ditto-dynamic-fedrolex": {
            **copy.deepcopy(KILL),
            "clients": [
                {"count": 2, "tasks": ["digits/digit"], "width": 1.0, "lam": 0.1},
                {"count": 1, "tasks": ["digits/ge5"], "width": 0.25},
            ],
            "algorithm": {
                "name": "ditto",
                "lam": 0.5,
                "slicing": "fedrolex",
                "width_assignment": "dynamic",
                "dynamic_widths": [0.25, 0.5, 1.0],
            },
            "compare_local": False,
        },
        "fedrep-fedbn-shards": {
            **copy.deepcopy(BN_CFG),
            "algorithm": {"name": "fedrep", "policy": "fedbn", "rep_head_epochs": 1},
            "data": {
                "samples_per_client": 60,
                "partition": {"kind": "shards", "classes_per_client": 2},
            },
            "federation": {"rounds": 2, "local_steps": 2, "batch_size": 8, "eval_every": 2},
        },
    }
    out = {k: (yaml.safe_dump(v, sort_keys=False), True) for k, v in tiny.items()}
    out["demo.yaml"] = ((ROOT / "examples/demo.yaml").read_text(), False)
    out["flower/fmtl.yaml"] = ((ROOT / "examples/flower/fmtl.yaml").read_text(), True)
    return out


@dataclasses.dataclass
class Ctx:
    rng: np.random.Generator
    text: str
    base: str

    def data(self) -> dict[str, Any]:
        return yaml.safe_load(self.text)

    def leaves(self, d: Any, prefix: tuple = ()) -> list[tuple]:
        if isinstance(d, dict):
            return [p for k, v in d.items() for p in self.leaves(v, (*prefix, k))] or [prefix]
        if isinstance(d, list) and d and isinstance(d[0], dict):
            return [p for i, v in enumerate(d) for p in self.leaves(v, (*prefix, i))]
        return [prefix]

    def pick_leaf(self, d: dict) -> tuple:
        leaves = [p for p in self.leaves(d) if p]
        return leaves[int(self.rng.integers(len(leaves)))]


def _get(d: Any, path: tuple) -> Any:
    for p in path:
        d = d[p]
    return d


def _put(d: Any, path: tuple, value: Any) -> None:
    """Set ``path`` (creating missing mappings); ``...`` deletes it."""
    for p in path[:-1]:
        if isinstance(d, dict) and p not in d:
            d[p] = {}
        d = d[p]
    if value is ...:
        d.pop(path[-1], None) if isinstance(d, dict) else None
    else:
        d[path[-1]] = value


def _dump(d: Any) -> str:
    return yaml.safe_dump(d, sort_keys=False, allow_unicode=True)


def _field(path: str, value: Any):
    """Set a dotted field (``clients.0.width``) to ``value`` (a callable gets the old one)."""
    keys = tuple(int(p) if p.isdigit() else p for p in path.split("."))

    def make(c: Ctx) -> str:
        d = c.data()
        old = _get_or_none(d, keys)
        _put(d, keys, value(old) if callable(value) else value)
        return _dump(d)

    return make


def _get_or_none(d: Any, keys: tuple) -> Any:
    try:
        return _get(d, keys)
    except (KeyError, IndexError, TypeError):
        return None


HOSTILE = [
    math.nan,
    math.inf,
    -math.inf,
    1e30,
    -1e30,
    10**9,
    -1,
    0,
    2**70,
    -(2**70),
    2**31,
    0.5,
    1.5,
    True,
    None,
    "",
    "x",
    "../../x",
    [],
    {},
    [10**9],
    ["a"],
    10**400,
    1e-320,
    "1e3",
    2.0,
    [None],
]


def _random_leaf(c: Ctx) -> str:
    d = c.data()
    path = c.pick_leaf(d)
    _put(d, path, HOSTILE[int(c.rng.integers(len(HOSTILE)))])
    return _dump(d)


def _random_delete(c: Ctx) -> str:
    d = c.data()
    _put(d, c.pick_leaf(d), ...)
    return _dump(d)


def _random_container(c: Ctx) -> str:
    d = c.data()
    path = c.pick_leaf(d)[:-1] or ("data",)
    _put(d, path, [1, 2] if isinstance(_get_or_none(d, path), dict) else {"a": 1})
    return _dump(d)


def _unknown_key(c: Ctx) -> str:
    d = c.data()
    path = c.pick_leaf(d)
    _put(d, (*path[:-1], f"{path[-1]}_typo"), 1)
    return _dump(d)


def _truncate(c: Ctx) -> str:
    b = c.text.encode()
    return b[: int(c.rng.integers(0, len(b)))].decode("utf-8", "ignore")


def _flip(c: Ctx) -> bytes:
    b = bytearray(c.text.encode())
    i = int(c.rng.integers(len(b)))
    b[i] ^= 1 << int(c.rng.integers(7))
    return bytes(b)


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 24 else f"{r[:12]}...({len(r)} chars)"


MUTATIONS: list[Mut] = [
    Mut("valid", lambda c: c.text, VALID),
    Mut("valid/round trip", lambda c: _dump(c.data()), VALID),
    Mut("valid/lr 0.01", _field("optimizer.lr", 0.01), VALID),
    Mut("valid/seed 2**32-1", _field("seed", 2**32 - 1), VALID),
    Mut("valid/name with dots", _field("name", "run-1.2_a"), VALID),
    Mut("text/truncated", _truncate, EITHER),
    Mut("text/byte flip", _flip, EITHER),
    Mut("text/empty", lambda c: "", MUST),
    Mut("text/only a comment", lambda c: "# nothing\n", MUST),
    Mut(
        "text/invalid UTF-8",
        lambda c: c.text.encode()[:10] + b"\xff\xfe" + c.text.encode()[10:],
        MUST,
    ),
    Mut("text/NUL byte", lambda c: c.text.replace("\n", "\n\0", 1), EITHER),
    Mut("text/deep nesting", lambda c: "a: " + "[" * 20000, MUST),
    Mut("text/deep nesting (flow)", lambda c: "clients: " + "[" * 2000 + "]" * 2000, MUST),
    Mut("text/python tag", lambda c: "!!python/object/apply:os.system ['echo pwned']\n", MUST),
    Mut(
        "text/alias bomb",
        lambda c: (
            "a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a]\n"
            "c: &c [*b, *b, *b, *b, *b]\nname: *c\n" + c.text
        ),
        MUST,
    ),
    Mut("text/a list", lambda c: "- 1\n- 2\n", MUST),
    Mut("text/a scalar", lambda c: "42\n", MUST),
    Mut("text/duplicate key", lambda c: c.text + "\nseed: 7\n", EITHER),
    Mut("text/tab indentation", lambda c: c.text.replace("\n  ", "\n\t"), EITHER),
    Mut("file/is a directory", lambda c: "dir", MUST),
    Mut("file/missing", lambda c: "missing", MUST),
    Mut("file/symlink to /dev/null", lambda c: "devnull", MUST),
    Mut("data/random field set to a hostile value", _random_leaf, EITHER),
    Mut("data/random field deleted", _random_delete, EITHER),
    Mut("data/random mapping replaced", _random_container, MUST),
    Mut("data/unknown field", _unknown_key, MUST),
    Mut("data/field name in capitals", lambda c: c.text.replace("seed:", "SEED:"), MUST),
    Mut("data/clients empty", _field("clients", []), MUST),
    Mut("data/no clients", _field("clients", ...), MUST),
    Mut("data/tasks empty", _field("clients.0.tasks", []), MUST),
    Mut("data/unknown task", _field("clients.0.tasks", ["digits/nope"]), MUST),
    Mut(
        "data/tasks of two datasets",
        _field("clients.0.tasks", ["digits/digit", "mnist/digit"]),
        MUST,
    ),
    Mut("data/rounds 2.0", _field("federation.rounds", 2.0), EITHER),
    Mut("data/1000 hidden layers", _field("model.hidden", [8] * 1000), EITHER),
    Mut("data/rounds true", _field("federation.rounds", True), MUST),
    Mut("data/lr as a string", _field("optimizer.lr", "0.1"), MUST),
    *[
        Mut(f"value/{path} {_short(v)}", _field(path, v), MUST)
        for path, v in (
            ("seed", -1),
            ("seed", 2**70),
            ("seed", 2**64),
            ("model.hidden", [10**9]),
            ("model.hidden", [10**5, 10**5]),
            ("model.hidden", [0]),
            ("clients.0.count", 10**9),
            ("clients.0.count", 0),
            ("federation.rounds", 10**30),
            ("federation.rounds", 1e30),
            ("federation.rounds", 0),
            ("optimizer.lr", math.inf),
            ("optimizer.lr", math.nan),
            ("optimizer.lr", -0.1),
            ("optimizer.momentum", math.nan),
            ("optimizer.momentum", 5.0),
            ("optimizer.weight_decay", math.inf),
            ("name", "../../x"),
            ("name", "/tmp/fmtl-sweep-abs"),
            ("name", ""),
            ("name", "."),
            ("name", ".."),
            ("name", "a/b"),
            ("name", "x\0y"),
            ("name", "n" * 300),
            ("name", "a\nb"),
            ("data.test_fraction", math.nan),
            ("data.test_fraction", 1.0),
            ("data.partition.alpha", math.inf),
            ("data.partition.alpha", math.nan),
            ("data.samples_per_client", 10**12),
            ("data.samples_per_client", 3),
            ("federation.batch_size", 10**12),
            ("federation.batch_size", 0),
            ("federation.local_steps", 10**12),
            ("federation.local_epochs", 10**9),
            ("federation.eval_every", 0),
            ("federation.fraction", math.nan),
            ("federation.fraction", 0.0),
            ("clients.0.width", math.nan),
            ("clients.0.width", 0.0),
            ("clients.0.width", 1.5),
            ("clients.0.lam", math.inf),
            ("clients.0.lam", math.nan),
            ("algorithm.lam", math.inf),
            ("algorithm.dynamic_widths", [math.nan]),
            ("algorithm.rep_head_epochs", 10**9),
            ("data.partition.classes_per_client", 10**9),
            ("algorithm.name", "fedsgd"),
            ("model.family", "resnet"),
        )
    ],
]

# invariants of an accepted config (independent of the validator)
INT_BOUNDS = {
    "seed": (0, 2**63 - 1),  # torch.manual_seed takes < 2**64, numpy's seeding >= 0
    "rounds": (1, 10**7),
    "count": (1, 10**5),
    "hidden": (1, 10**5),
    "samples_per_client": (4, 10**8),
    "batch_size": (1, 10**8),
    "local_steps": (1, 10**9),
    "local_epochs": (0, 10**6),
    "eval_every": (1, 10**9),
    "rep_head_epochs": (0, 10**6),
    "classes_per_client": (1, 10**6),
}
FLOAT_RANGES = {  # (low, high, low inclusive, high inclusive)
    "lr": (0.0, 1e6, False, True),
    "momentum": (0.0, 1.0, True, True),
    "weight_decay": (0.0, 1e6, True, True),
    "width": (0.0, 1.0, False, True),
    "dynamic_widths": (0.0, 1.0, False, True),
    "fraction": (0.0, 1.0, False, True),
    "test_fraction": (0.0, 1.0, False, False),
    "alpha": (0.0, 1e12, False, True),
    "lam": (0.0, 1e12, True, True),
}


def invariants(cfg: Any) -> list[str]:
    out: list[str] = []

    def walk(v: Any, name: str, where: str) -> None:
        if dataclasses.is_dataclass(v):
            for f in dataclasses.fields(v):
                walk(getattr(v, f.name), f.name, f"{where}.{f.name}".lstrip("."))
        elif isinstance(v, tuple):
            for i, x in enumerate(v):
                walk(x, name, f"{where}[{i}]")
        elif isinstance(v, bool) or v is None or isinstance(v, str):
            return
        elif isinstance(v, float):
            lo, hi, lo_in, hi_in = FLOAT_RANGES.get(name, (-1e300, 1e300, True, True))
            if not (
                math.isfinite(v)
                and (lo <= v if lo_in else lo < v)
                and (v <= hi if hi_in else v < hi)
            ):
                out.append(f"{where} = {v}")
        elif isinstance(v, int):
            lo, hi = INT_BOUNDS.get(name, (-(2**63), 2**63 - 1))
            if not lo <= v <= hi:
                out.append(f"{where} = {v}")

    walk(cfg, "", "")
    name = cfg.name
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or len(name.encode()) > 255
        or any(ch in name for ch in "/\\\0")
        or any(ord(ch) < 32 for ch in name)
    ):
        out.append(f"name {name!r} is not one safe path component")
    clients = sum(g.count for g in cfg.clients)
    if clients > 10**5:
        out.append(f"{clients} clients")
    dims = [64 * 64, *cfg.model.hidden]  # generous input size
    params = sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=False)) * 9
    if params > 10**9:
        out.append(f"model.hidden {list(cfg.model.hidden)[:4]} gives ~{params:.2g} weights")
    return out


class ConfigSurface:
    name = "configs"
    mutations = MUTATIONS

    def __init__(
        self, work: Path, *, runs: int = 5, run_timeout: float = RUN_TIMEOUT, **_: object
    ) -> None:
        self.work = work
        work.mkdir(parents=True)
        self.bases = bases()
        self.runs = runs
        self.run_timeout = run_timeout
        self.accepted: list[tuple[str, str]] = []  # (label, YAML text) of accepted mutants
        self.rng = np.random.default_rng(len(self.bases))

    def run(self, mut: Mut, rng: np.random.Generator, i: int) -> Case:
        from fmtl_lightning.config import load_config

        names = sorted(self.bases)
        base = names[int(rng.integers(len(names)))]
        text, tiny = self.bases[base]
        c = Ctx(rng, text, base)
        made = mut.make(c)
        label = f"{mut.name} [{base}]"
        d = self.work / f"c{i}"
        d.mkdir()
        path = d / "config.yaml"
        if made == "dir":
            path.mkdir()
        elif made == "devnull":
            path.symlink_to("/dev/null")
        elif made != "missing":
            path.write_bytes(
                made if isinstance(made, bytes) else made.encode("utf-8", "surrogatepass")
            )
        before = tree_state([d])
        try:
            cfg = load_config(path)
        except BaseException as exc:  # noqa: BLE001 - judged, never hidden
            outcome, detail = judge_exception(exc)
            if outcome == "refused":
                outcome, detail = judge_refused(mut.expect, detail)
                if "\n" in str(exc):
                    detail = f"(multi-line message) {detail}"
            return self._files(Case(self.name, label, outcome, detail), d, before)
        problems = invariants(cfg)
        outcome, detail = judge_accepted(mut.expect, problems, [], mut.name)
        if outcome == "ok" and tiny and mut.expect is not VALID and path.is_file():
            self.accepted.append((label, path.read_text()))
        return self._files(Case(self.name, label, outcome, detail), d, before)

    def _files(self, case: Case, d: Path, before: dict) -> Case:
        if tree_state([d]) != before:
            return Case(
                case.surface,
                case.mutation,
                "silently_wrong",
                f"the config file changed on disk; {case.detail}",
            )
        return case

    # ------------------------------------------------------------------ accepted == runs
    def finish(self, log: Any) -> list[Case]:
        cases = []
        pool = list(self.accepted)
        picks = self.rng.permutation(len(pool))[: self.runs] if pool else []
        for j, idx in enumerate(picks):
            label, text = pool[int(idx)]
            case = run_one_round(
                self.work / f"run{j}", text, f"run 1 round: {label}", self.run_timeout
            )
            log(f"  {case.outcome}: {case.mutation}: {case.detail}")
            cases.append(case)
        return cases


def run_one_round(d: Path, text: str, label: str, timeout: float = RUN_TIMEOUT) -> Case:
    """``fmtl simulate`` on ``text`` with federation.rounds = 1, in ``d/cwd``."""
    raw = yaml.safe_load(text)
    raw.setdefault("federation", {})
    if isinstance(raw["federation"], dict):
        raw["federation"]["rounds"] = 1
    cwd = d / "cwd"
    cwd.mkdir(parents=True)
    cfg = d / "config.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    before = {p.name for p in d.iterdir()}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "fmtl_lightning.cli",
        "simulate",
        "--config",
        str(cfg),
        "--no-progress",
    ]
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return Case("configs", label, "ok", f"still training after {timeout:g} s (no error)")
    outside = sorted({p.name for p in d.iterdir()} - before)
    name = str(raw.get("name", ""))
    if name.startswith("/") and Path(name).exists():
        outside.append(name)
        import shutil

        shutil.rmtree(name, ignore_errors=True)
    stray = [p for p in cwd.iterdir() if p.name != "runs"]
    if outside or stray:
        return Case(
            "configs",
            label,
            "accepted_wrongly",
            f"the run wrote outside runs/: {outside + [p.name for p in stray]}",
        )
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    if r.returncode == 0:
        return Case("configs", label, "ok", "")
    if r.returncode == 2 and err and "Traceback" not in r.stderr:
        return Case(
            "configs",
            label,
            "accepted_wrongly",
            f"accepted by load_config, refused by the run: {one_line(err[-1])}",
        )
    return Case(
        "configs",
        label,
        "traceback",
        f"exit {r.returncode}: {one_line(err[-1] if err else '(no stderr)')}",
    )
