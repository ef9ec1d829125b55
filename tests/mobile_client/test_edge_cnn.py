"""EdgeClient on a tiny CNN with batch norm (buffers travel through the step graph)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from edge_helpers import CNN_CFG, client_model, digits, run_and_export, torch_sgd

from mobile_client.batching import batch_order
from mobile_client.runtime import EdgeClient

CFG = {
    **CNN_CFG,
    "clients": [{"count": 1, "tasks": ["digits/digit", "digits/attrs"], "width": 0.5}],
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return run_and_export(CFG, tmp_path_factory.mktemp("edge_cnn"))


def test_cnn_predict_equals_torch(exported) -> None:
    run_dir, bundle = exported
    ec = EdgeClient(bundle)  # the only client
    assert ec.client_id == "c00" and ec.widths == [0.5]
    px, x, _ = digits(17, ())
    with torch.no_grad():
        want = client_model(run_dir, "c00")(torch.from_numpy(x))
    for t in ec.tasks:
        np.testing.assert_allclose(ec.predict(t, px), want[t].numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_only", [False, True], ids=["full", "head_only"])
def test_cnn_train_equals_torch_sgd(exported, head_only: bool) -> None:
    run_dir, bundle = exported
    ec = EdgeClient(bundle)
    _, x, ys = digits(40, ec.entry.tasks, "train")
    res = ec.train(x, ys, batch_size=16, steps=3, lr=0.1, seed=1, head_only=head_only)
    kinds = {t: ec.head(t).kind for t in ys}
    batches = list(batch_order(40, 16, 1, 3, 1))
    want = torch_sgd(client_model(run_dir, "c00"), x, ys, kinds, batches, 0.1, head_only)
    base = ec.base_state()
    stats = [k for k in want if "running" in k or "num_batches" in k]
    assert stats and set(res.state) == set(want)
    for k in want:
        np.testing.assert_allclose(res.state[k], want[k], rtol=0, atol=1e-5, err_msg=k)
    for k in stats:  # buffers move with full training only (head-only: frozen backbone)
        assert np.array_equal(res.state[k], base[k]) == head_only, k
    assert set(res.shared) == set(ec.shared_keys)
