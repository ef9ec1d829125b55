"""The I/O-binding training path (state in onnxruntime's buffers between steps) gives the
numbers of the plain path (numpy fed and fetched every step) and of ``torch.optim.SGD``,
leaves the client's own arrays untouched, and refuses a graph whose outputs do not fit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from edge_helpers import client_model, digits, torch_sgd

from mobile_client.batching import batch_order
from mobile_client.errors import ManifestError
from mobile_client.runtime import EdgeClient

STEPS, BS, SEED, LR = 5, 16, 2, 0.1  # 40 examples: batches of 16, 16, 8, then a new pass


@pytest.mark.parametrize("head_only", [False, True], ids=["full", "head_only"])
@pytest.mark.parametrize("cid", ["c00", "c01"])
def test_bound_steps_equal_plain_steps_and_torch_sgd(
    mlp_export: tuple[Path, Path], cid: str, head_only: bool
) -> None:
    run_dir, bundle = mlp_export
    fast, plain = EdgeClient(bundle, cid), EdgeClient(bundle, cid, io_binding=False)
    assert fast.io_binding and not plain.io_binding
    _, x, ys = digits(40, fast.entry.tasks, "train")
    before = {k: v.copy() for k, v in fast.base_state().items()}
    kw = {"batch_size": BS, "steps": STEPS, "lr": LR, "seed": SEED, "head_only": head_only}
    a, b = fast.train(x, ys, **kw), plain.train(x, ys, **kw)
    assert set(a.state) == set(b.state) == set(before)
    for k in a.state:
        assert a.state[k].shape == before[k].shape and a.state[k].dtype == before[k].dtype, k
        np.testing.assert_allclose(a.state[k], b.state[k], rtol=0, atol=1e-6, err_msg=k)
    assert a.metrics["steps"] == b.metrics["steps"] == STEPS
    assert abs(a.metrics["loss"] - b.metrics["loss"]) < 1e-6
    moved = [k for k in a.state if not np.array_equal(a.state[k], before[k])]
    assert moved and all(k.startswith("heads.") for k in moved) == head_only
    # the bound buffers are onnxruntime's own: the client's arrays did not move
    for k, v in fast.base_state().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    kinds = {t: fast.head(t).kind for t in fast.entry.tasks}
    batches = list(batch_order(40, BS, 1, STEPS, SEED))
    want = torch_sgd(client_model(run_dir, cid), x, ys, kinds, batches, LR, head_only)
    for k in want:
        np.testing.assert_allclose(a.state[k], want[k], rtol=0, atol=1e-5, err_msg=k)


def test_bound_training_repeats_from_the_same_start(mlp_export: tuple[Path, Path]) -> None:
    """Two fits in a row each start from the bundle's weights (fresh bound buffers)."""
    _, bundle = mlp_export
    ec = EdgeClient(bundle, "c00")
    _, x, ys = digits(40, ec.entry.tasks, "train")
    first = ec.train(x, ys, batch_size=BS, steps=3, lr=LR).state
    second = ec.train(x, ys, batch_size=BS, steps=3, lr=LR).state
    for k in first:
        np.testing.assert_array_equal(first[k], second[k], err_msg=k)


def test_bound_step_refuses_outputs_of_the_wrong_shape(
    mlp_export: tuple[Path, Path], tmp_path: Path
) -> None:
    """A weights file whose array does not fit the graph's output: a ManifestError naming
    the graph, not a silent write past a buffer."""
    import shutil

    _, bundle = mlp_export
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    ec = EdgeClient(copy, "c00", verify=False)
    step = ec.train_step().file
    key = next(iter(step.weights.values()))
    state = dict(ec.base_state())
    state[key] = np.zeros((*state[key].shape, 2), state[key].dtype)
    ec._weights = state  # a corrupt weights file, loaded past the manifest's checks
    _, x, ys = digits(16, ec.entry.tasks, "train")
    with pytest.raises(ManifestError, match=json.dumps(step.path)[1:-1]):
        ec.train(x, ys, batch_size=16, steps=1, lr=LR)
