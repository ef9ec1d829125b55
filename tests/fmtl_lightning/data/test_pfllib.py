"""PFLlib's data protocol (fmtl_lightning.data.pfllib): the split of their committed MNIST
federation, a literal transcription of their code, hand-checked draws, and the rules on the
real 70k Fashion-MNIST federations (seed 1)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from fmtl_lightning.data.pfllib import (
    ClientSplit,
    dirichlet_parts,
    least_samples,
    merged_dataset,
    pathological_parts,
    pfllib_split,
    train_test_parts,
)
from fmtl_lightning.errors import PartitionError

# TsingZ0/PFLlib dataset/MNIST/config.json (committed output of generate_MNIST.py noniid - dir,
# np.random.seed(1)): samples per client, and the label counts of clients 5 and 16.
PFLLIB_MNIST_DIR_SIZES = [
    2630, 499, 1630, 2541, 1917, 6189, 1256, 1269, 3600, 4006,
    3116, 3772, 3613, 2134, 5730, 5448, 3628, 5653, 5266, 6103,
]  # fmt: skip
PFLLIB_MNIST_CLIENT5 = {1: 38, 3: 1, 4: 39, 8: 25, 9: 6086}
PFLLIB_MNIST_CLIENT16 = {0: 3628}


def _counts(labels: np.ndarray, idx: np.ndarray) -> dict[int, int]:
    c, n = np.unique(labels[idx], return_counts=True)
    return dict(zip(c.tolist(), n.tolist(), strict=True))


def test_mnist_dirichlet_matches_pfllibs_committed_federation():
    _, y = merged_dataset("mnist")
    parts = dirichlet_parts(y, 20, 0.1, np.random.RandomState(1))
    assert [p.size for p in parts] == PFLLIB_MNIST_DIR_SIZES
    assert _counts(y, parts[5]) == PFLLIB_MNIST_CLIENT5
    assert _counts(y, parts[16]) == PFLLIB_MNIST_CLIENT16


# ------------------------------------------------------------- their code, transcribed
@contextmanager
def _global_seed(seed: int) -> Iterator[None]:
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _pfllib_separate_and_split(labels, num_clients, num_classes, partition, class_per_client=2):
    """dataset_utils.separate_data (niid, balance=False) + split_data, as PFLlib writes them
    (global numpy generator, scikit-learn's train_test_split with random_state=None)."""
    from sklearn.model_selection import train_test_split

    batch_size, train_ratio, alpha = 10, 0.75, 0.1
    least = int(min(batch_size / (1 - train_ratio), len(labels) / num_clients / 2))
    dataidx_map = {}
    if partition == "pat":
        idxs = np.array(range(len(labels)))
        idx_for_each_class = [idxs[labels == i] for i in range(num_classes)]
        class_num_per_client = [class_per_client for _ in range(num_clients)]
        for i in range(num_classes):
            selected = [c for c in range(num_clients) if class_num_per_client[c] > 0]
            if len(selected) == 0:
                break
            selected = selected[: int(np.ceil((num_clients / num_classes) * class_per_client))]
            num_all = len(idx_for_each_class[i])
            num_per = num_all / len(selected)
            num_samples = np.random.randint(
                max(num_per / 10, least / num_classes), num_per, len(selected) - 1
            ).tolist()
            num_samples.append(num_all - sum(num_samples))
            idx = 0
            for client, num_sample in zip(selected, num_samples):  # noqa: B905
                chunk = idx_for_each_class[i][idx : idx + num_sample]
                if client not in dataidx_map:
                    dataidx_map[client] = chunk
                else:
                    dataidx_map[client] = np.append(dataidx_map[client], chunk, axis=0)
                idx += num_sample
                class_num_per_client[client] -= 1
    else:
        min_size, N = 0, len(labels)
        while min_size < least:
            idx_batch = [[] for _ in range(num_clients)]
            for k in range(num_classes):
                idx_k = np.where(labels == k)[0]
                np.random.shuffle(idx_k)
                p = np.random.dirichlet(np.repeat(alpha, num_clients))
                p = np.array([q * (len(j) < N / num_clients) for q, j in zip(p, idx_batch)])  # noqa: B905
                p = p / p.sum()
                p = (np.cumsum(p) * len(idx_k)).astype(int)[:-1]
                idx_batch = [j + i.tolist() for j, i in zip(idx_batch, np.split(idx_k, p))]  # noqa: B905
                min_size = min([len(j) for j in idx_batch])
        dataidx_map = dict(enumerate(idx_batch))
    out = []
    for client in range(num_clients):
        ids = np.asarray(dataidx_map[client])
        tr, te = train_test_split(ids, train_size=train_ratio, shuffle=True)
        out.append((tr, te))
    return out


@pytest.mark.parametrize("kind", ["dir", "pat"])
@pytest.mark.parametrize("seed", [1, 7])
def test_same_indices_in_the_same_order_as_pfllibs_code(kind, seed):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(6), [300, 250, 400, 350, 300, 400]))
    with _global_seed(seed):
        want = _pfllib_separate_and_split(labels, 6, 6, kind)
    got = pfllib_split(labels, kind, num_clients=6, seed=seed)
    assert len(got) == 6
    for (tr, te), c in zip(want, got, strict=True):
        np.testing.assert_array_equal(c.train, tr)
        np.testing.assert_array_equal(c.test, te)


