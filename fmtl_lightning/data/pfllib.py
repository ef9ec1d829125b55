"""PFLlib's data protocol, reproduced draw for draw (pure numpy).

PFLlib (TsingZ0/PFLlib, ``dataset/utils/dataset_utils.py``) builds its federations so:

1. a dataset's train and test splits are merged (Fashion-MNIST: 60k + 10k = 70k images,
   train first), see :func:`merged_dataset`;
2. ``separate_data`` gives each of ``num_clients`` clients a share of the samples, either
   * ``"dir"`` (:func:`dirichlet_parts`), the "practical" label skew: for each class in
     turn, its samples are shuffled and cut by proportions drawn from Dir(alpha) over the
     clients; a client already holding >= N / num_clients samples gets no share of the
     next classes (but for float rounding: the cut ``int(cumsum * count)`` can leave the
     last client one sample of a class its zero share should have denied it); everything
     is drawn again until every client holds >= ``least_samples`` (:func:`least_samples`:
     40 for batch 10 and a 75/25 split), or
   * ``"pat"`` (:func:`pathological_parts`), the "pathological" split: class after class
     goes to the first ``ceil(num_clients / num_classes * classes_per_client)`` clients
     that still need a class (20 clients, 2 classes each: clients 4g..4g+3 all get
     classes 2g and 2g+1); each of them but the last takes a random count
     ``randint(max(n/10, least_samples/num_classes), n)`` of the class (n = the class's
     samples / holders; unbalanced) or ``int(n)`` (balanced), in dataset order, and the
     last takes the rest;
3. ``split_data`` splits each client 75/25 with scikit-learn's ``train_test_split``
   (:func:`train_test_parts`: ``floor(0.75 n)`` train, the rest test).

Their script seeds numpy's global generator once (``np.random.seed(1)``) and every step
above draws from it in turn (scikit-learn's ``random_state=None`` is that same global
generator). :func:`pfllib_split` runs the three steps on one ``np.random.RandomState(seed)``
in the same order with the same calls, so the same labels and seed give the very index
sets PFLlib writes to its ``train/*.npz`` and ``test/*.npz`` files. The step functions take
that generator as ``rng`` (only its ``shuffle``, ``dirichlet``, ``randint`` and
``permutation`` are called, so a scripted stand-in works too). Index arrays are int64,
in PFLlib's order (not sorted). Bad arguments raise :class:`PartitionError`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fmtl_lightning.errors import PartitionError

Kind = Literal["dir", "pat"]
KINDS: tuple[str, ...] = ("dir", "pat")
BATCH_SIZE = 10  # dataset_utils.batch_size
TRAIN_RATIO = 0.75  # dataset_utils.train_ratio
ALPHA = 0.1  # dataset_utils.alpha
NUM_CLIENTS = 20  # generate_FashionMNIST.num_clients
SEED = 1  # generate_FashionMNIST: np.random.seed(1)
MEAN, STD = 0.5, 0.5  # transforms.Normalize([0.5], [0.5]) after ToTensor (pixel / 255)
MAX_TRIES = 10_000  # PFLlib redraws for ever; we stop and say so


@dataclass(frozen=True)
class ClientSplit:
    """One client's samples: indices into the merged dataset, in PFLlib's order."""

    train: np.ndarray  # (floor(0.75 n),) int64
    test: np.ndarray  # (n - floor(0.75 n),) int64


def _labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.size == 0:
        raise PartitionError(
            f"labels must be a non-empty 1-D integer array, got dtype {labels.dtype} "
            f"shape {labels.shape}"
        )
    if labels.min() < 0:
        raise PartitionError(f"labels must be >= 0, found {labels.min()}")
    return labels


def _count(value: object, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise PartitionError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def least_samples(
    num_samples: int,
    num_clients: int,
    batch_size: int = BATCH_SIZE,
    train_ratio: float = TRAIN_RATIO,
) -> int:
    """PFLlib's minimum client size: one test batch, capped at half a fair share.

    ``int(min(batch_size / (1 - train_ratio), num_samples / num_clients / 2))``; 40 for
    batch 10 and a 75/25 split unless clients are tiny.
    """
    _count(num_clients, "num_clients")
    if not 0 < train_ratio < 1:
        raise PartitionError(f"train_ratio must lie in (0, 1), got {train_ratio!r}")
    return int(min(batch_size / (1 - train_ratio), num_samples / num_clients / 2))


def dirichlet_parts(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.RandomState,
    *,
    num_classes: int | None = None,
    min_size: int | None = None,
    max_tries: int = MAX_TRIES,
) -> list[np.ndarray]:
    """``separate_data(..., partition="dir")``: per-class Dir(alpha) shares, capped, redrawn.

    Classes ``0 .. num_classes-1`` (default ``labels.max() + 1``) in order: the class's
    indices are shuffled (``rng.shuffle``), proportions drawn (``rng.dirichlet``), the share
    of every client already holding >= ``len(labels) / num_clients`` samples set to 0, the
    rest renormalised and the class cut at ``int(cumsum * count)``. The whole draw repeats
    until every client holds >= ``min_size`` (default :func:`least_samples`) samples.
    """
    labels = _labels(labels)
    num_clients = _count(num_clients, "num_clients")
    if not (isinstance(alpha, (int, float, np.floating)) and math.isfinite(alpha) and alpha > 0):
        raise PartitionError(f"alpha must be a finite number > 0, got {alpha!r}")
    k = int(labels.max()) + 1 if num_classes is None else _count(num_classes, "num_classes")
    n = labels.size
    need = least_samples(n, num_clients) if min_size is None else _count(min_size, "min_size", 0)
    cap = n / num_clients
    for _ in range(_count(max_tries, "max_tries")):
        batches: list[list[int]] = [[] for _ in range(num_clients)]
        for c in range(k):
            idx_k = np.where(labels == c)[0]
            rng.shuffle(idx_k)
            p = rng.dirichlet(np.repeat(alpha, num_clients))
            p = np.array([pj * (len(b) < cap) for pj, b in zip(p, batches, strict=True)])
            if not p.sum() > 0:
                raise PartitionError(
                    f"class {c}: every client already holds >= {cap:g} samples (or the "
                    f"Dirichlet draw underflowed at alpha={alpha}); no client can take it"
                )
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(idx_k)).astype(int)[:-1]
            split = np.split(idx_k, cuts)
            batches = [b + part.tolist() for b, part in zip(batches, split, strict=True)]
        if min(len(b) for b in batches) >= need:
            return [np.asarray(b, dtype=np.int64) for b in batches]
    raise PartitionError(
        f"dirichlet_parts: no draw in {max_tries} gave every one of {num_clients} clients "
        f">= {need} samples (alpha={alpha}, {n} samples)"
    )


def pathological_parts(
    labels: np.ndarray,
    num_clients: int,
    classes_per_client: int,
    rng: np.random.RandomState,
    *,
    num_classes: int | None = None,
    balance: bool = False,
    min_size: int | None = None,
) -> list[np.ndarray]:
    """``separate_data(..., partition="pat")``: ``classes_per_client`` classes per client.

    Class ``c`` goes to the first ``ceil(num_clients / num_classes * classes_per_client)``
    clients that still need a class; their counts are described in the module docstring
    (``rng.randint`` once per class when unbalanced). Slices follow the dataset's order
    (PFLlib does not shuffle here). Every client gets ``classes_per_client`` classes: each
    class has ``ceil(num_clients * classes_per_client / num_classes)`` holders.
    """
    labels = _labels(labels)
    num_clients = _count(num_clients, "num_clients")
    per_client = _count(classes_per_client, "classes_per_client")
    k = int(labels.max()) + 1 if num_classes is None else _count(num_classes, "num_classes")
    least = least_samples(labels.size, num_clients) if min_size is None else min_size
    by_class = [np.flatnonzero(labels == c) for c in range(k)]
    left = [per_client] * num_clients  # classes each client still takes
    chunks: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(k):
        holders = [j for j in range(num_clients) if left[j] > 0]
        if not holders:
            break
        holders = holders[: int(np.ceil((num_clients / k) * per_client))]
        count, m = len(by_class[c]), len(holders)
        per = count / m
        if balance:
            sizes = [int(per)] * (m - 1)
        else:
            low, high = int(max(per / 10, least / k)), int(per)  # numpy truncates PFLlib's floats
            if m > 1 and not low < high:
                raise PartitionError(
                    f"class {c}: {count} samples over {m} clients is too few to draw "
                    f"unbalanced counts in [{low}, {high})"
                )
            sizes = rng.randint(low, high, m - 1).tolist()
        sizes.append(count - sum(sizes))
        start = 0
        for j, size in zip(holders, sizes, strict=True):
            chunks[j].append(by_class[c][start : start + size])
            start += size
            left[j] -= 1
    return [np.concatenate(ch).astype(np.int64) for ch in chunks]


def train_test_parts(
    parts: list[np.ndarray], rng: np.random.RandomState, train_ratio: float = TRAIN_RATIO
) -> list[ClientSplit]:
    """``split_data``: scikit-learn's ``train_test_split(train_size=train_ratio,
    shuffle=True)`` on each client in turn: ``perm = rng.permutation(n)``, test =
    ``part[perm[:n - floor(ratio n)]]``, train = ``part[perm[n - floor(ratio n):]]``."""
    if not 0 < train_ratio < 1:
        raise PartitionError(f"train_ratio must lie in (0, 1), got {train_ratio!r}")
    out = []
    for i, part in enumerate(parts):
        part = np.asarray(part, dtype=np.int64)
        n_train = math.floor(train_ratio * part.size)
        n_test = part.size - n_train
        if n_train < 1 or n_test < 1:
            raise PartitionError(f"client {i}: {part.size} samples give an empty train/test split")
        perm = rng.permutation(part.size)
        out.append(ClientSplit(train=part[perm[n_test:]], test=part[perm[:n_test]]))
    return out


def pfllib_split(
    labels: np.ndarray,
    kind: Kind,
    *,
    num_clients: int = NUM_CLIENTS,
    seed: int = SEED,
    alpha: float = ALPHA,
    classes_per_client: int = 2,
    balance: bool = False,
) -> list[ClientSplit]:
    """PFLlib's clients for ``labels`` (of the merged dataset): ``separate_data`` with
    ``kind`` ("dir" or "pat") then ``split_data``, on one ``RandomState(seed)``."""
    if kind not in KINDS:
        raise PartitionError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise PartitionError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    rng = np.random.RandomState(int(seed))
    if kind == "dir":
        parts = dirichlet_parts(labels, num_clients, alpha, rng)
    else:
        parts = pathological_parts(labels, num_clients, classes_per_client, rng, balance=balance)
    return train_test_parts(parts, rng)


def merged_dataset(
    name: str = "fashion_mnist", data_dir: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, H, W) uint8, labels (N,) int64): the train split, then the test split."""
    from fmtl_lightning.data.datasets import load_dataset

    train, test = load_dataset(name, "train", data_dir), load_dataset(name, "test", data_dir)
    return np.concatenate([train.images, test.images]), np.concatenate([train.labels, test.labels])
