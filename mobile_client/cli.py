"""``fmtl-edge``: inspect a bundle, predict, and train locally on a device (numpy + onnxruntime).

    fmtl-edge info DIR [--memory-mb N]
    fmtl-edge predict DIR --task T [--width R] [--client C] [--probs] INPUTS...
    fmtl-edge train DIR --data local.npz [--width R] [--epochs E] [--batch-size B]
                    [--lr LR] [--head-only] [--start-from UPDATE.safetensors]
                    [--round N] [--out update.safetensors] [--client C]

``predict`` prints a header line (``input``, the task, and with ``--probs`` the labels
in the order of the probabilities), then one tab-separated row per example: the input
(``file[i]`` for a batch), the predicted label (multi-label: every label with p > 0.5,
comma-separated, or ``-``) and with ``--probs`` the probabilities, space-separated.
``predict`` without ``--client`` uses the one client with a head for ``T`` (at ``R``);
when several clients have one (FedPer: a head per client), it names them and asks for
``--client``. ``train`` needs ``--client`` unless the bundle has one client.

Inputs for ``predict``: ``.npy`` (one example of the bundle's ``input_shape``, such as
an image (H, W)/(C, H, W) or a feature vector (F,), or a batch), ``.npz`` (key ``x``),
and, for image bundles (``input_shape`` [C, H, W], C 1 or 3) with Pillow installed
(``pip install 'fmtl-lightning[images]'``), PNG and PGM images: 8-bit gray, palette, RGB
or RGBA, converted to the bundle's C channels (alpha over black) and resized to its
H x W (see :mod:`mobile_client.inputs`).
``train`` reads ``x`` and one ``y__<task, '/' -> '__'>`` per task from ``--data``;
it writes the update (shared arrays + metadata) to ``--out`` and the client's local
arrays (heads) to ``--out`` with suffix ``.local.safetensors``; both paths are
checked before training starts, and both files are written atomically (after a
failure neither is left). Neither output may be one of the command's inputs (the
``--data`` file, ``--start-from``, the manifest or any file of the bundle): that is
refused before training. ``--width`` must be a finite number in (0, 1], ``--lr`` finite
and > 0, ``--epochs`` and ``--batch-size`` >= 1 (a run of zero steps is refused, not
written), ``--seed`` and ``--round`` >= 0, ``--memory-mb`` finite and >= 0. Errors print
one line ``fmtl-edge: error: ...`` and exit with status 2.

``--start-from`` takes the server's shared arrays at the client's width or at full
width (a checkpoint's ``global.safetensors``): ``train`` cuts full-width arrays to the
client's width itself (the manifest's ``slicing`` record; :mod:`mobile_client.slicing`),
with the rolling window of the round in the file's ``round`` metadata (``fedrolex``).

Memory (``info --memory-mb N``): the memory a width's model needs on top of the edge
runtime itself (Python, numpy, onnxruntime), measured by ``fmtl export`` in a fresh
process (:mod:`mobile_client.memory`: the growth of peak RSS while one client of the
width predicts one example and takes one training step at batch 32) and recorded in
the manifest's ``widths[i].memory``. A width fits N MB when its training peak does;
the runtime's own peak RSS, measured alongside, is printed apart. Manifests without a
measurement fall back to an estimate, per width, in bytes::

    2 x (backbone file + the width's head files)             # graph + ORT's copy
    + 4 x ACT_FACTOR x TRAIN_BATCH x (C*H*W + feature_dim)   # float32 activations
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mobile_client.errors import FMTLError, InputError, error_line
from mobile_client.inputs import IMAGE_FORMATS, read_client_data, read_inputs
from mobile_client.manifest import MANIFEST_NAME

TRAIN_BATCH = 32
ACT_FACTOR = 4  # intermediate activations per input/feature element, rough upper bound


class CLIError(FMTLError):
    """A bad argument or input file for ``fmtl-edge`` (the message says which)."""


def _as_batch(x: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    """One example (``input_shape``, or (H, W) of a grayscale image) -> a batch of one."""
    one = {tuple(input_shape)}
    if len(input_shape) == 3 and input_shape[0] == 1:
        one.add(tuple(input_shape[1:]))
    return x[None] if x.shape in one else x


# ----------------------------------------------------------------------------- commands
def _client(args: argparse.Namespace, client_id: str | None = None):
    from mobile_client.manifest import load_manifest
    from mobile_client.runtime import EdgeClient

    cid = client_id or args.client
    if cid is None:
        ids = [c.client for c in load_manifest(args.dir).clients]
        if len(ids) != 1:
            raise CLIError(f"{args.dir}: the bundle has {len(ids)} clients ({', '.join(ids)}): "
                           "name one with --client")  # fmt: skip
    client = EdgeClient(args.dir, cid)
    if args.width is not None:
        try:
            client._width(args.width)  # the client's own width
        except InputError as exc:
            raise InputError(f"--width {args.width:g}: {exc}") from exc
    return client


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f} MB"


def memory_estimate(m, root: Path, width: float) -> int:
    """Bytes the model needs at ``width`` beyond the runtime: the manifest's measured
    training peak, else the estimate of the module docstring."""
    we = m.width(width)
    if we.memory is not None:
        return max(we.memory.train_bytes or 0, we.memory.predict_bytes)
    files = {we.backbone.path} | {h.file.path for h in m.heads if abs(h.width - we.width) < 1e-9}
    size = sum((root / p).stat().st_size for p in files)
    act = 4 * ACT_FACTOR * TRAIN_BATCH * (math.prod(m.normalisation.input_shape) + we.feature_dim)
    return 2 * size + act


def _check_width(width: float | None) -> None:
    if width is not None and not (math.isfinite(width) and 0 < width <= 1):
        raise InputError(f"--width must be a finite number in (0, 1], got {width:g}")


def cmd_info(args: argparse.Namespace) -> int:
    from mobile_client.manifest import load_manifest, verify_files

    mb = args.memory_mb
    if mb is not None and not (math.isfinite(mb) and mb >= 0):
        raise CLIError(f"--memory-mb must be a finite number >= 0, got {mb:g}")
    m = load_manifest(args.dir)
    root = Path(args.dir)
    verify_files(root, m)
    print(f"bundle {root}: format {m.format_version}, opset {m.opset}, algorithm "
          f"{m.algorithm or '-'}, round {m.round}")  # fmt: skip
    n = m.normalisation
    print(f"input {list(n.input_shape)}: x = (pixels * {n.scale:.6g} - {n.mean:.6g}) / {n.std:.6g}")
    for c in m.clients:
        print(f"client {c.client}: width {c.width:g}, tasks {', '.join(c.tasks)}, "
              f"{len(c.shared_keys)} shared keys")  # fmt: skip
    print("files:")
    seen = set()
    for f in m.file_entries():
        if f.path not in seen:
            seen.add(f.path)
            print(f"  {f.path:40s} {f.kind:11s} {_mb((root / f.path).stat().st_size)}")
    print("widths (memory beyond the runtime):")
    fits = []
    runtime = [we.memory.runtime_bytes for we in m.widths if we.memory is not None]
    for we in m.widths:
        est = memory_estimate(m, root, we.width)
        tasks = sorted({hd.task for hd in m.heads if abs(hd.width - we.width) < 1e-9})
        fit = ""
        if args.memory_mb is not None:
            ok = est <= args.memory_mb * 2**20
            fits += [f"{we.width:g}"] if ok else []
            fit = f" ({'fits' if ok else 'does NOT fit'} in {args.memory_mb:g} MB)"
        if we.memory is not None:
            tb = we.memory.train_bytes
            train = "no step graph" if tb is None else _mb(tb)
            mem = (f"measured (client {we.memory.client}): predict {_mb(we.memory.predict_bytes)}"
                   f", train at batch {we.memory.batch} {train}")  # fmt: skip
        else:
            mem = f"estimate {_mb(est)} (not measured at export)"
        print(f"  width {we.width:g}: feature_dim {we.feature_dim}, tasks "
              f"{', '.join(tasks) or '-'}, {mem}{fit}")  # fmt: skip
    if runtime:
        print(f"runtime (Python, numpy, onnxruntime), measured at export: {_mb(max(runtime))}")
    if args.memory_mb is not None:
        print(f"widths that fit {args.memory_mb:g} MB: {', '.join(fits) or 'none'}")
    return 0


def predict_client(m, task: str, width: float | None) -> str:
    """The one client of manifest ``m`` with a head for ``task`` (at ``width``), or a
    :class:`CLIError` that names the candidates and ``--client``."""
    has = [c for c in m.clients if any(h.task == task for h in m.heads_of(c.client))]
    if not has:
        tasks = sorted({h.task for h in m.heads})
        raise InputError(f"task {task!r} has no head in this bundle; tasks: {', '.join(tasks)}")
    at = [c for c in has if width is None or abs(c.width - width) < 1e-9]
    if not at:
        ws = ", ".join(sorted({f"{c.width:g}" for c in has}))
        raise InputError(f"task {task!r} has heads at width {ws} only, not at --width "
                         f"{width:g} (clients {', '.join(c.client for c in has)})")  # fmt: skip
    if len(at) > 1:
        raise CLIError(
            f"task {task!r} has {len(at)} heads, one per client, each trained on its own "
            f"data ({', '.join(c.client for c in at)}): name one with --client"
        )
    return at[0].client


def predict_header(task: str, kind: str, labels: Sequence[str], probs: bool) -> str:
    """The first line of ``predict``'s output: its columns, tab-separated."""
    pred = task if kind == "multiclass" else f"{task} (labels with p > 0.5, comma-separated)"
    return "\t".join(["input", pred, *([" ".join(labels)] if probs else [])])


