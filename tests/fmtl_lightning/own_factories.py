"""Factories a config names by import path (``model.factory``, ``data.factory``): a user's
model (zoo LeNet with its head declared) and a user's data (sklearn digits at 28x28)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fmtl_lightning.fed_data import Federation, federation_from_tensors
from fmtl_lightning.model_source import FederatedModel
from fmtl_lightning.zoo import LeNet


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None]
    return F.interpolate(x, size=28, mode="bilinear"), torch.tensor(d.target)


def lenet() -> FederatedModel:
    torch.manual_seed(0)
    return FederatedModel.from_model(LeNet(), head="fc3", example_input=torch.zeros(2, 1, 28, 28))


def digits28(cfg) -> Federation:  # noqa: ANN001 - the RunConfig
    return _digits28([(tuple(g.tasks), g.width) for g in cfg.clients for _ in range(g.count)])


def fixed_clients(cfg) -> Federation:  # noqa: ANN001 - a factory that ignores the config
    return _digits28([(("digits/digit",), 1.0)] * 2 + [(("digits/parity",), 0.5)])


def _digits28(members: list) -> Federation:
    return _split(*_digits(), members, 120, 90)


def _split(x: torch.Tensor, y: torch.Tensor, members: list, per: int, n_train: int) -> Federation:
    """Client i: ``per`` consecutive digits, the first ``n_train`` for training; tasks
    ending in ``digit`` get the digit, the others its parity."""
    train, test = [], []
    for i, (tasks, _) in enumerate(members):
        part = torch.arange(i * per, (i + 1) * per)
        ys = {t: (y if t.endswith("digit") else y % 2)[part] for t in tasks}
        train.append((x[part[:n_train]], {t: v[:n_train] for t, v in ys.items()}))
        test.append((x[part[n_train:]], {t: v[n_train:] for t, v in ys.items()}))
    return federation_from_tensors(train, test, [w for _, w in members])


def not_a_federation(cfg) -> dict:  # noqa: ANN001 - a wrong factory, for the tests
    return {"clients": []}


class TabularNet(torch.nn.Module):
    """A user's tabular model: 64 features -> two hidden layers -> a head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 24)
        self.fc2 = torch.nn.Linear(24, 12)
        self.out = torch.nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))


def tabular() -> FederatedModel:
    torch.manual_seed(0)
    return FederatedModel.from_model(TabularNet(), head="out", example_input=torch.zeros(2, 64))


def digits_tabular(cfg) -> Federation:  # noqa: ANN001 - the RunConfig
    """sklearn digits as 64 tabular features, one client per configured client."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)
    return _split(x, y, [(tuple(g.tasks), g.width) for g in cfg.clients for _ in range(g.count)],
                  80, 60)  # fmt: skip
