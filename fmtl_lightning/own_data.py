"""A user's own data as a federation: torch Datasets or LightningDataModules per client, or
one dataset cut among the clients by a partitioner.

Every form ends in :func:`~fmtl_lightning.fed_data.federation_from_tensors` (client ``i``
is ``c{i:02d}``); inputs may have any per-sample shape. A sample is ``(x, y)`` for a
client with one task (``tasks`` names it) or ``(x, {task: y})``. The partitioners are
:mod:`fmtl_lightning.partition`'s (IID, Dirichlet label skew, label shards), driven by a
label function, seeded, and each client's part is split into train and test stratified
by that label. Errors are :class:`~fmtl_lightning.errors.FederationError` naming the
client or argument.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fmtl_lightning.errors import FederationError
from fmtl_lightning.fed_data import Federation, federation_from_tensors
from fmtl_lightning.partition import (
    partition_dirichlet,
    partition_iid,
    partition_shards,
    split_train_test,
)

Split = tuple[torch.Tensor, dict[str, torch.Tensor]]


def tensors_of(dataset: Any, tasks: Sequence[str], where: str) -> Split:
    """Every sample of a map-style ``dataset`` (or an iterable of batches from a
    DataLoader) stacked: ``(x, {task: y})``."""
    xs: list[torch.Tensor] = []
    ys: dict[str, list[torch.Tensor]] = {t: [] for t in tasks}
    batched = isinstance(dataset, torch.utils.data.DataLoader)
    for i, item in enumerate(dataset):
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise FederationError(f"{where}: sample {i} is not (x, y) or (x, {{task: y}})")
        x, y = item
        targets = y if isinstance(y, Mapping) else {tasks[0]: y} if len(tasks) == 1 else None
        if targets is None or set(targets) != set(tasks):
            got = sorted(y) if isinstance(y, Mapping) else "one target"
            raise FederationError(f"{where}: sample {i} has targets {got}, expected {list(tasks)}")
        xs.append(torch.as_tensor(x) if batched else torch.as_tensor(x)[None])
        for t in tasks:
            v = torch.as_tensor(targets[t])
            ys[t].append(v if batched else v[None])
    if not xs:
        raise FederationError(f"{where}: no samples")
    return torch.cat(xs).float(), {t: torch.cat(v) for t, v in ys.items()}


def federation_from_datasets(
    train: Sequence[Any],
    test: Sequence[Any],
    tasks: Sequence[Sequence[str]],
    widths: Sequence[float],
    *,
    normalisation: tuple[float, float] = (0.0, 1.0),
) -> Federation:
    """Client ``i`` trains on ``train[i]`` and is tested on ``test[i]`` (torch Datasets or
    DataLoaders), for the tasks ``tasks[i]``."""
    if not len(train) == len(test) == len(tasks) == len(widths):
        raise FederationError("one train set, test set, task list and width per client: got "
                              f"{len(train)}, {len(test)}, {len(tasks)}, {len(widths)}")  # fmt: skip
    tr = [
        tensors_of(d, list(t), f"client c{i:02d} train")
        for i, (d, t) in enumerate(zip(train, tasks, strict=True))
    ]
    te = [
        tensors_of(d, list(t), f"client c{i:02d} test")
        for i, (d, t) in enumerate(zip(test, tasks, strict=True))
    ]
    return federation_from_tensors(tr, te, widths, normalisation=normalisation)


def federation_from_datamodules(
    modules: Sequence[Any],
    tasks: Sequence[Sequence[str]],
    widths: Sequence[float],
    *,
    normalisation: tuple[float, float] = (0.0, 1.0),
) -> Federation:
    """Client ``i``'s data is the LightningDataModule ``modules[i]``: its
    ``train_dataloader()`` to train, its ``test_dataloader()`` (else ``val_dataloader()``)
    to test; ``setup`` is called as a Trainer would."""
    train, test = [], []
    for i, dm in enumerate(modules):
        dm.prepare_data()
        dm.setup("fit")
        train.append(dm.train_dataloader())
        try:
            dm.setup("test")
            test.append(dm.test_dataloader())
        except (NotImplementedError, AttributeError):
            test.append(dm.val_dataloader())
        if test[-1] is None:
            raise FederationError(f"client c{i:02d}: its data module has no test or val loader")
    return federation_from_datasets(train, test, tasks, widths, normalisation=normalisation)


def partition_dataset(
    dataset: Any,
    tasks: Sequence[str],
    widths: Sequence[float],
    *,
    label: Callable[[Any], int],
    kind: str = "iid",
    alpha: float = 0.3,
    classes_per_client: int = 2,
    test_fraction: float = 0.25,
    seed: int = 0,
    normalisation: tuple[float, float] = (0.0, 1.0),
) -> Federation:
    """One dataset cut among ``len(widths)`` clients (all with ``tasks``): ``kind`` ``iid``,
    ``dirichlet`` (label skew, ``alpha``) or ``shards`` (``classes_per_client``) over
    ``label(sample)``; each part split into train/test (``test_fraction``, stratified)."""
    x, ys = tensors_of(dataset, list(tasks), "dataset")
    labels = np.array([int(label((x[i], {t: v[i] for t, v in ys.items()}))) for i in range(len(x))])
    n = len(widths)
    if kind == "iid":
        parts = partition_iid(labels, n, seed)
    elif kind == "dirichlet":
        parts = partition_dirichlet(labels, n, alpha, seed)
    elif kind == "shards":
        parts = partition_shards(labels, n, classes_per_client, seed)
    else:
        raise FederationError(f"kind: {kind!r} is not iid, dirichlet or shards")
    train, test = [], []
    for j, part in enumerate(parts):
        tr, te = split_train_test(part, test_fraction, seed + 1 + j, labels=labels)
        train.append((x[tr], {t: v[tr] for t, v in ys.items()}))
        test.append((x[te], {t: v[te] for t, v in ys.items()}))
    return federation_from_tensors(train, test, widths, normalisation=normalisation)