def cmd_predict(args: argparse.Namespace) -> int:
    from mobile_client.manifest import load_manifest

    _check_width(args.width)
    cid = args.client or predict_client(load_manifest(args.dir), args.task, args.width)
    client = _client(args, cid)
    head = client.head(args.task)
    norm = client.entry.normalisation
    shape = norm.input_shape
    header = predict_header(args.task, head.kind, head.labels, args.probs)
    for p in args.inputs:
        path = Path(p)
        if path.suffix.lower() in IMAGE_FORMATS and not norm.is_image:
            raise InputError(
                f"{path}: an image input, but this bundle takes inputs of shape {list(shape)}, "
                "not an image [C, H, W]: give a .npy or .npz (key x) of that shape"
            )
        x = _as_batch(read_inputs(path, shape if norm.is_image else None), shape)
        try:
            logits = client.predict(args.task, x, args.width)
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from exc
        with np.errstate(over="ignore"):  # exp(-logit) of a very negative logit: inf -> p = 0
            if head.kind == "regression":  # the outputs are the predicted values
                probs = logits
            elif head.kind == "multiclass":
                z = logits - logits.max(axis=1, keepdims=True)
                probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
            else:
                probs = 1.0 / (1.0 + np.exp(-logits))
        for i in range(len(logits)):
            name = f"{path}[{i}]" if len(logits) > 1 else str(path)
            if head.kind == "regression":
                pred = " ".join(f"{n}={v:.6g}" for n, v in zip(head.labels, logits[i], strict=True))
            elif head.kind == "multiclass":
                pred = head.labels[int(np.argmax(logits[i]))]  # the manifest has one per column
            else:
                on = [head.labels[j] for j in range(logits.shape[1]) if logits[i, j] > 0]
                pred = ",".join(on) or "-"
            if header:  # once, with the first row (an error before it prints nothing)
                print(header)
                header = ""
            line = f"{name}\t{pred}"
            if args.probs:
                line += "\t" + " ".join(f"{v:.4f}" for v in probs[i])
            print(line)
    return 0


