"""``fmtl-edge``: inspect a bundle, predict, and train locally on a device (numpy + onnxruntime).

    fmtl-edge info DIR [--memory-mb N]
    fmtl-edge predict DIR --task T [--width R] [--client C] [--probs] INPUTS...
    fmtl-edge train DIR --data local.npz [--width R] [--epochs E] [--batch-size B]
                    [--lr LR] [--head-only] [--start-from UPDATE.safetensors]
                    [--round N] [--out update.safetensors] [--client C]

Inputs for ``predict``: ``.npy`` (one image (H, W)/(C, H, W) or a batch), ``.npz``
(key ``x``), binary PGM (P5, 8-bit) and 8-bit grayscale PNG. ``train`` reads
``x`` and one ``y__<task, '/' -> '__'>`` per task from ``--data``; it writes the
update (shared arrays + metadata) to ``--out`` and the client's local arrays
(heads) to ``--out`` with suffix ``.local.safetensors``. Errors print one line
``fmtl-edge: error: ...`` and exit with status 2.

Memory rule (``info --memory-mb``), per width, in bytes::

    2 x (backbone file + the width's head files)             # graph + ORT's copy
    + 4 x ACT_FACTOR x TRAIN_BATCH x (C*H*W + feature_dim)   # float32 activations
    + RUNTIME_MB                                             # python+numpy+onnxruntime

The training step graphs are not counted: ``info`` answers "can it predict".
"""

from __future__ import annotations

import argparse
import struct
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mobile_client.batching import label_key
from mobile_client.errors import MobileClientError

TRAIN_BATCH = 32
ACT_FACTOR = 4  # intermediate activations per input/feature element, rough upper bound
RUNTIME_MB = 70  # measured peak RSS of a torch-free predict+train process: ~68 MB


class CLIError(MobileClientError):
    """A bad argument or input file for ``fmtl-edge`` (the message says which)."""


