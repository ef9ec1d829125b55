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
    x, y = _digits()
    train, test = [], []
    for i, (tasks, _) in enumerate(members):
        part = torch.arange(i * 120, (i + 1) * 120)
        ys = {t: (y if t.endswith("digit") else y % 2)[part] for t in tasks}
        train.append((x[part[:90]], {t: v[:90] for t, v in ys.items()}))
        test.append((x[part[90:]], {t: v[90:] for t, v in ys.items()}))
    return federation_from_tensors(train, test, [w for _, w in members])


def not_a_federation(cfg) -> dict:  # noqa: ANN001 - a wrong factory, for the tests
    return {"clients": []}
