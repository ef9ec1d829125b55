"""Federate your own LightningModule on your own data: FedPer at widths 1, 1/2 and 1/4.

python examples/own_model.py        # about 35 s on 2 cores
"""

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from fmtl_lightning.config import parse_config
from fmtl_lightning.fed_data import federation_from_tensors
from fmtl_lightning.model_source import FederatedModel
from fmtl_lightning.simulation import Simulation


class DigitNet(L.LightningModule):  # your model, as you would train it with a Trainer
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def training_step(self, batch, batch_idx):  # noqa: ANN001 - the usual Lightning step
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:  # used in every local fit
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


# your data: six hospitals' worth of digits; three learn the digit, three its parity
d = load_digits()
x, y = torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None], torch.tensor(d.target)
train, test = [], []
for i, part in enumerate(
    torch.randperm(len(y), generator=torch.Generator().manual_seed(0)).chunk(6)
):
    task, target = ("digits/digit", y) if i % 2 == 0 else ("digits/parity", y % 2)
    train.append((x[part[:200]], {task: target[part[:200]]}))
    test.append((x[part[200:]], {task: target[part[200:]]}))
fed = federation_from_tensors(train, test, widths=[1.0, 1.0, 0.5, 0.5, 0.25, 0.25])

cfg = {"name": "own-model", "algorithm": {"name": "fedper"},
       "clients": [{"count": 1, "tasks": [t], "width": w} for w in (1.0, 0.5, 0.25)
                   for t in ("digits/digit", "digits/parity")],
       "federation": {"rounds": 30, "batch_size": 16}}  # fmt: skip
torch.manual_seed(0)
model = FederatedModel.from_model(DigitNet(), head="head", example_input=x[:2])

sim = Simulation(parse_config(cfg), "runs/own-model", model=model, federation=fed)
summary = sim.run()
print(f"{'client':8}{'width':>6}  task            accuracy")
for cid, c in summary["clients"].items():
    for task, m in c["tasks"].items():
        print(f"{cid:8}{c['width']:>6g}  {task:16}{m['acc']:.3f}")
print("exported:", sim.export_client("c04", "runs/own-model/bundle_c04", overwrite=True))
