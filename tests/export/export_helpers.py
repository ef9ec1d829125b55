"""Shared small models and cached exports for the export tests (one export per config)."""

from __future__ import annotations

from pathlib import Path

import torch

from export import GraphInfo, TrainStepInfo, export_backbone, export_head, export_train_step
from fmtl_lightning.models import BackboneConfig, MultiTaskModel, head_name

TASKS = {"mnist/digit": 10, "mnist/attrs": 3}
KINDS = {"mnist/digit": "multiclass", "mnist/attrs": "multilabel"}
HIDDEN = {"mlp": (64, 32), "cnn": (8, 16, 32), "dwcnn": (8, 16, 32), "fedavgcnn": (8, 16, 32)}
FAMILIES = [
    ("mlp", "none"),
    ("cnn", "group"),
    ("cnn", "batch"),
    ("dwcnn", "batch"),
    ("fedavgcnn", "none"),
]
WIDTHS = [1.0, 0.25]
CONFIGS = [(f, n, w) for f, n in FAMILIES for w in WIDTHS]
IDS = [f"{f}-{n}-w{w}" for f, n, w in CONFIGS]
EXAMPLE_X = torch.zeros(1, 1, 28, 28)


def make_model(family: str, norm: str, width: float, seed: int = 0) -> MultiTaskModel:
    """A small model with non-trivial norm affine params and running stats."""
    torch.manual_seed(seed)
    cfg = BackboneConfig(family=family, norm=norm, hidden=HIDDEN[family])  # type: ignore[arg-type]
    model = MultiTaskModel(cfg, TASKS, width)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if t.dim() == 1 and "layers" in name and "weight" in name:
                t.uniform_(0.5, 1.5)  # norm scales away from 1
        for name, t in model.named_buffers():
            if name.endswith("running_mean"):
                t.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
    return model


def random_batch(batch: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 28, 28, generator=g)
    ys = {
        "mnist/digit": torch.randint(0, 10, (batch,), generator=g),
        "mnist/attrs": torch.randint(0, 2, (batch, 3), generator=g).float(),
    }
    return x, ys


class Exports:
    """Exports each (family, norm, width) once per session, on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._inference: dict[tuple, tuple[GraphInfo, dict[str, GraphInfo]]] = {}
        self._steps: dict[tuple, TrainStepInfo] = {}

    def inference(
        self, family: str, norm: str, width: float, weights_as_inputs: bool = False
    ) -> tuple[MultiTaskModel, GraphInfo, dict[str, GraphInfo]]:
        model = make_model(family, norm, width)
        key = (family, norm, width, weights_as_inputs)
        if key not in self._inference:
            d = self.root / "-".join(map(str, key))
            d.mkdir()
            bb = export_backbone(
                model.backbone, d / "backbone.onnx", EXAMPLE_X, weights_as_inputs=weights_as_inputs
            )
            heads = {
                t: export_head(
                    model.heads[head_name(t)],
                    d / f"{head_name(t)}.onnx",
                    model.backbone.feature_dim,
                    weights_as_inputs=weights_as_inputs,
                )
                for t in TASKS
            }
            self._inference[key] = (bb, heads)
        return (model, *self._inference[key])

    def step(self, family: str, norm: str, width: float) -> tuple[MultiTaskModel, TrainStepInfo]:
        model = make_model(family, norm, width)
        key = (family, norm, width)
        if key not in self._steps:
            path = self.root / f"step-{family}-{norm}-{width}.onnx"
            self._steps[key] = export_train_step(model, KINDS, path, EXAMPLE_X)
        return model, self._steps[key]