# ----------------------------------------------------------------------------- images
def read_pgm(path: Path) -> np.ndarray:
    """Binary PGM (P5, maxval <= 255) -> uint8 (H, W)."""
    data = path.read_bytes()
    tokens: list[bytes] = []
    i = 0
    while len(tokens) < 4:
        while i < len(data) and data[i : i + 1].isspace():
            i += 1
        if data[i : i + 1] == b"#":
            while i < len(data) and data[i : i + 1] not in (b"\n", b"\r"):
                i += 1
            continue
        j = i
        while j < len(data) and not data[j : j + 1].isspace():
            j += 1
        if j == i:
            raise CLIError(f"{path}: truncated PGM header")
        tokens.append(data[i:j])
        i = j
    if tokens[0] != b"P5":
        raise CLIError(f"{path}: not a binary PGM (magic {tokens[0]!r}, expected b'P5')")
    try:
        w, h, maxval = (int(t) for t in tokens[1:])
    except ValueError as exc:
        raise CLIError(f"{path}: bad PGM header {tokens!r}") from exc
    if not 0 < maxval <= 255:
        raise CLIError(f"{path}: PGM maxval {maxval}; only 8-bit (<= 255) is supported")
    px = data[i + 1 : i + 1 + w * h]
    if len(px) != w * h:
        raise CLIError(f"{path}: PGM has {len(px)} pixel bytes, expected {w}x{h}={w * h}")
    return np.frombuffer(px, dtype=np.uint8).reshape(h, w).copy()


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def read_png(path: Path) -> np.ndarray:
    """8-bit grayscale, non-interlaced PNG -> uint8 (H, W) (zlib + struct only)."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise CLIError(f"{path}: not a PNG file")
    pos, idat, ihdr = 8, [], None
    while pos + 8 <= len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        ctype = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + n]
        pos += 12 + n
        if ctype == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif ctype == b"IDAT":
            idat.append(body)
        elif ctype == b"IEND":
            break
    if ihdr is None:
        raise CLIError(f"{path}: PNG without IHDR")
    w, h, depth, color, _, _, interlace = ihdr
    if depth != 8 or color != 0:
        raise CLIError(
            f"{path}: PNG is bit depth {depth}, color type {color}; only 8-bit grayscale "
            "(depth 8, color type 0) is supported"
        )
    if interlace:
        raise CLIError(f"{path}: interlaced PNG is not supported")
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as exc:
        raise CLIError(f"{path}: corrupt PNG data: {exc}") from exc
    if len(raw) != h * (w + 1):
        raise CLIError(f"{path}: PNG data has {len(raw)} bytes, expected {h * (w + 1)}")
    out = np.zeros((h, w), dtype=np.uint8)
    prev = np.zeros(w, dtype=np.int32)
    for r in range(h):
        f = raw[r * (w + 1)]
        line = np.frombuffer(raw, np.uint8, w, r * (w + 1) + 1).astype(np.int32)
        if f == 0:
            cur = line
        elif f == 2:
            cur = (line + prev) & 0xFF
        elif f in (1, 3, 4):  # depend on the left neighbour: row loop
            cur = np.zeros(w, dtype=np.int32)
            for i in range(w):
                a = int(cur[i - 1]) if i else 0
                b = int(prev[i])
                c = int(prev[i - 1]) if i else 0
                pred = a if f == 1 else ((a + b) // 2 if f == 3 else _paeth(a, b, c))
                cur[i] = (int(line[i]) + pred) & 0xFF
        else:
            raise CLIError(f"{path}: PNG row {r} has unknown filter type {f}")
        out[r] = cur
        prev = cur
    return out


def read_inputs(path: Path) -> np.ndarray:
    """One input file -> a batch (B, ...) of uint8 pixels or float32 normalised inputs."""
    if not path.is_file():
        raise CLIError(f"{path}: no such input file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        x = np.load(path, allow_pickle=False)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z.files:
                raise CLIError(f"{path}: .npz has no key 'x' (keys: {', '.join(z.files)})")
            x = z["x"]
    elif suffix in (".pgm", ".pnm"):
        x = read_pgm(path)
    elif suffix == ".png":
        x = read_png(path)
    else:
        raise CLIError(f"{path}: unknown input type {suffix!r} (.npy, .npz, .pgm, .png)")
    return x


def _as_batch(x: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    c, h, w = input_shape
    if x.shape in ((h, w), (c, h, w)):
        return x[None]
    return x


# ----------------------------------------------------------------------------- commands
def _client(args: argparse.Namespace):
    from mobile_client.runtime import EdgeClient

    return EdgeClient(args.dir, args.client)


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f} MB"


def memory_estimate(m, root: Path, width: float) -> int:
    """Bytes needed to predict at ``width`` (the rule in the module docstring)."""
    we = m.width(width)
    files = {we.backbone.path} | {h.file.path for h in m.heads if abs(h.width - we.width) < 1e-9}
    size = sum((root / p).stat().st_size for p in files)
    c, h, w = m.normalisation.input_shape
    act = 4 * ACT_FACTOR * TRAIN_BATCH * (c * h * w + we.feature_dim)
    return 2 * size + act + RUNTIME_MB * 2**20


def cmd_info(args: argparse.Namespace) -> int:
    from mobile_client.manifest import load_manifest, verify_files

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
    print("widths:")
    fits = []
    for we in m.widths:
        est = memory_estimate(m, root, we.width)
        tasks = sorted({hd.task for hd in m.heads if abs(hd.width - we.width) < 1e-9})
        fit = ""
        if args.memory_mb is not None:
            ok = est <= args.memory_mb * 2**20
            fits += [f"{we.width:g}"] if ok else []
            fit = f" ({'fits' if ok else 'does NOT fit'} in {args.memory_mb:g} MB)"
        print(f"  width {we.width:g}: feature_dim {we.feature_dim}, tasks "
              f"{', '.join(tasks) or '-'}, estimate {_mb(est)}{fit}")  # fmt: skip
    if args.memory_mb is not None:
        print(f"widths that fit {args.memory_mb:g} MB: {', '.join(fits) or 'none'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    client = _client(args)
    head = client.head(args.task)
    shape = client.entry.normalisation.input_shape
    for p in args.inputs:
        path = Path(p)
        x = _as_batch(read_inputs(path), shape)
        logits = client.predict(args.task, x, args.width)
        if head.kind == "multiclass":
            z = logits - logits.max(axis=1, keepdims=True)
            probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        else:
            probs = 1.0 / (1.0 + np.exp(-logits))
        for i in range(len(logits)):
            name = f"{path}[{i}]" if len(logits) > 1 else str(path)
            if head.kind == "multiclass":
                k = int(np.argmax(logits[i]))
                pred = head.labels[k] if k < len(head.labels) else str(k)
            else:
                on = [head.labels[j] for j in range(logits.shape[1]) if logits[i, j] > 0]
                pred = ",".join(on) or "-"
            line = f"{name}\t{pred}"
            if args.probs:
                line += "\t" + " ".join(f"{v:.4f}" for v in probs[i])
            print(line)
    return 0


def _targets(data: np.lib.npyio.NpzFile, tasks: Sequence[str], path: Path) -> dict:
    out = {}
    for t in tasks:
        key = label_key(t)
        if key not in data.files:
            raise CLIError(f"{path}: no key {key!r} for task {t!r} (keys: {', '.join(data.files)})")
        out[t] = data[key]
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from mobile_client.safetensors_np import load_file
    from mobile_client.update import UpdateMeta, write_update

    client = _client(args)
    data_path = Path(args.data)
    if not data_path.is_file():
        raise CLIError(f"{data_path}: no such data file")
    with np.load(data_path, allow_pickle=False) as z:
        if "x" not in z.files:
            raise CLIError(f"{data_path}: no key 'x' (keys: {', '.join(z.files)})")
        x = z["x"]
        ys = _targets(z, client.entry.tasks, data_path)
    start = None
    rnd = client.manifest.round
    if args.start_from:
        start, md = load_file(args.start_from)
        if "round" in md:
            try:
                rnd = int(md["round"])
            except ValueError as exc:
                raise CLIError(f"{args.start_from}: metadata 'round' is {md['round']!r}") from exc
    if args.round is not None:
        rnd = args.round
    res = client.train(
        x, ys, width=args.width, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        head_only=args.head_only, start_from=start, progress=True, seed=args.seed,
    )  # fmt: skip
    out = Path(args.out)
    meta = UpdateMeta(client.client_id, rnd, client.entry.width, res.num_examples,
                      res.base_hash, res.metrics)  # fmt: skip
    write_update(out, res.shared, meta)
    local = client.save_local(local_path(out))
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
    except (MobileClientError, OSError, ValueError) as exc:
        msg = " ".join(str(exc).split())
        print(f"fmtl-edge: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
