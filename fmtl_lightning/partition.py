"""Partitioning a labelled dataset into federated clients (pure numpy, seeded).

Owns the non-IID schemes used by benchmarks and examples: IID, per-class Dirichlet label
skew, label shards of k classes per client, and a split of a (test) set by the classes each
client holds, plus a per-client train/test split drawn from each client's own distribution,
a large test set matching a client's label mix (:func:`matched_sample`), and a seeded
subsample to reach the small-data regime (100-500 samples per client) where a shared
backbone matters.

Every partition function returns ``list[np.ndarray]`` of sorted int64 indices into
``labels``: disjoint, and together covering the partitioned indices exactly once. Pass
``indices=`` (e.g. from :func:`subsample`) to partition only those samples. The same
``seed`` always gives the same result (``np.random.default_rng(seed)``). Bad arguments
raise :class:`PartitionError` naming the argument and its value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fmtl_lightning.errors import PartitionError

MAX_DIRICHLET_RETRIES = 1000


# --- argument checks -------------------------------------------------------------------------


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise PartitionError(
            f"labels must be a 1-D integer array, got dtype {labels.dtype} shape {labels.shape}"
        )
    return labels


def _check_indices(labels: np.ndarray, indices: np.ndarray | None) -> np.ndarray:
    """The indices to partition (default: all of ``labels``) as unique int64 in range."""
    if indices is None:
        return np.arange(len(labels), dtype=np.int64)
    indices = np.asarray(indices)
    if indices.ndim != 1 or not (np.issubdtype(indices.dtype, np.integer) or indices.size == 0):
        raise PartitionError(f"indices must be a 1-D integer array, got shape {indices.shape}")
    indices = indices.astype(np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= len(labels)):
        raise PartitionError(
            f"indices must lie in [0, {len(labels)}), found min {indices.min()} max {indices.max()}"
        )
    if np.unique(indices).size != indices.size:
        raise PartitionError("indices must not repeat")
    return indices


def _check_num_clients(num_clients: int, num_samples: int) -> None:
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise PartitionError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if num_clients > num_samples:
        raise PartitionError(
            f"num_clients={num_clients} is more than the {num_samples} samples to partition"
        )


def _sorted_parts(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(part).astype(np.int64) for part in parts]


# --- partitions ------------------------------------------------------------------------------


def partition_iid(
    labels: np.ndarray, num_clients: int, seed: int, *, indices: np.ndarray | None = None
) -> list[np.ndarray]:
    """Shuffle, then cut into ``num_clients`` parts whose sizes differ by at most one."""
    labels = _check_labels(labels)
    pool = _check_indices(labels, indices)
    _check_num_clients(num_clients, pool.size)
    rng = np.random.default_rng(seed)
    return _sorted_parts(np.array_split(rng.permutation(pool), num_clients))


def _dirichlet_draw(
    labels: np.ndarray, pool: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """One draw: each class's samples split over clients by Dirichlet(alpha) proportions."""
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for cls in np.unique(labels[pool]):
        members = rng.permutation(pool[labels[pool] == cls])
        proportions = rng.dirichlet(np.full(num_clients, alpha))  # (num_clients,)
        cuts = (np.cumsum(proportions)[:-1] * members.size).astype(np.int64)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].append(chunk)
    return [np.concatenate(chunks) for chunks in parts]


