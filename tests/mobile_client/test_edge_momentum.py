"""An edge client of a run trained with SGD momentum and weight decay trains on the device
as its Lightning peers do: the bundle's step graphs carry the momentum buffers (zeros at
the start of a local fit, as torch's optimiser), checked against ``torch.optim.SGD``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from edge_helpers import MLP_CFG, client_model, digits, run_and_export, torch_sgd

from mobile_client.batching import batch_order
from mobile_client.runtime import EdgeClient

MOMENTUM, DECAY = 0.9, 0.01
CFG = {**MLP_CFG, "name": "tiny-edge-momentum",
       "optimizer": {"name": "sgd", "lr": 0.05, "momentum": MOMENTUM, "weight_decay": DECAY}}  # fmt: skip


@pytest.fixture(scope="module")
def momentum_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return run_and_export(CFG, tmp_path_factory.mktemp("edge-momentum"))


@pytest.mark.slow  # a run and an export
@pytest.mark.parametrize("head_only", [False, True], ids=["full", "head_only"])
def test_device_steps_equal_torch_sgd_with_momentum(momentum_export, head_only: bool) -> None:
    run_dir, bundle = momentum_export
    ec = EdgeClient(bundle, "c01")
    step = ec.train_step().file
    want_opt = {"momentum": MOMENTUM, "weight_decay": DECAY, "nesterov": 0.0}
    assert step.optimizer == want_opt and len(step.momentum_inputs) == len(step.momentum_outputs)
    assert all(ec.head(t).head_step.optimizer == want_opt for t in ec.entry.tasks)
    _, x, ys = digits(40, ec.entry.tasks, "train")
    lr, bs, seed, steps = 0.1, 8, 3, 4
    res = ec.train(x, ys, batch_size=bs, steps=steps, lr=lr, seed=seed, head_only=head_only)
    batches = list(batch_order(40, bs, 1, steps, seed))
    kinds = {t: ec.head(t).kind for t in ec.entry.tasks}
    want = torch_sgd(client_model(run_dir, "c01"), x, ys, kinds, batches, lr, head_only,
                     momentum=MOMENTUM, weight_decay=DECAY)  # fmt: skip
    for k in want:
        np.testing.assert_allclose(res.state[k], want[k], rtol=0, atol=1e-5, err_msg=k)
    plain = torch_sgd(client_model(run_dir, "c01"), x, ys, kinds, batches, lr, head_only)
    moved = [k for k in want if not np.allclose(want[k], plain[k], atol=1e-4)]
    assert moved  # momentum and decay change the result: the comparison above means something
    assert set(res.momenta) == ({k for k in want if k.startswith("heads.")} if head_only
                                else set(step.momentum_inputs.values()))  # fmt: skip
