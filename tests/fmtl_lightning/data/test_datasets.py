"""Cached MNIST / Fashion-MNIST and sklearn digits: checksums, parsing, shapes, counts, errors.

Needs the cache in the data dir (``make test`` fetches it into ``.data/`` first; by hand:
``python -m fmtl_lightning.data.fetch --all``; ``$FMTL_DATA_DIR`` chooses another dir).
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fmtl_lightning.data import datasets as datasets_mod
from fmtl_lightning.data import fetch as fetch_mod
from fmtl_lightning.data.datasets import (
    DATASET_NAMES,
    DIGITS_MEAN,
    DIGITS_STD,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    MNIST_MEAN,
    MNIST_STD,
    PINNED_FILES,
    default_data_dir,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    read_idx,
    resolve_data_dir,
)
from fmtl_lightning.errors import (
    ChecksumError,
    DataFormatError,
    DataMissingError,
    FetchError,
    FMTLError,
    UnknownDatasetError,
)

# True class counts of MNIST, well known (LeCun's page / torchvision), checked below against
# an independent parse of the label file with struct.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist_train():
    return load_mnist("train")


@pytest.fixture(scope="module")
def fashion_train():
    return load_fashion_mnist("train")


def _copy_cache(tmp_path: Path, name: str) -> Path:
    shutil.copytree(resolve_data_dir() / name, tmp_path / name)
    return tmp_path


def _struct_label_counts(path: Path) -> tuple[int, list[int]]:
    """Independent of read_idx: parse the IDX label header with struct, count with Counter."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    magic, count = struct.unpack(">II", raw[:8])
    assert magic == 2049
    counter = collections.Counter(raw[8:])
    return count, [counter[d] for d in range(10)]


# --- data dir and checksums ------------------------------------------------------------------