def partition_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
    *,
    indices: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Per-class Dirichlet(alpha) label skew: small alpha (0.1) -> each client sees few classes.

    Draws again (same generator) until every client holds >= ``min_size`` samples, at most
    :data:`MAX_DIRICHLET_RETRIES` times, then raises :class:`PartitionError`.
    """
    labels = _check_labels(labels)
    pool = _check_indices(labels, indices)
    _check_num_clients(num_clients, pool.size)
    if not (isinstance(alpha, (int, float, np.floating)) and math.isfinite(alpha) and alpha > 0):
        raise PartitionError(f"alpha must be a finite number > 0, got {alpha!r}")
    if min_size < 0 or min_size * num_clients > pool.size:
        raise PartitionError(
            f"min_size={min_size} is impossible for {num_clients} clients and {pool.size} samples"
        )
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DIRICHLET_RETRIES):
        parts = _dirichlet_draw(labels, pool, num_clients, float(alpha), rng)
        if min(part.size for part in parts) >= min_size:
            return _sorted_parts(parts)
    raise PartitionError(
        f"partition_dirichlet: no draw in {MAX_DIRICHLET_RETRIES} gave every one of "
        f"{num_clients} clients >= min_size={min_size} samples (alpha={alpha}, "
        f"{pool.size} samples); raise alpha, lower min_size or use fewer clients"
    )


def _shards_per_class(counts: np.ndarray, num_shards: int) -> np.ndarray:
    """Split ``num_shards`` over classes in proportion to ``counts``: >= 1 and <= count each."""
    quota = counts * num_shards / counts.sum()
    alloc = np.clip(np.floor(quota).astype(np.int64), 1, counts)
    while alloc.sum() < num_shards:  # give to the class furthest below its quota
        room = np.where(alloc < counts, quota - alloc, -np.inf)
        alloc[int(np.argmax(room))] += 1
    while alloc.sum() > num_shards:  # take from the class furthest above its quota
        excess = np.where(alloc > 1, alloc - quota, -np.inf)
        alloc[int(np.argmax(excess))] -= 1
    return alloc


def partition_shards(
    labels: np.ndarray,
    num_clients: int,
    classes_per_client: int,
    seed: int,
    *,
    indices: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Label shards (McMahan et al.): each client gets ``classes_per_client`` shards.

    Samples are sorted by label and cut into ``num_clients * classes_per_client`` shards,
    each shard inside one class (a class gets shards in proportion to its size), so a
    client holds at most ``classes_per_client`` classes. Needs at least as many shards as
    classes present.
    """
    labels = _check_labels(labels)
    pool = _check_indices(labels, indices)
    _check_num_clients(num_clients, pool.size)
    if not isinstance(classes_per_client, (int, np.integer)) or classes_per_client < 1:
        raise PartitionError(
            f"classes_per_client must be an integer >= 1, got {classes_per_client!r}"
        )
    classes, counts = np.unique(labels[pool], return_counts=True)
    num_shards = num_clients * classes_per_client
    if num_shards < classes.size or num_shards > pool.size:
        raise PartitionError(
            f"num_clients*classes_per_client={num_shards} shards must be between the "
            f"{classes.size} classes present and the {pool.size} samples"
        )
    rng = np.random.default_rng(seed)
    shards: list[np.ndarray] = []
    for cls, n_shards in zip(classes, _shards_per_class(counts, num_shards), strict=True):
        members = rng.permutation(pool[labels[pool] == cls])
        shards.extend(np.array_split(members, n_shards))
    order = rng.permutation(num_shards).reshape(num_clients, classes_per_client)
    return _sorted_parts([np.concatenate([shards[s] for s in row]) for row in order])


def partition_by_held_classes(
    labels: np.ndarray, held: Sequence[np.ndarray], seed: int | Sequence[int]
) -> list[np.ndarray]:
    """Divide each class's samples among the clients that hold that class.

    ``held[i]``: the class labels client ``i`` holds (e.g. the labels of its training
    part; repeats are fine). In increasing class order, the samples of ``labels`` of each
    class some client holds are shuffled and cut into near-equal consecutive chunks, one
    per holder in client order; samples of a class no client holds are left out (the one
    exception to "covering the indices exactly once"). HeteroFL's non-IID test split: each
    client is tested on the classes it trained on. ``seed``: anything
    ``np.random.default_rng`` takes.
    """
    labels = _check_labels(labels)
    if not held:
        raise PartitionError("held must name the classes of at least one client")
    sets = []
    for i, h in enumerate(held):
        h = np.asarray(h)
        if h.ndim != 1 or not (np.issubdtype(h.dtype, np.integer) or h.size == 0):
            raise PartitionError(
                f"held[{i}] must be a 1-D integer array, got dtype {h.dtype} shape {h.shape}"
            )
        sets.append(np.unique(h.astype(np.int64)))
    rng = np.random.default_rng(seed)
    chunks: list[list[np.ndarray]] = [[] for _ in sets]
    for cls in np.unique(np.concatenate([labels.astype(np.int64), *sets])):
        holders = [i for i, s in enumerate(sets) if cls in s]
        if not holders:
            continue
        members = rng.permutation(np.flatnonzero(labels == cls))
        for i, chunk in zip(holders, np.array_split(members, len(holders)), strict=True):
            chunks[i].append(chunk)
    return [
        np.sort(np.concatenate(ls)).astype(np.int64) if ls else np.array([], dtype=np.int64)
        for ls in chunks
    ]


