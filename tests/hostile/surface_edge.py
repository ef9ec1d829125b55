"""Surface 3: ``fmtl-edge`` inputs and bundles, through ``mobile_client.cli.main`` in-process.

Setup: a real tiny run (digits, MLP) exported to a bundle with one client (``c00``,
width 1/2, a multiclass and a multilabel task by default), and valid inputs: ``.npy``
(one image, a batch, normalised floats), ``.npz``, PNG, PGM, a ``--data`` file and a
``--start-from`` update. Each case mutates one of: a predict input, the train data, a
train argument or output path, the ``--start-from`` file, or a copy of the bundle (its
manifest as JSON, an ``.onnx``, the weights ``.npz``), and runs ``info``, ``predict`` or
``train`` capturing stdout, stderr and the exit status.

Refused means exit status 2 and exactly one ``fmtl-edge: error:`` line (progress lines
of training aside) from a typed error (or an OSError); an untyped error that ``main()``
happens to catch counts as a traceback. Accepted runs are checked: predictions
finite, probabilities in [0, 1] summing to 1, labels from the manifest, one line per
input row; a written update readable by ``read_update`` with the expected base hash,
finite arrays of the declared shapes, and its heads file beside it. Every input file
and the bundle must be byte-identical afterwards, and a refused train leaves no output.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tests.hostile import forge
from tests.hostile.core import (
    Case,
    Mut,
    array_problems,
    changed,
    error_bases,
    judge_accepted,
    judge_refused,
    layout,
    one_line,
    tree_state,
)
from tests.hostile.edge_mutations import MUTATIONS, N_DATA, TASKS, Ctx, edge_config


# ----------------------------------------------------------------------------- the surface
class EdgeSurface:
    name = "fmtl-edge"
    mutations = MUTATIONS

    def __init__(self, work: Path, *, tasks: tuple[str, ...] = TASKS, **_: object) -> None:
        from export.run_export import export_run
        from fmtl_lightning.data import load_dataset
        from fmtl_lightning.simulation import run_config

        self.work = work
        work.mkdir(parents=True)
        self.tasks = tasks
        run_config(edge_config(tasks), work / "run", progress=False)
        self.bundle = export_run(work / "run", work / "bundle")
        m = json.loads((self.bundle / "manifest.json").read_text())
        self.manifest = m
        cl = m["clients"][0]
        self.shared = list(cl["shared_keys"])
        self.files = {
            "backbone": m["widths"][0]["backbone"]["path"],
            "head": m["heads"][0]["file"]["path"],
            "train_step": m["widths"][0]["train_steps"][0]["file"]["path"],
            "weights": cl["weights"]["path"],
        }
        with np.load(self.bundle / self.files["weights"]) as z:
            self.weights = {k: z[k] for k in z.files}
        norm = m["normalisation"]
        ds = load_dataset("digits", "train")
        self.px = np.asarray(ds.images[:N_DATA], dtype=np.uint8)
        self.xf = (
            (self.px.astype(np.float32) * np.float32(norm["scale"]) - np.float32(norm["mean"]))
            / np.float32(norm["std"])
        ).astype(np.float32)[:, None]
        from fmtl_lightning.tasks import get_task
        from mobile_client.batching import label_key

        labels = np.asarray(ds.labels[:N_DATA])
        self.data = {"x": self.xf, **{label_key(t): get_task(t).target(labels) for t in tasks}}
        rng = np.random.default_rng(0)
        self.start = {
            k: (self.weights[k] + rng.normal(0, 0.01, self.weights[k].shape)).astype(
                self.weights[k].dtype
            )
            for k in self.shared
        }
        self.start_meta = {
            "format": "fmtl-update",
            "format_version": "1",
            "client_id": "server",
            "round": "2",
            "width": "0.5",
            "num_examples": "1",
            "base_hash": "",
            "metrics": "{}",
        }
        d = work / "inputs"
        d.mkdir()
        files = {
            "img.npy": forge.npy(self.px[0]),
            "batch.npy": forge.npy(self.px[:5]),
            "float.npy": forge.npy(self.xf[:5]),
            "img.npz": forge.npz({"x": self.px[:3]}),
            "img.png": forge.png(self.px[0]),
            "img.pgm": forge.pgm(self.px[0]),
            "data.npz": forge.npz(self.data),
            "data_u8.npz": forge.npz({**self.data, "x": self.px}),
            "start.safetensors": forge.safetensors(self.start, self.start_meta),
        }
        self.inputs = {}
        for name, data in files.items():
            (d / name).write_bytes(data)
            self.inputs[name] = d / name
        self.pristine = tree_state([self.bundle, d])

    # ------------------------------------------------------------------ one case
    def run(self, mut: Mut, rng: np.random.Generator, i: int) -> Case:
        d = self.work / f"e{i}"
        d.mkdir()
        c = Ctx(rng, self, d)
        mut.make(c)
        before = tree_state([d])
        code, out, err, exc = run_cli(c.argv)
        label = f"{mut.name} [{c.kind}]"
        after = tree_state([d])
        outcome, detail = self._judge(mut, c, code, out, err, exc)
        # files: the pristine bundle and inputs never change; a case's own files neither,
        # except the outputs of an accepted train
        touched = changed(self.pristine, tree_state([self.bundle, self.inputs["data.npz"].parent]))
        if touched:
            return Case(self.name, label, "silently_wrong", f"changed pristine files {touched[:3]}")
        outputs = set()
        if c.kind == "train" and code == 0 and c.out is not None:
            from mobile_client.cli import local_path

            outputs = {str(c.out), str(local_path(c.out))}
        moved = [p for p in changed(before, after) if p not in outputs]
        if moved and outcome not in ("traceback",):
            what = "left or changed files" if code != 0 else "changed input files"
            return Case(
                self.name,
                label,
                "silently_wrong" if outcome != "accepted_wrongly" else outcome,
                f"{what} {[Path(p).name for p in moved[:3]]}; {detail}",
            )
        return Case(self.name, label, outcome, detail)

    def _judge(
        self, mut: Mut, c: Ctx, code: Any, out: str, err: str, exc: BaseException | None
    ) -> tuple[str, str]:
        if code == "exception":
            return "traceback", one_line(err.strip().splitlines()[-1] if err.strip() else "?")
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("epoch ")]
        if code == 2:
            if (
                "Traceback" in err
                or len(lines) != 1
                or not lines[0].startswith("fmtl-edge: error:")
            ):
                return "traceback", f"exit 2 with stderr {one_line(err)!r}"
            if exc is not None and not isinstance(exc, (*error_bases(), OSError)):
                return "traceback", (
                    f"untyped {type(exc).__name__} (exit 2 only because main() "
                    f"catches it): {one_line(lines[0])}"
                )
            return judge_refused(mut.expect, one_line(lines[0]))
        if code != 0:
            return "traceback", f"exit {code}: {one_line(err)}"
        problems, wrong = [], []
        if c.kind == "predict":
            wrong += self._predictions(c, out, problems)
        elif c.kind == "train":
            wrong += self._update(c, out, problems)
        elif "nan" in out.lower().split():
            wrong.append(f"info printed nan: {one_line(out)}")
        return judge_accepted(mut.expect, problems, wrong, mut.name)

    def _heads(self, c: Ctx) -> dict[str, dict]:
        try:
            m = json.loads(
                (
                    (c.bundle if c.bundle and c.bundle.is_dir() else self.bundle) / "manifest.json"
                ).read_text()
            )
        except Exception:  # noqa: BLE001
            m = self.manifest
        return {h["task"]: h for h in m.get("heads", []) if isinstance(h, dict)}

    def _predictions(self, c: Ctx, out: str, problems: list[str]) -> list[str]:
        task = c.argv[c.argv.index("--task") + 1]
        pristine = {h["task"]: h for h in self.manifest["heads"]}[task]
        head = self._heads(c).get(task, pristine)
        labels, n = head.get("labels", []), len(pristine["labels"])
        if head.get("labels") != pristine["labels"] or head.get("kind") != pristine["kind"]:
            problems.append(
                f"predicted with a head whose labels/kind differ from its graph's "
                f"{n} outputs: {head.get('labels')} {head.get('kind')}"
            )
        wrong: list[str] = []
        rows = [ln.split("\t") for ln in out.splitlines() if ln.strip()]
        if rows and rows[0][0] == "input":  # the header line
            if rows[0][2:] != [" ".join(map(str, labels))]:
                wrong.append(f"header {rows[0]!r} does not name the labels")
            rows = rows[1:]
        if c.rows is not None and len(rows) != c.rows:
            wrong.append(f"{len(rows)} prediction lines for {c.rows} inputs")
        for r in rows:
            if len(r) != 3:
                wrong.append(f"malformed line {r!r}")
                continue
            probs = [float(v) for v in r[2].split()]
            if len(probs) != n or not all(math.isfinite(p) and 0 <= p <= 1 for p in probs):
                wrong.append(f"probabilities {r[2]!r} ({n} expected, finite, in [0, 1])")
            elif pristine["kind"] == "multiclass":
                if abs(sum(probs) - 1) > 1e-3:
                    wrong.append(f"probabilities sum to {sum(probs)}")
                if r[1] != pristine["labels"][int(np.argmax(probs))]:
                    wrong.append(f"prediction {r[1]!r} is not the label of the largest probability")
            elif r[1] != "-" and not set(r[1].split(",")) <= set(pristine["labels"]):
                wrong.append(f"prediction {r[1]!r} is not a set of labels")
            if wrong:
                break
        del labels
        return wrong

    def _update(self, c: Ctx, out: str, problems: list[str]) -> list[str]:
        from mobile_client.cli import local_path
        from mobile_client.update import read_update, state_hash

        assert c.out is not None
        wrong = []
        start = self.weights if c.start is None else c.start
        if c.start is not None and set(c.start) != set(self.shared):
            problems.append(f"--start-from keys {sorted(c.start)[:3]}... are not the shared keys")
        base = state_hash({k: start[k] for k in self.shared if k in start})
        try:
            arrays, meta = read_update(c.out, expected_base_hash=base)
        except Exception as exc:  # noqa: BLE001
            return [f"the written update does not read back: {type(exc).__name__}: {exc}"]
        want = {k: (self.weights[k].shape, self.weights[k].dtype) for k in self.shared}
        wrong += array_problems(arrays, want, "update")
        if c.round is not None and meta.round != c.round:
            wrong.append(f"update round {meta.round}, --round {c.round}")
        if meta.round < 0:
            problems.append(f"update round {meta.round}")
        if meta.num_examples != N_DATA or meta.client_id != "c00" or meta.width != 0.5:
            wrong.append(f"update metadata {meta}")
        if not all(math.isfinite(v) for v in meta.metrics.values()):
            wrong.append(f"update metrics {meta.metrics}")
        if "nan" in out.lower():
            wrong.append(f"stdout: {one_line(out)}")
        lp = local_path(c.out)
        if not lp.is_file():
            wrong.append(f"no local-state file {lp.name}")
        else:
            from mobile_client.safetensors_np import load_file

            local, _ = load_file(lp)
            wrong += array_problems(
                local,
                layout({k: v for k, v in self.weights.items() if k not in self.shared}),
                "local state",
            )
        return wrong


# ----------------------------------------------------------------------------- running the CLI
def run_cli(argv: list[str]) -> tuple[Any, str, str, BaseException | None]:
    """``mobile_client.cli.main(argv)`` in-process: (exit code, stdout, stderr, the exception a
    command raised, even when ``main`` caught it). An exception escaping ``main`` gives the
    code ``"exception"`` and its traceback as stderr."""
    import traceback

    import mobile_client.cli as cli

    seen: list[BaseException] = []
    saved = {n: getattr(cli, n) for n in ("cmd_info", "cmd_predict", "cmd_train")}

    def wrap(fn: Callable) -> Callable:
        def inner(args: Any) -> int:
            try:
                return fn(args)
            except BaseException as exc:
                seen.append(exc)
                raise

        return inner

    out, err = io.StringIO(), io.StringIO()
    for n, fn in saved.items():
        setattr(cli, n, wrap(fn))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code: Any = cli.main(argv)
            except SystemExit as exc:
                code = exc.code
            except BaseException:  # noqa: BLE001
                code = "exception"
                err.write(traceback.format_exc())
    finally:
        for n, fn in saved.items():
            setattr(cli, n, fn)
    return code, out.getvalue(), err.getvalue(), seen[-1] if seen else None