def test_data_dir_argument_beats_env_beats_default(monkeypatch, tmp_path):
    monkeypatch.setenv("FMTL_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("FMTL_DATA_DIR")
    assert resolve_data_dir() == default_data_dir()


REPO = Path(__file__).resolve().parents[3]


def test_default_data_dir_is_the_checkouts_dot_data_else_the_user_cache(monkeypatch, tmp_path):
    """The dir `make setup` fills (<checkout>/.data) is the default of every command there."""
    assert (REPO / "pyproject.toml").is_file() and (REPO / "fmtl_lightning").is_dir()
    assert default_data_dir() == REPO / ".data"
    # an installed (non-editable) package: no pyproject.toml next to it
    site = tmp_path / "site-packages"
    monkeypatch.setattr(datasets_mod, "__file__", str(site / "fmtl_lightning/data/datasets.py"))
    assert default_data_dir() == Path("~/.cache/fmtl_lightning").expanduser()
    # next to another project's pyproject.toml: still not a checkout of this one
    (site / "pyproject.toml").parent.mkdir(parents=True)
    (site / "pyproject.toml").write_text('[project]\nname = "other"\n')
    assert default_data_dir() == Path("~/.cache/fmtl_lightning").expanduser()
    (site / "pyproject.toml").write_text('[project]\nname = "fmtl-lightning"\n')
    assert default_data_dir() == site / ".data"


@pytest.mark.parametrize("name", sorted(PINNED_FILES))
def test_cached_files_match_pinned_sha256(name):
    for filename, expected in PINNED_FILES[name].items():
        data = (resolve_data_dir() / name / filename).read_bytes()
        assert hashlib.sha256(data).hexdigest() == expected, filename


def test_corrupted_cache_file_is_caught_by_checksum(tmp_path):
    root = _copy_cache(tmp_path, "mnist")
    bad = root / "mnist" / "train-labels-idx1-ubyte.gz"
    data = bytearray(bad.read_bytes())
    data[1000] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as info:
        load_mnist("train", data_dir=root)
    message = str(info.value)
    assert str(bad) in message
    assert PINNED_FILES["mnist"]["train-labels-idx1-ubyte.gz"] in message
    assert hashlib.sha256(bytes(data)).hexdigest() in message
    assert isinstance(info.value, FMTLError)


@pytest.mark.parametrize(
    ("loader", "flag"),
    [(load_mnist, "--mnist"), (load_fashion_mnist, "--fashion-mnist")],
)
def test_missing_data_names_the_fetch_command(tmp_path, monkeypatch, loader, flag):
    monkeypatch.setenv("FMTL_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataMissingError) as info:
        loader("test")
    message = str(info.value)
    assert f"python -m fmtl_lightning.data.fetch {flag}`" in message
    assert f"`make data` (in {REPO})" in message and "from $FMTL_DATA_DIR" in message
    assert str(tmp_path / "nowhere") in message


def test_missing_data_in_a_given_dir_names_a_fetch_into_that_dir(tmp_path):
    """`make data` would fill the default dir, not this one: the message names --data-dir."""
    with pytest.raises(DataMissingError) as info:
        load_mnist("test", data_dir=tmp_path / "my data")
    message = str(info.value)
    assert "make data" not in message
    want = f"-m fmtl_lightning.data.fetch --mnist --data-dir '{tmp_path / 'my data'}'`"
    assert want in message


# --- IDX parsing -----------------------------------------------------------------------------


def _write_gz(path: Path, payload: bytes) -> Path:
    path.write_bytes(gzip.compress(payload))
    return path


def test_read_idx_parses_a_hand_made_file(tmp_path):
    path = _write_gz(tmp_path / "ok.gz", struct.pack(">IIII", 0x803, 2, 2, 3) + bytes(range(12)))
    images = read_idx(path, 0x803)
    assert images.shape == (2, 2, 3)
    assert images.dtype == np.uint8
    np.testing.assert_array_equal(images.ravel(), np.arange(12))


@pytest.mark.parametrize(
    ("payload", "gzipped", "fragment"),
    [
        (struct.pack(">IIII", 0x801, 1, 1, 1) + bytes(1), True, "magic number"),
        (struct.pack(">IIII", 0x803, 2, 2, 3) + bytes(11), True, "payload has 11 bytes"),
        (b"\x00\x00", True, "truncated"),
        (b"not gzip at all", False, "gzip"),
    ],
    ids=["magic", "short-payload", "short-header", "not-gzip"],
)
def test_read_idx_rejects_corrupt_files(tmp_path, payload, gzipped, fragment):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(payload) if gzipped else payload)
    with pytest.raises(DataFormatError, match=fragment) as info:
        read_idx(path, 0x803)
    assert str(path) in str(info.value)


# --- MNIST -----------------------------------------------------------------------------------


def test_mnist_shapes_dtypes_and_read_only(mnist_train):
    test = load_mnist("test")
    assert mnist_train.images.shape == (60000, 28, 28)
    assert test.images.shape == (10000, 28, 28)
    for ds in (mnist_train, test):
        assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int64
        assert not ds.images.flags.writeable and not ds.labels.flags.writeable
        assert ds.class_names == tuple("0123456789")
        assert (ds.mean, ds.std) == (MNIST_MEAN, MNIST_STD)
    assert (mnist_train.split, test.split, len(test)) == ("train", "test", 10000)
    assert int(mnist_train.labels[0]) == 5 and int(test.labels[0]) == 7
    assert int(mnist_train.images.max()) == 255 and int(mnist_train.images.min()) == 0


def test_mnist_label_histogram_matches_an_independent_parse(mnist_train):
    folder = resolve_data_dir() / "mnist"
    count, counts = _struct_label_counts(folder / "train-labels-idx1-ubyte.gz")
    assert count == 60000 and counts == MNIST_TRAIN_COUNTS
    assert np.bincount(mnist_train.labels).tolist() == MNIST_TRAIN_COUNTS
    test_count, test_counts = _struct_label_counts(folder / "t10k-labels-idx1-ubyte.gz")
    assert test_count == 10000 and test_counts == MNIST_TEST_COUNTS
    assert np.bincount(load_mnist("test").labels).tolist() == MNIST_TEST_COUNTS
    assert sum(MNIST_TRAIN_COUNTS) == 60000 and sum(MNIST_TEST_COUNTS) == 10000


def test_mnist_pixels_match_an_independent_parse(mnist_train):
    with gzip.open(resolve_data_dir() / "mnist" / "train-images-idx3-ubyte.gz", "rb") as fh:
        magic, n, rows, cols = struct.unpack(">IIII", fh.read(16))
        first_two = fh.read(2 * rows * cols)
    assert (magic, n, rows, cols) == (2051, 60000, 28, 28)
    assert mnist_train.images[:2].tobytes() == first_two


# --- Fashion-MNIST ---------------------------------------------------------------------------


def test_fashion_mnist_shapes_and_balanced_classes(fashion_train):
    test = load_fashion_mnist("test")
    assert fashion_train.images.shape == (60000, 28, 28)
    assert test.images.shape == (10000, 28, 28)
    assert np.bincount(fashion_train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert fashion_train.class_names[0] == "T-shirt/top"
    assert fashion_train.class_names[9] == "Ankle boot"
    assert (test.mean, test.std) == (FASHION_MNIST_MEAN, FASHION_MNIST_STD)


# --- normalisation constants -----------------------------------------------------------------


def _mean_std(images: np.ndarray) -> tuple[float, float]:
    pixels = images.astype(np.float64) / 255.0
    return float(pixels.mean()), float(pixels.std())


def test_hard_coded_normalisation_constants_match_the_train_splits(mnist_train, fashion_train):
    cases = [
        (mnist_train, MNIST_MEAN, MNIST_STD),
        (fashion_train, FASHION_MNIST_MEAN, FASHION_MNIST_STD),
        (load_digits("train"), DIGITS_MEAN, DIGITS_STD),
    ]
    for ds, mean, std in cases:
        found_mean, found_std = _mean_std(ds.images)
        assert found_mean == pytest.approx(mean, abs=1e-4), ds.name
        assert found_std == pytest.approx(std, abs=1e-4), ds.name


# --- digits ----------------------------------------------------------------------------------


def test_digits_split_is_fixed_disjoint_and_scaled():
    from sklearn.datasets import load_digits as sklearn_load_digits

    reference = sklearn_load_digits()
    train, test = load_digits("train"), load_digits("test")
    assert train.images.shape == (1438, 8, 8) and test.images.shape == (359, 8, 8)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int64
    assert int(train.images.max()) == 255  # 16 -> 255
    np.testing.assert_array_equal(
        np.bincount(np.concatenate([train.labels, test.labels])), np.bincount(reference.target)
    )
    # the scaling is round(v * 255 / 16): 8 -> 127.5 -> 128 (half to even), 1 -> 16
    scaled = np.rint(reference.images * 255 / 16).astype(np.uint8)
    images_by_key = {img.tobytes() for img in scaled}
    assert all(img.tobytes() in images_by_key for img in test.images)
    again = load_digits("test")
    np.testing.assert_array_equal(again.labels, test.labels)
    np.testing.assert_array_equal(again.images, test.images)


# --- dispatch --------------------------------------------------------------------------------


def test_load_dataset_dispatches_and_lists_known_names():
    assert DATASET_NAMES == ("mnist", "fashion_mnist", "digits")
    assert load_dataset("digits", "test").name == "digits"
    assert load_dataset("mnist", "test").images.shape == (10000, 28, 28)
    with pytest.raises(UnknownDatasetError) as info:
        load_dataset("cifar10", "train")
    assert "cifar10" in str(info.value)
    assert all(name in str(info.value) for name in DATASET_NAMES)
    with pytest.raises(UnknownDatasetError, match="'val'"):
        load_dataset("mnist", "val")


# --- fetch (no network: sources are faked) ---------------------------------------------------


def test_install_bytes_refuses_bad_data_and_leaves_nothing(tmp_path):
    dest = tmp_path / "mnist" / "x.gz"
    expected = hashlib.sha256(b"good").hexdigest()
    with pytest.raises(ChecksumError) as info:
        fetch_mod.install_bytes(b"bad", dest, expected, origin="test")
    assert "x.gz" in str(info.value) and expected in str(info.value)
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []
    fetch_mod.install_bytes(b"good", dest, expected, origin="test")
    assert dest.read_bytes() == b"good"
    assert [p.name for p in dest.parent.iterdir()] == ["x.gz"]


def test_fetch_skips_verified_cache_and_replaces_a_corrupt_file(tmp_path, monkeypatch, capsys):
    root = _copy_cache(tmp_path, "mnist")
    bad = root / "mnist" / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(b"garbage")
    real = resolve_data_dir() / "mnist"
    asked: list[list[str]] = []

    def fake_source(filenames, _tmp):
        asked.append(list(filenames))
        return {f: ((real / f).read_bytes(), "fake") for f in filenames}

    monkeypatch.setitem(fetch_mod.FETCHERS, "mnist", fake_source)
    line = fetch_mod.fetch_dataset("mnist", root)
    assert asked == [["t10k-labels-idx1-ubyte.gz"]]
    assert line.startswith("mnist: fetched 1 file(s)")
    assert np.bincount(load_mnist("test", root).labels).tolist() == MNIST_TEST_COUNTS
    assert fetch_mod.main(["--mnist", "--data-dir", str(root)]) == 0
    assert asked == [["t10k-labels-idx1-ubyte.gz"]]  # second run fetched nothing
    assert capsys.readouterr().out.strip() == f"mnist: cached, 4 files verified in {root / 'mnist'}"


def test_fetch_with_a_bad_source_leaves_no_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(
        fetch_mod.FETCHERS,
        "fashion_mnist",
        lambda filenames, _tmp: {f: (b"tampered", "fake mirror") for f in filenames},
    )
    assert fetch_mod.main(["--fashion-mnist", "--data-dir", str(tmp_path)]) == 1
    assert "sha256 mismatch" in capsys.readouterr().err
    folder = tmp_path / "fashion_mnist"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_fetch_cli_needs_a_dataset_flag():
    with pytest.raises(SystemExit) as info:
        fetch_mod.main([])
    assert info.value.code == 2


def test_apt_download_runs_apt_get_update_once_as_root(tmp_path, monkeypatch):
    calls: list[list[str]] = []

    def fake_run(cmd, cwd):
        calls.append(list(cmd))
        ok = len(calls) == 3  # download fails, update, download succeeds
        if ok:
            (cwd / f"{fetch_mod.FASHION_DEB}_1.0_all.deb").write_bytes(b"deb")
        return subprocess.CompletedProcess(cmd, 0 if ok else 100, "", "E: not found")

    monkeypatch.setattr(fetch_mod, "_run", fake_run)
    monkeypatch.setattr(fetch_mod.os, "geteuid", lambda: 0)
    deb = fetch_mod._apt_download(tmp_path)
    assert deb.name == f"{fetch_mod.FASHION_DEB}_1.0_all.deb"
    assert [c[:2] for c in calls] == [
        ["apt-get", "download"],
        ["apt-get", "update"],
        ["apt-get", "download"],
    ]


def test_apt_download_failure_without_root_is_a_fetch_error(tmp_path, monkeypatch):
    calls: list[list[str]] = []

    def fake_run(cmd, cwd):
        calls.append(list(cmd))
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package")

    monkeypatch.setattr(fetch_mod, "_run", fake_run)
    monkeypatch.setattr(fetch_mod.os, "geteuid", lambda: 1000)
    with pytest.raises(FetchError, match="Unable to locate package"):
        fetch_mod._apt_download(tmp_path)
    assert calls == [["apt-get", "download", fetch_mod.FASHION_DEB]]
