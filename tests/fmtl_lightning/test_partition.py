"""Partitioning: coverage, determinism, skew, shard class limits, splits, argument errors."""

from __future__ import annotations

import numpy as np
import pytest

from fmtl_lightning.errors import PartitionError
from fmtl_lightning.partition import (
    matched_sample,
    partition_by_held_classes,
    partition_dirichlet,
    partition_iid,
    partition_shards,
    split_clients,
    split_train_test,
    subsample,
)

# Imbalanced labels whose class sizes are not multiples of any shard size: 100..190 per class.
LABELS = np.repeat(np.arange(10), np.arange(100, 200, 10))
np.random.default_rng(123).shuffle(LABELS)
N = LABELS.size  # 1450


def _assert_exact_cover(parts: list[np.ndarray], expected: np.ndarray) -> None:
    for part in parts:
        assert part.dtype == np.int64 and part.ndim == 1
        assert np.all(np.diff(part) > 0)  # sorted, no repeats within a client
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.sort(expected))


def _total_variation_from_global(parts: list[np.ndarray]) -> float:
    """Mean over clients of TV distance between the client's label distribution and the global."""
    global_p = np.bincount(LABELS, minlength=10) / N
    tvs = [
        0.5 * np.abs(np.bincount(LABELS[p], minlength=10) / p.size - global_p).sum() for p in parts
    ]
    return float(np.mean(tvs))


PARTITIONERS = {
    "iid": lambda seed: partition_iid(LABELS, 10, seed),
    "dirichlet": lambda seed: partition_dirichlet(LABELS, 10, 0.3, seed),
    "shards": lambda seed: partition_shards(LABELS, 10, 2, seed),
}


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_every_sample_exactly_once_reproducible_and_seed_dependent(name):
    parts = PARTITIONERS[name](0)
    assert len(parts) == 10
    _assert_exact_cover(parts, np.arange(N))
    again = PARTITIONERS[name](0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = PARTITIONERS[name](1)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_sizes_differ_by_at_most_one_and_follow_the_global_mix():
    parts = partition_iid(LABELS, 7, seed=0)
    sizes = [p.size for p in parts]
    assert sum(sizes) == N and max(sizes) - min(sizes) <= 1
    assert _total_variation_from_global(parts) < 0.1


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha():
    skew = {
        alpha: np.mean(
            [
                _total_variation_from_global(partition_dirichlet(LABELS, 10, alpha, s))
                for s in range(3)
            ]
        )
        for alpha in (0.1, 100.0)
    }
    # measured: ~0.7 at alpha=0.1, ~0.03 at alpha=100
    assert skew[0.1] > 0.5
    assert skew[100.0] < 0.1
    classes_held = [np.unique(LABELS[p]).size for p in partition_dirichlet(LABELS, 10, 0.1, 0)]
    assert np.mean(classes_held) < 7  # most clients miss several classes


def test_dirichlet_min_size_is_respected_and_impossible_requests_fail_clearly():
    parts = partition_dirichlet(LABELS, 20, 0.1, seed=0, min_size=20)
    assert min(p.size for p in parts) >= 20
    _assert_exact_cover(parts, np.arange(N))
    tiny = np.repeat(np.arange(10), 2)  # 20 samples, 10 clients, each needs exactly 2
    with pytest.raises(PartitionError, match="min_size=2"):
        partition_dirichlet(tiny, 10, 0.01, seed=0, min_size=2)
    with pytest.raises(PartitionError, match="min_size=3"):
        partition_dirichlet(tiny, 10, 1.0, seed=0, min_size=3)


@pytest.mark.parametrize(("num_clients", "k"), [(10, 2), (5, 3), (20, 1), (6, 2)])
def test_shards_give_at_most_k_classes_per_client(num_clients, k):
    parts = partition_shards(LABELS, num_clients, k, seed=0)
    _assert_exact_cover(parts, np.arange(N))
    classes_held = [np.unique(LABELS[p]).size for p in parts]
    assert max(classes_held) <= k and min(classes_held) >= 1
    sizes = [p.size for p in parts]
    assert max(sizes) < 2.5 * min(sizes)  # shards are near-equal in size


def test_shards_need_at_least_one_shard_per_class():
    with pytest.raises(PartitionError, match="num_clients\\*classes_per_client=4"):
        partition_shards(LABELS, 2, 2, seed=0)


def test_partitions_of_a_subsample_cover_exactly_the_subsample():
    sub = subsample(LABELS, 300, seed=4)
    assert sub.size == 300 and np.unique(sub).size == 300 and np.all(np.diff(sub) > 0)
    np.testing.assert_array_equal(sub, subsample(LABELS, 300, seed=4))
    assert not np.array_equal(sub, subsample(LABELS, 300, seed=5))
    for parts in (
        partition_iid(LABELS, 3, 0, indices=sub),
        partition_dirichlet(LABELS, 3, 0.5, 0, indices=sub),
        partition_shards(LABELS, 5, 2, 0, indices=sub),
    ):
        _assert_exact_cover(parts, sub)


def test_split_train_test_is_disjoint_covering_and_stratified():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20 + [3] * 5)
    client = np.arange(100, dtype=np.int64)  # holds classes 0, 1, 2 as 50/30/20
    train, test = split_train_test(client, 0.2, seed=0, labels=labels)
    assert np.intersect1d(train, test).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), client)
    assert np.bincount(labels[test], minlength=4).tolist() == [10, 6, 4, 0]
    assert np.bincount(labels[train], minlength=4).tolist() == [40, 24, 16, 0]
    again = split_train_test(client, 0.2, seed=0, labels=labels)
    assert np.array_equal(again[1], test)
    assert not np.array_equal(split_train_test(client, 0.2, seed=1, labels=labels)[1], test)