# --- per-client helpers ----------------------------------------------------------------------


def _stratified_test_counts(counts: np.ndarray, num_test: int) -> np.ndarray:
    """Test samples per class summing to ``num_test``, proportional (largest remainder)."""
    quota = counts * num_test / counts.sum()
    take = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - take), kind="stable")
    take[order[: num_test - int(take.sum())]] += 1
    return take


def split_train_test(
    indices: np.ndarray,
    test_fraction: float,
    seed: int,
    *,
    labels: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's ``indices`` into (train, test), both sorted int64.

    The test set holds ``round(test_fraction * n)`` samples (at least 1 and at most n-1),
    drawn from the client's own data; with ``labels`` it is stratified by label
    (largest remainder per class), so it follows the client's label distribution.
    """
    if not (isinstance(test_fraction, (int, float, np.floating)) and 0 < test_fraction < 1):
        raise PartitionError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    indices = np.asarray(indices)
    if indices.ndim != 1 or indices.size < 2:
        raise PartitionError(f"indices must be 1-D with >= 2 samples, got shape {indices.shape}")
    if labels is not None:
        labels = _check_labels(labels)
        indices = _check_indices(labels, indices)
    indices = indices.astype(np.int64)
    num_test = min(max(round(test_fraction * indices.size), 1), indices.size - 1)
    rng = np.random.default_rng(seed)
    if labels is None:
        test = rng.permutation(indices)[:num_test]
    else:
        client_labels = labels[indices]
        classes, counts = np.unique(client_labels, return_counts=True)
        take = _stratified_test_counts(counts, num_test)
        test = np.concatenate(
            [
                rng.permutation(indices[client_labels == cls])[:k]
                for cls, k in zip(classes, take, strict=True)
            ]
        )
    is_test = np.isin(indices, test)
    return np.sort(indices[~is_test]), np.sort(indices[is_test])


def split_clients(
    parts: list[np.ndarray],
    test_fraction: float,
    seed: int,
    *,
    labels: np.ndarray | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`split_train_test` for every client, each with its own seed derived from ``seed``."""
    seeds = np.random.SeedSequence(seed).generate_state(len(parts))
    return [
        split_train_test(part, test_fraction, int(s), labels=labels)
        for part, s in zip(parts, seeds, strict=True)
    ]


def matched_sample(labels: np.ndarray, mix: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices into ``labels`` whose label counts follow ``mix`` (sorted int64).

    ``mix[c]`` is the weight of class ``c`` (e.g. a client's training label counts); class
    ``c`` gets its largest-remainder share of ``n``, drawn without replacement. This gives a
    client a large test set from its own label distribution (e.g. from a dataset's test
    split) while its training data stay as they are.
    """
    labels = _check_labels(labels)
    mix = np.asarray(mix, dtype=np.float64)
    if mix.ndim != 1 or mix.size == 0 or not np.all(np.isfinite(mix)) or np.any(mix < 0):
        raise PartitionError(f"mix must be a 1-D array of finite weights >= 0, got {mix!r}")
    if not mix.sum() > 0:
        raise PartitionError("mix must give at least one class a weight > 0")
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise PartitionError(f"n must be an integer >= 1, got {n!r}")
    classes = np.flatnonzero(mix > 0)
    take = _stratified_test_counts(mix[classes], int(n))
    rng = np.random.default_rng(seed)
    out = []
    for c, k in zip(classes, take, strict=True):
        members = np.flatnonzero(labels == c)
        if k > members.size:
            raise PartitionError(
                f"class {c}: {k} samples wanted for a mix of {n}, only {members.size} available"
            )
        out.append(rng.choice(members, size=int(k), replace=False))
    return np.sort(np.concatenate(out)).astype(np.int64)


def subsample(
    labels: np.ndarray, n: int, seed: int, *, indices: np.ndarray | None = None
) -> np.ndarray:
    """A seeded random subset of ``n`` indices (sorted int64), to partition afterwards."""
    labels = _check_labels(labels)
    pool = _check_indices(labels, indices)
    if not isinstance(n, (int, np.integer)) or not 1 <= n <= pool.size:
        raise PartitionError(f"n must be an integer in [1, {pool.size}], got {n!r}")
    return np.sort(np.random.default_rng(seed).choice(pool, size=n, replace=False))