def _check_output(path: Path, what: str) -> None:
    """Refuse an output path that cannot be written, before any work is done."""
    if path.is_dir():
        raise CLIError(f"{what} {path} is a directory")
    parent = path.parent
    if not parent.is_dir():
        raise CLIError(f"{what} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"{what} {path}: directory {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise CLIError(f"{what} {path} is not writable")


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file (symlinks and hard links included)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _check_not_input(outputs: dict[str, Path], inputs: list[tuple[str, Path]]) -> None:
    """Refuse an output that would overwrite one of the command's inputs."""
    for what, out in outputs.items():
        for name, inp in inputs:
            if _same_file(out, inp):
                raise CLIError(f"{what} {out} is an input ({name} {inp}): choose another path")


def _check_train_args(args: argparse.Namespace) -> None:
    """The numeric options of ``train``, each refused naming its option."""
    _check_width(args.width)
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise CLIError(f"--lr must be a finite number > 0, got {args.lr:g}")
    for opt, v in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if v < 1:
            raise CLIError(f"{opt} must be >= 1 (there would be no training step), got {v}")
    for opt, v in (("--seed", args.seed), ("--round", args.round)):
        if v is not None and v < 0:
            raise CLIError(f"{opt} must be >= 0, got {v}")


def cmd_train(args: argparse.Namespace) -> int:
    from mobile_client.safetensors_np import load_file
    from mobile_client.update import UpdateMeta, write_update

    _check_train_args(args)
    out = Path(args.out)
    local = local_path(out)
    _check_output(out, "--out")
    _check_output(local, "local-state file")
    client = _client(args)
    data_path = Path(args.data)
    if not data_path.is_file():
        raise CLIError(f"{data_path}: no such data file")
    inputs = [("--data", data_path), ("the bundle's manifest", client.dir / MANIFEST_NAME)]
    if args.start_from:
        inputs.append(("--start-from", Path(args.start_from)))
    for f in client.manifest.file_entries():
        refs = [f.path] + ([f.ort.path] if f.ort is not None else [])
        inputs += [("bundle file", client.dir / r) for r in refs]
    _check_not_input({"--out": out, "local-state file": local}, inputs)
    x, ys = read_client_data(data_path, client.entry.tasks)
    try:  # name the file: the runtime's messages only say "x" / "targets[task]"
        x = client.prepare_x(x)
        client.prepare_targets(ys, client.entry.tasks, len(x))
    except InputError as exc:
        raise InputError(f"--data {data_path}: {exc}") from exc
    start = None
    rnd = client.manifest.round
    if args.start_from:
        start, md = load_file(args.start_from)
        if "round" in md:
            try:
                rnd = int(md["round"])
            except ValueError as exc:
                raise CLIError(f"{args.start_from}: metadata 'round' is {md['round']!r}") from exc
            if rnd < 0:
                raise CLIError(f"{args.start_from}: metadata 'round' is {rnd}, must be >= 0")
        try:  # a server checkpoint is at full width: cut it to the client's (the round's window)
            start = client.slice_global(start, rnd, f"--start-from {args.start_from}")
            client.start_state(start)
        except InputError as exc:
            if str(exc).startswith("--start-from"):
                raise
            raise InputError(f"--start-from {args.start_from}: {exc}") from exc
    if args.round is not None:
        rnd = args.round
    res = client.train(
        x, ys, width=args.width, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        head_only=args.head_only, start_from=start, progress=True, seed=args.seed,
    )  # fmt: skip
    meta = UpdateMeta(client.client_id, rnd, client.entry.width, res.num_examples,
                      res.base_hash, res.metrics)  # fmt: skip
    write_update(out, res.shared, meta)
    try:
        client.save_local(local)
    except BaseException:
        out.unlink(missing_ok=True)  # never an update without the heads it was trained with
        raise
    print(f"wrote {out} ({len(res.shared)} shared arrays, {res.num_examples} examples, "
          f"loss {res.metrics.get('loss', float('nan')):.4f}) and {local}")  # fmt: skip
    return 0


def local_path(out: Path) -> Path:
    """``update.safetensors`` -> ``update.local.safetensors`` (the heads, kept on device)."""
    return out.with_name(out.name.removesuffix(".safetensors") + ".local.safetensors")


# ----------------------------------------------------------------------------- main
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        raise CLIError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fmtl-edge", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    i = sub.add_parser("info", help="widths, tasks, files and a memory estimate")
    i.add_argument("dir")
    i.add_argument("--memory-mb", type=float, default=None)
    pr = sub.add_parser("predict", help="predict classes of input files")
    pr.add_argument("dir")
    pr.add_argument("--task", required=True)
    pr.add_argument("--width", type=float, default=None)
    pr.add_argument("--client", default=None)
    pr.add_argument("--probs", action="store_true")
    pr.add_argument("inputs", nargs="+")
    t = sub.add_parser("train", help="train locally and write an update")
    t.add_argument("dir")
    t.add_argument("--data", required=True)
    t.add_argument("--width", type=float, default=None)
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--head-only", action="store_true")
    t.add_argument("--start-from", default=None)
    t.add_argument("--round", type=int, default=None)
    t.add_argument("--out", default="update.safetensors")
    t.add_argument("--client", default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return {"info": cmd_info, "predict": cmd_predict, "train": cmd_train}[args.cmd](args)
    except (FMTLError, OSError) as exc:  # anything else is a bug: keep its traceback
        print(f"fmtl-edge: error: {error_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
