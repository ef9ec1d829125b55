"""``fmtl export RUN_DIR --out DIR``: a finished run -> ONNX graphs + manifest.json.

Registered by :mod:`fmtl_lightning.cli` through :func:`add_export_parser` when this
package (and onnx) is importable. Errors are :class:`fmtl_lightning.errors.FMTLError`
subclasses, so the CLI prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from export.bundle import RunExportError
from export.run_export import export_run


def parse_widths(text: str) -> list[float]:
    """``"1,0.5"`` -> ``[1.0, 0.5]`` (error names the bad item)."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            w = float(item)
        except ValueError:
            raise RunExportError(f"--widths: {item!r} is not a number") from None
        if not (0 < w <= 1) or not math.isfinite(w):
            raise RunExportError(f"--widths: {item!r} is outside (0, 1]")
        out.append(w)
    if not out:
        raise RunExportError("--widths: no width given")
    return out


def _export(args: argparse.Namespace) -> int:
    from mobile_client.errors import ManifestError
    from mobile_client.manifest import load_manifest

    widths = parse_widths(args.widths) if args.widths else None
    clients = [c.strip() for c in args.clients.split(",") if c.strip()] if args.clients else None
    if args.clients is not None and not clients:
        raise RunExportError("--clients: no client id given")
    out = export_run(
        args.run_dir,
        args.out,
        widths=widths,
        clients=clients,
        opset=args.opset,
        ort=args.ort,
        overwrite=args.overwrite,
        progress=lambda line: print(f"fmtl export: {line}", file=sys.stderr, flush=True),
    )
    try:
        m = load_manifest(out)
    except ManifestError as exc:  # a bug on our side: the manifest we just wrote is invalid
        raise RunExportError(f"{out}: written manifest does not load: {exc}") from exc
    n_files = len({e.path for e in m.file_entries()})
    print(
        f"exported round {m.round} of {args.run_dir} ({m.algorithm}) to {out}: "
        f"widths {', '.join(f'{w:g}' for w in m.width_values())}, "
        f"{len(m.clients)} clients, {len(m.heads)} heads, {n_files} files"
    )
    return 0


def add_export_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to the ``fmtl`` CLI's subparsers."""
    p = sub.add_parser(
        "export", help="export a run's backbones, heads and training-step graphs to ONNX"
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by fmtl simulate")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist)")
    p.add_argument("--widths", help="comma-separated widths, e.g. 1,0.5 (default: all used)")
    p.add_argument("--clients", help="comma-separated client ids, e.g. c00,c01 (default: all)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18, default 18)")
    p.add_argument("--ort", action="store_true", help="also write .ort files (ORT Mobile)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_export)
    return p