def test_split_train_test_without_labels_and_at_the_edges():
    train, test = split_train_test(np.array([5, 9, 11, 40, 41]), 0.5, seed=0)
    assert (train.size, test.size) == (2, 3) or (train.size, test.size) == (3, 2)
    assert sorted(np.concatenate([train, test]).tolist()) == [5, 9, 11, 40, 41]
    train, test = split_train_test(np.array([3, 4]), 0.01, seed=0)  # still 1 test sample
    assert (train.size, test.size) == (1, 1)


def test_split_clients_gives_each_client_its_own_test_set():
    parts = partition_dirichlet(LABELS, 5, 0.3, seed=0)
    pairs = split_clients(parts, 0.25, seed=0, labels=LABELS)
    for part, (train, test) in zip(parts, pairs, strict=True):
        np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), part)
        assert test.size == round(0.25 * part.size)
        # the test split follows the client's own label mix, not the global one
        assert set(np.unique(LABELS[test])) <= set(np.unique(LABELS[part]))


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: partition_iid(LABELS, 0, 0), "num_clients must be an integer >= 1, got 0"),
        (lambda: partition_iid(LABELS[:5], 6, 0), "num_clients=6 is more than the 5 samples"),
        (
            lambda: partition_dirichlet(LABELS, 3, 0.0, 0),
            "alpha must be a finite number > 0, got 0.0",
        ),
        (
            lambda: partition_dirichlet(LABELS, 3, -1, 0),
            "alpha must be a finite number > 0, got -1",
        ),
        (lambda: partition_dirichlet(LABELS, 3, float("nan"), 0), "alpha .* got nan"),
        (
            lambda: partition_shards(LABELS, 3, 0, 0),
            "classes_per_client must be an integer >= 1, got 0",
        ),
        (
            lambda: split_train_test(np.arange(10), 0.0, 0),
            "test_fraction must lie in \\(0, 1\\), got 0.0",
        ),
        (lambda: split_train_test(np.arange(10), 1.0, 0), "test_fraction .* got 1.0"),
        (lambda: split_train_test(np.arange(1), 0.5, 0), "indices must be 1-D with >= 2 samples"),
        (lambda: subsample(LABELS, N + 1, 0), f"n must be an integer in \\[1, {N}\\], got {N + 1}"),
        (lambda: subsample(LABELS, 0, 0), "n must be .* got 0"),
        (lambda: partition_iid(LABELS.astype(float), 2, 0), "labels must be a 1-D integer array"),
        (lambda: partition_iid(LABELS, 2, 0, indices=np.array([1, 1])), "indices must not repeat"),
        (lambda: partition_iid(LABELS, 2, 0, indices=np.array([0, N])), "indices must lie in"),
    ],
    ids=lambda v: None if callable(v) else v.split(" ")[0],
)
def test_invalid_arguments_raise_partition_error_naming_them(call, fragment):
    with pytest.raises(PartitionError, match=fragment):
        call()
    assert issubclass(PartitionError, ValueError)


