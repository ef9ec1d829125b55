"""Your own tasks on your own data, named in a config alone (``examples/own_data.yaml``).

``own_tasks`` is the config's task factory (``tasks: [{factory: ...}]``): two tasks that
name no built-in dataset, so they need no ``domain`` or ``target``. ``own_digits`` is its
``data.factory``: it gets the RunConfig and returns one client per configured client, in
order, with the tasks that client was given, built from tensors by
:func:`~fmtl_lightning.fed_data.federation_from_tensors` (here sklearn's digits at 28x28
stand in for your data). Run from the checkout with ``PYTHONPATH=.`` so ``examples``
imports: ``PYTHONPATH=. fmtl simulate --config examples/own_data.yaml``; ``fmtl export``
then exports its clients like any other run.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fmtl_lightning.fed_data import Federation, federation_from_tensors
from fmtl_lightning.tasks import Task

TRAIN, TEST = 90, 30  # images per client


def own_tasks() -> list[Task]:
    """The digit (10 classes) and whether it is odd; outputs named for the export."""
    return [
        Task("mine/digit", 10, "multiclass", output_names=tuple(str(i) for i in range(10))),
        Task("mine/odd", 2, "multiclass", output_names=("even", "odd")),
    ]


def own_digits(cfg: Any) -> Federation:
    """Client i gets the next TRAIN + TEST digits, with the targets of its tasks."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = F.interpolate(torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None], size=28,
                      mode="bilinear")  # fmt: skip
    y = torch.tensor(d.target)
    targets = {"mine/digit": y, "mine/odd": y % 2}
    members = [(tuple(g.tasks), g.width) for g in cfg.clients for _ in range(g.count)]
    train, test = [], []
    for i, (tasks, _) in enumerate(members):
        part = torch.arange(i * (TRAIN + TEST), (i + 1) * (TRAIN + TEST))
        tr, te = part[:TRAIN], part[TRAIN:]
        train.append((x[tr], {t: targets[t][tr] for t in tasks}))
        test.append((x[te], {t: targets[t][te] for t in tasks}))
    return federation_from_tensors(train, test, [w for _, w in members])
