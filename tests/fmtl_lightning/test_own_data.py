"""A user's own data: Datasets / DataLoaders / LightningDataModules per client, and one
dataset cut by a partitioner, all on real data (sklearn digits), all equal to the tensors."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fmtl_lightning.errors import FederationError
from fmtl_lightning.fed_data import federation_from_tensors
from fmtl_lightning.own_data import (
    federation_from_datamodules,
    federation_from_datasets,
    partition_dataset,
)


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None], torch.tensor(d.target)


def _parts(x, y):
    return [(x[i * 100 : i * 100 + 80], y[i * 100 : i * 100 + 80]) for i in range(3)], [
        (x[i * 100 + 80 : i * 100 + 100], y[i * 100 + 80 : i * 100 + 100]) for i in range(3)
    ]


def _same(a, b):
    assert [c.tasks for c in a.clients] == [c.tasks for c in b.clients]
    for ca, cb in zip(a.clients, b.clients, strict=True):
        torch.testing.assert_close(ca.x_train, cb.x_train)
        torch.testing.assert_close(ca.x_test, cb.x_test)
        for t in ca.tasks:
            assert torch.equal(ca.y_train[t], cb.y_train[t]) and torch.equal(
                ca.y_test[t], cb.y_test[t]
            )
            assert torch.equal(ca.label_masks[t], cb.label_masks[t])


def test_datasets_and_loaders_per_client_equal_the_tensors(digits):
    x, y = digits
    tr, te = _parts(x, y)
    want = federation_from_tensors([(a, {"digits/digit": b}) for a, b in tr],
                                   [(a, {"digits/digit": b}) for a, b in te], [1.0, 0.5, 0.5])  # fmt: skip
    tasks = [["digits/digit"]] * 3
    got = federation_from_datasets([TensorDataset(a, b) for a, b in tr],
                                   [TensorDataset(a, b) for a, b in te], tasks, [1.0, 0.5, 0.5])  # fmt: skip
    _same(got, want)
    loaders = federation_from_datasets([DataLoader(TensorDataset(a, b), batch_size=7) for a, b in tr],
                                       [DataLoader(TensorDataset(a, b), batch_size=7) for a, b in te],
                                       tasks, [1.0, 0.5, 0.5])  # fmt: skip
    _same(loaders, want)


def test_lightning_datamodules_per_client_equal_the_tensors(digits):
    x, y = digits
    tr, te = _parts(x, y)

    class Digits(L.LightningDataModule):
        def __init__(self, i: int) -> None:
            super().__init__()
            self.i = i

        def setup(self, stage: str) -> None:
            self.train, self.test = TensorDataset(*tr[self.i]), TensorDataset(*te[self.i])

        def train_dataloader(self):
            return DataLoader(self.train, batch_size=16)

        def test_dataloader(self):
            return DataLoader(self.test, batch_size=16)

    want = federation_from_tensors([(a, {"digits/digit": b}) for a, b in tr],
                                   [(a, {"digits/digit": b}) for a, b in te], [1.0, 1.0, 0.25])  # fmt: skip
    got = federation_from_datamodules(
        [Digits(i) for i in range(3)], [["digits/digit"]] * 3, [1.0, 1.0, 0.25]
    )
    _same(got, want)


class Pairs(Dataset):
    """A user's dataset of (x, {task: y}) samples."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], {"digits/digit": self.y[i], "digits/parity": self.y[i] % 2}


def test_one_dataset_cut_by_a_partitioner(digits):
    x, y = digits
    ds = Pairs(x[:600], y[:600])
    tasks = ["digits/digit", "digits/parity"]
    fed = partition_dataset(ds, tasks, [1.0, 0.5, 0.5, 0.25, 0.25], label=lambda s: int(s[1]["digits/digit"]),
                            kind="shards", classes_per_client=2, seed=3)  # fmt: skip
    again = partition_dataset(ds, tasks, [1.0, 0.5, 0.5, 0.25, 0.25], label=lambda s: int(s[1]["digits/digit"]),
                              kind="shards", classes_per_client=2, seed=3)  # fmt: skip
    _same(fed, again)  # seeded
    rows = {tuple(r.flatten().tolist()): i for i, r in enumerate(x[:600])}
    seen = []
    for c in fed.clients:
        assert c.tasks == tuple(tasks) and c.x_train.shape[1:] == (1, 8, 8)
        idx = [rows[tuple(r.flatten().tolist())] for r in torch.cat([c.x_train, c.x_test])]
        seen += idx
        digits_held = set(y[idx].tolist())
        assert len(digits_held) <= 2  # shards: two classes per client
        assert torch.equal(
            torch.cat([c.y_train["digits/parity"], c.y_test["digits/parity"]]), y[idx] % 2
        )
    assert len(seen) == len(set(seen))  # disjoint
    iid = partition_dataset(ds, tasks, [1.0] * 3, label=lambda s: int(s[1]["digits/digit"]), seed=0)
    assert sum(len(c.x_train) + len(c.x_test) for c in iid.clients) == 600
    with pytest.raises(FederationError, match="kind: 'round' is not iid, dirichlet or shards"):
        partition_dataset(ds, tasks, [1.0] * 3, label=lambda s: 0, kind="round")


def test_samples_that_do_not_fit_are_refused_naming_the_client(digits):
    x, y = digits
    with pytest.raises(
        FederationError,
        match=r"client c00 train: sample 0 has targets \['digits/digit', 'digits/parity'\]",
    ):
        federation_from_datasets(
            [Pairs(x[:10], y[:10])], [Pairs(x[:10], y[:10])], [["digits/digit"]], [1.0]
        )
    with pytest.raises(FederationError, match="client c00 test: no samples"):
        federation_from_datasets([TensorDataset(x[:10], y[:10])], [TensorDataset(x[:0], y[:0])],
                                 [["digits/digit"]], [1.0])  # fmt: skip
    with pytest.raises(
        FederationError, match="one train set, test set, task list and width per client"
    ):
        federation_from_datasets([], [], [["digits/digit"]], [1.0])