def test_matched_sample_follows_the_mix_by_largest_remainder():
    # mix 3 : 0 : 1 over 8 -> quotas 6, 0, 2 (exact); mix 1 : 1 : 1 over 8 -> 2.67 each:
    # floors 2, 2, 2 and the 2 leftover go to the first largest remainders (classes 0, 1)
    idx = matched_sample(LABELS, np.array([3, 0, 1]), 8, seed=0)
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)
    assert np.bincount(LABELS[idx], minlength=10).tolist() == [6, 0, 2, 0, 0, 0, 0, 0, 0, 0]
    idx = matched_sample(LABELS, np.array([1.0, 1.0, 1.0]), 8, seed=0)
    assert np.bincount(LABELS[idx], minlength=3)[:3].tolist() == [3, 3, 2]
    counts = np.bincount(LABELS[:200], minlength=10)  # a client's own training mix
    big = matched_sample(LABELS, counts, 500, seed=4)
    np.testing.assert_allclose(np.bincount(LABELS[big], minlength=10), counts * 2.5, atol=1)
    np.testing.assert_array_equal(big, matched_sample(LABELS, counts, 500, seed=4))
    assert not np.array_equal(big, matched_sample(LABELS, counts, 500, seed=5))


@pytest.mark.parametrize(
    "mix,n,words",
    [
        (np.array([1.0, -1.0]), 5, "finite weights"),
        (np.zeros(3), 5, "at least one class"),
        (np.array([1.0]), 0, "n must be"),
        (np.array([1.0]), 101, "class 0: 101 samples wanted"),
    ],
)
def test_matched_sample_errors_name_the_problem(mix, n, words):
    with pytest.raises(PartitionError, match=words):
        matched_sample(LABELS, mix, n, seed=0)


def test_partition_by_held_classes_by_hand():
    # classes 0, 1, 2; client 0 holds {0, 1}, client 1 holds {1}, nobody holds 2
    labels = np.array([0, 1, 2, 1, 0, 1, 1, 2, 0])
    held = [np.array([1, 0, 0]), np.array([1])]
    parts = partition_by_held_classes(labels, held, seed=5)
    # the same draws by hand: class 0 (one holder), then class 1 (two, client order)
    rng = np.random.default_rng(5)
    zeros = rng.permutation(np.array([0, 4, 8]))
    ones = rng.permutation(np.array([1, 3, 5, 6]))
    np.testing.assert_array_equal(parts[0], np.sort(np.concatenate([zeros, ones[:2]])))
    np.testing.assert_array_equal(parts[1], np.sort(ones[2:]))
    assert all(p.dtype == np.int64 for p in parts)
    assert not set(np.flatnonzero(labels == 2)) & set(np.concatenate(parts))  # class 2 left out
    again = partition_by_held_classes(labels, held, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_partition_by_held_classes_gives_each_client_only_its_classes():
    train = partition_shards(LABELS, 10, 2, seed=0)
    test_labels = np.random.default_rng(1).integers(0, 10, 500)
    parts = partition_by_held_classes(test_labels, [LABELS[p] for p in train], seed=[3, 7])
    for p, tr in zip(parts, train, strict=True):
        assert set(test_labels[p]) <= set(LABELS[tr])
    _assert_exact_cover(parts, np.arange(test_labels.size))  # every class is held here


def test_partition_by_held_classes_argument_errors():
    with pytest.raises(PartitionError, match="at least one client"):
        partition_by_held_classes(LABELS, [], seed=0)
    with pytest.raises(PartitionError, match=r"held\[1\] must be a 1-D integer array"):
        partition_by_held_classes(LABELS, [np.array([1]), np.array([0.5])], seed=0)
    with pytest.raises(PartitionError, match="labels must be a 1-D integer array"):
        partition_by_held_classes(LABELS.astype(float), [np.array([1])], seed=0)
    # a client holding nothing gets an empty part
    parts = partition_by_held_classes(LABELS, [np.array([], dtype=np.int64), np.array([3])], 0)
    assert parts[0].size == 0 and parts[0].dtype == np.int64
    np.testing.assert_array_equal(parts[1], np.flatnonzero(LABELS == 3))
