"""The ``fmtl`` command line: ``simulate``, ``demo`` (and ``export`` once installed).

Errors a user can cause (bad config, missing data, bad run dir, a bad update or
bundle: every :class:`~fmtl_lightning.errors.FMTLError`) print one clear line and
exit with status 2; they never print a traceback. Any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from fmtl_lightning.errors import FMTLError, error_line

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "demo.yaml"


def _simulate(args: argparse.Namespace) -> int:
    from fmtl_lightning.config import load_config
    from fmtl_lightning.report import format_table
    from fmtl_lightning.simulation import resume_run, run_config

    t0 = time.perf_counter()
    if args.resume:
        rounds = getattr(args, "rounds", None)  # None: the rounds the run was started for
        summary = resume_run(args.resume, rounds=rounds, progress=not args.no_progress)
        run_dir = Path(args.resume)
    else:
        if not args.config:
            raise FMTLError("simulate needs --config FILE (or --resume RUN_DIR)")
        cfg = load_config(args.config)
        if getattr(args, "rounds", None) is not None:
            from fmtl_lightning.config import config_to_dict, parse_config

            raw = config_to_dict(cfg)
            raw["federation"]["rounds"] = args.rounds
            cfg = parse_config(raw)  # validated like the file itself
        run_dir = Path(args.run_dir or Path("runs") / cfg.name)
        if run_dir.exists() and any(run_dir.iterdir()) and not args.overwrite:
            raise FMTLError(
                f"run directory {str(run_dir)!r} is not empty: use --resume {run_dir}, "
                "--overwrite, or another --run-dir"
            )
        summary = run_config(cfg, run_dir, progress=not args.no_progress)
    print()
    print(format_table(summary))
    print(f"\nrun directory: {run_dir}  ({time.perf_counter() - t0:.0f} s)")
    print(
        f"  metrics.csv, summary.json, plots/, checkpoints/ (resume: fmtl simulate --resume {run_dir})"
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    args.config = str(DEMO_CONFIG)
    args.run_dir = args.run_dir or "runs/demo"
    args.resume = None
    args.overwrite = True
    import shutil

    shutil.rmtree(args.run_dir, ignore_errors=True)
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        # the demo's MLP is too small to gain from threads; torch's 2-thread pool only
        # slows down (up to 10x) when anything else shares the cores
        torch.set_num_threads(1)
    print(f"fmtl demo: federated multi-task learning on real MNIST ({DEMO_CONFIG.name})")
    from fmtl_lightning.config import load_config
    from fmtl_lightning.fed_data import build_federation

    print(build_federation(load_config(args.config)).summary)
    return _simulate(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fmtl", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("simulate", help="run an in-process federation from a YAML config")
    s.add_argument("--config", help="YAML run config (see examples/)")
    s.add_argument("--run-dir", help="where to write the run (default runs/<name>)")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    s.add_argument("--overwrite", action="store_true", help="allow a non-empty --run-dir")
    s.add_argument(
        "--rounds",
        type=int,
        help="override federation.rounds of --config (e.g. 2 for a quick try); with --resume, "
        "take the run further to this many rounds",
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_simulate)
    d = sub.add_parser("demo", help="the main job on real MNIST, in a few minutes")
    d.add_argument("--run-dir", default=None)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=_demo)
    from fmtl_lightning.deploy.cli import add_deploy_parser  # stdlib only; flwr loads per command

    add_deploy_parser(sub)
    try:  # export lives in its own package (needs onnx); add it when importable
        from export.cli import add_export_parser
    except ImportError:
        pass
    else:
        add_export_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except FMTLError as exc:
        print(f"fmtl: error: {error_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
