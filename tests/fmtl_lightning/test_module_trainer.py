"""MultiTaskModule under a plain ``lightning.Trainer``: fit / validate / test on real
(sklearn digits) data with a CSVLogger, the documented batch formats, and a typed error
for anything else."""

from __future__ import annotations

import csv
import math

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fmtl_lightning.data import load_digits
from fmtl_lightning.errors import BatchFormatError, TaskDefinitionError
from fmtl_lightning.models import BackboneConfig, MultiTaskModel
from fmtl_lightning.module import MultiTaskModule
from fmtl_lightning.tasks import Task, get_task

CFG = BackboneConfig("mlp", image_size=8, hidden=(32,), norm="none")


def _digits(n: int = 256) -> tuple[torch.Tensor, np.ndarray]:
    ds = load_digits("train")
    x = torch.from_numpy(ds.images[:n].astype(np.float32) / 255.0)[:, None]  # (n, 1, 8, 8)
    return x, ds.labels[:n]


class _MultiTask(Dataset):
    """Samples ``(x, {task: y})``; the default collate stacks them into the batch format."""

    def __init__(self, x: torch.Tensor, ys: dict[str, torch.Tensor]) -> None:
        self.x, self.ys = x, ys

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.x[i], {t: y[i] for t, y in self.ys.items()}


def _trainer(tmp_path, epochs: int) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="log", version=0),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )


def _rows(tmp_path) -> list[dict[str, str]]:
    with open(tmp_path / "log" / "version_0" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _col(rows: list[dict[str, str]], name: str) -> list[float]:
    return [float(r[name]) for r in rows if r.get(name, "") != ""]


def test_fit_validate_test_under_a_plain_trainer_log_to_csv(tmp_path):
    torch.manual_seed(0)
    x, labels = _digits()
    tasks = [get_task("digits/digit"), get_task("digits/attrs")]
    ys = {t.name: torch.from_numpy(t.targets(labels)) for t in tasks}
    model = MultiTaskModel(CFG, {t.name: t.num_outputs for t in tasks})
    module = MultiTaskModule(model, tasks, lr=0.5)
    train = DataLoader(_MultiTask(x[:192], {t: y[:192] for t, y in ys.items()}), batch_size=32)
    val = DataLoader(_MultiTask(x[192:], {t: y[192:] for t, y in ys.items()}), batch_size=32)
    trainer = _trainer(tmp_path, epochs=4)
    trainer.fit(module, train, val)
    (res,) = trainer.validate(module, val, verbose=False)
    (tst,) = trainer.test(module, val, verbose=False)
    rows = _rows(tmp_path)

    epoch_loss = _col(rows, "train_loss_epoch")
    assert len(epoch_loss) == 4 and all(math.isfinite(v) for v in epoch_loss)
    assert epoch_loss[-1] < 0.8 * epoch_loss[0]  # it learns
    assert len(_col(rows, "train_loss_step")) == 4 * 6  # 192 / 32 steps per epoch
    val_loss = _col(rows, "val_loss")
    assert len(val_loss) >= 4 and val_loss[3] < val_loss[0]
    for stage in ("train", "val", "test"):
        assert _col(rows, f"{stage}_loss/digits/digit") and _col(rows, f"{stage}_f1/digits/attrs")
    # the logged epoch values equal an independent evaluation of the final model
    with torch.no_grad():
        module.eval()
        out = module(x[192:])
    acc = float((out["digits/digit"].argmax(1) == ys["digits/digit"][192:]).float().mean())
    assert res["val_acc/digits/digit"] == pytest.approx(acc, abs=1e-6)
    assert tst["test_acc/digits/digit"] == pytest.approx(acc, abs=1e-6)
    ce = torch.nn.functional.cross_entropy(out["digits/digit"], ys["digits/digit"][192:])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        out["digits/attrs"], ys["digits/attrs"][192:]
    )
    assert res["val_loss"] == pytest.approx(float(ce + bce), abs=1e-5)


def test_a_single_task_module_takes_plain_tensor_dataset_batches(tmp_path):
    torch.manual_seed(0)
    x, labels = _digits(128)
    task = Task("value", 1, "regression")
    y = torch.from_numpy(labels.astype(np.float32) / 9.0)[:, None]
    module = MultiTaskModule(MultiTaskModel(CFG, {"value": 1}), [task], lr=0.2)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)  # yields [x, y]
    trainer = _trainer(tmp_path, epochs=3)
    trainer.fit(module, loader, loader)
    rows = _rows(tmp_path)
    loss = _col(rows, "train_loss_epoch")
    assert len(loss) == 3 and loss[-1] < loss[0]
    assert _col(rows, "val_acc/value") and _col(rows, "val_mae/value")  # R^2 and MAE


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        (torch.zeros(4, 1, 8, 8), r"must be \(x, \{task: y\}\)"),
        ((torch.zeros(4, 1, 8, 8),), r"must be \(x, \{task: y\}\)"),
        ((torch.zeros(4, 1, 8, 8), torch.zeros(4)), "one tensor, but the module has 2 tasks"),
        ((torch.zeros(4, 1, 8, 8), {"a": torch.zeros(4)}), r"no targets for tasks \['b'\]"),
        ((torch.zeros(4, 1, 8, 8), [1, 2]), r"batch\[1\] must be \{task: y\}"),
        (("x", {"a": 1, "b": 2}), r"batch\[0\] \(x\) must be a tensor"),
    ],
)
def test_other_batches_raise_batch_format_error(batch, match):
    tasks = [Task("a", 2, "multiclass"), Task("b", 3, "multilabel")]
    module = MultiTaskModule(MultiTaskModel(CFG, {"a": 2, "b": 3}), tasks)
    with pytest.raises(BatchFormatError, match=match):
        module.training_step(batch, 0)


def test_tasks_must_match_the_model_heads():
    model = MultiTaskModel(CFG, {"a": 2})
    with pytest.raises(TaskDefinitionError, match="'num_outputs' is 3"):
        MultiTaskModule(model, [Task("a", 3, "multiclass")])
    with pytest.raises(TaskDefinitionError, match="'b' has no head"):
        MultiTaskModule(model, [Task("b", 2, "multiclass")])
    with pytest.raises(TaskDefinitionError, match="must be a fmtl_lightning.tasks.Task"):
        MultiTaskModule(model, {"a": "multiclass"})  # type: ignore[dict-item]