# ------------------------------------------------------------- hand-checked draws
class ScriptedRNG:
    """Returns the given Dirichlet proportions / permutations in turn; shuffle is a no-op."""

    def __init__(self, dirichlet=(), permutations=(), randints=()) -> None:
        self.d, self.p, self.r = list(dirichlet), list(permutations), list(randints)

    def shuffle(self, x: np.ndarray) -> None:
        pass

    def dirichlet(self, alpha: np.ndarray) -> np.ndarray:
        return np.asarray(self.d.pop(0), dtype=float)

    def randint(self, low: float, high: float, size: int) -> np.ndarray:
        out = np.asarray(self.r.pop(0))
        assert out.shape == (size,) and np.all((low <= out) & (out < high)), (low, high, out)
        return out

    def permutation(self, n: int) -> np.ndarray:
        return np.asarray(self.p.pop(0))


def test_dirichlet_zeroes_a_full_clients_share_and_redraws_until_min_size():
    labels = np.repeat([0, 1, 2], 10)  # 30 samples, 2 clients: cap 15
    # draw 1: classes 0 and 1 all to client 0 (20 samples); its class-2 share is zeroed, so
    #         client 1 gets the 10 of class 2 alone: 10 < min_size 12, draw again
    # draw 2: class 0 cut at int(0.95 * 10) = 9, class 1 at int(0.6 * 10) = 6: client 0
    #         holds 9 + 6 = 15 >= 15 before class 2, so class 2 goes to client 1 again
    rng = ScriptedRNG(
        dirichlet=[[1.0, 0.0], [1.0, 0.0], [0.5, 0.5], [0.95, 0.05], [0.6, 0.4], [0.5, 0.5]]
    )
    parts = dirichlet_parts(labels, 2, 0.1, rng, min_size=12)
    assert [p.tolist() for p in parts] == [
        [*range(9), *range(10, 16)],
        [9, *range(16, 30)],
    ]
    assert not rng.d  # both draws used
    assert least_samples(30, 2) == 7 and least_samples(70_000, 20) == 40


def test_pathological_hand_case_and_train_test_counts():
    labels = np.array([0, 1] * 8 + [2, 3] * 8)  # 8 of each class
    rng = ScriptedRNG(randints=[[3], [2], [1], [3]])  # two holders per class: one draw each
    parts = pathological_parts(labels, 4, 2, rng, min_size=4)
    c0, c1, c2, c3 = (np.flatnonzero(labels == c) for c in range(4))
    assert [p.tolist() for p in parts] == [
        [*c0[:3], *c1[:2]],
        [*c0[3:], *c1[2:]],
        [*c2[:1], *c3[:3]],
        [*c2[1:], *c3[3:]],
    ]
    split = train_test_parts([np.arange(10, 20)], ScriptedRNG(permutations=[np.arange(10)[::-1]]))
    # floor(0.75 * 10) = 7 train; the first 3 of the permutation are the test samples
    assert len(split) == 1 and isinstance(split[0], ClientSplit)
    assert split[0].test.tolist() == [19, 18, 17]
    assert split[0].train.tolist() == [16, 15, 14, 13, 12, 11, 10]


# ------------------------------------------------------------- the real federations
@pytest.fixture(scope="module")
def fmnist_labels() -> np.ndarray:
    return merged_dataset("fashion_mnist")[1]


def _check_cover(labels: np.ndarray, clients: list[ClientSplit]) -> None:
    all_idx = np.concatenate([np.concatenate([c.train, c.test]) for c in clients])
    assert np.array_equal(np.sort(all_idx), np.arange(labels.size))  # each sample once
    for c in clients:
        n = c.train.size + c.test.size
        assert c.train.size == math.floor(0.75 * n)


def test_fashion_mnist_dirichlet_rules(fmnist_labels):
    y = fmnist_labels
    clients = pfllib_split(y, "dir")
    assert len(clients) == 20 and y.size == 70_000
    _check_cover(y, clients)
    for c in clients:
        idx = np.concatenate([c.train, c.test])
        assert idx.size >= 40
        held = np.bincount(y[idx], minlength=10)
        before = np.concatenate([[0], np.cumsum(held)[:-1]])  # samples held before class k
        # no share once at 70k / 20 (the last client: a 1-sample float-rounding leftover)
        assert np.all(held[before >= 3500] <= (1 if c is clients[-1] else 0))


def test_fashion_mnist_pathological_rules(fmnist_labels):
    y = fmnist_labels
    clients = pfllib_split(y, "pat")
    _check_cover(y, clients)
    for j, c in enumerate(clients):
        held = _counts(y, np.concatenate([c.train, c.test]))
        g = j // 4
        assert set(held) == {2 * g, 2 * g + 1}
        if j % 4 < 3:  # drawn counts; the group's last client takes the rest
            assert all(175 <= n < 1750 for n in held.values()), (j, held)


@pytest.mark.parametrize(
    "call,words",
    [
        (lambda y: pfllib_split(y, "shards"), "kind must be one of"),
        (lambda y: pfllib_split(y, "dir", seed=-1), "seed must be"),
        (lambda y: pfllib_split(y.astype(float), "dir"), "1-D integer array"),
        (lambda y: dirichlet_parts(y, 0, 0.1, np.random.RandomState(0)), "num_clients"),
        (lambda y: dirichlet_parts(y, 4, 0.0, np.random.RandomState(0)), "alpha"),
        (lambda y: dirichlet_parts(y, 4, 0.1, np.random.RandomState(0), min_size=60), "no draw"),
        (lambda y: pathological_parts(y, 4, 2, np.random.RandomState(0), min_size=60), "few"),
        (lambda y: train_test_parts([np.arange(1)], np.random.RandomState(0)), "client 0"),
    ],
)
def test_bad_arguments_raise_partition_error_naming_them(call, words):
    y = np.repeat(np.arange(2), 100)
    with pytest.raises(PartitionError, match=words):
        call(y)
