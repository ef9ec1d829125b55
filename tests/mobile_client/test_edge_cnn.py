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


def test_zero_d_buffers_stay_zero_d_from_export_to_aggregation(exported, tmp_path) -> None:
    """Issue 16 #2: export kept 0-d buffers 0-d? The counter the server sends, the device
    trains one step on and sends back is accepted by the server's reader and aggregate."""
    from fmtl_lightning.aggregation import ClientUpdate, aggregate
    from fmtl_lightning.checkpoint import completed_rounds, read_round
    from fmtl_lightning.roles import ModelSpec, WidthSpec
    from fmtl_lightning.slicing import slice_state
    from mobile_client.update import UpdateMeta, read_update, state_hash, write_update

    run_dir, bundle = exported
    spec = ModelSpec.from_json((run_dir / "spec.json").read_text())
    counters = spec.keys_of_kind("counter")
    assert counters and set(counters) <= set(spec.shared_keys())
    ec = EdgeClient(bundle)
    # the bundle's weights have exactly the shapes its manifest declares (0-d included)
    declared = {t.name: tuple(t.shape) for t in ec.entry.weights.outputs}
    base = ec.base_state()
    assert {k: v.shape for k, v in base.items()} == declared
    assert all(base[k].shape == () for k in counters)
    assert set(ec.shared_keys) == set(spec.shared_keys())

    # server -> device: the global shared arrays at the client's width
    last = completed_rounds(run_dir)[-1]
    g, _, _, _ = read_round(run_dir, last)
    ws = WidthSpec(ec.entry.width, "heterofl", last)
    sent = slice_state(g, spec, ws)
    assert all(sent[k].shape == () for k in counters)
    _, x, ys = digits(40, ec.entry.tasks, "train")
    res = ec.train(x, ys, batch_size=16, steps=1, lr=0.1, seed=0, start_from=sent)
    for k in counters:  # one training step: the counter the server sent, plus one
        assert res.shared[k].shape == () and res.shared[k].dtype == np.int64
        assert int(res.shared[k]) == int(sent[k]) + 1

    # device -> server: the update file, read and aggregated as any client's
    up = tmp_path / "update.safetensors"
    meta = UpdateMeta("c00", last + 1, ws.width, res.num_examples, state_hash(sent), res.metrics)
    write_update(up, res.shared, meta)
    arrays, _ = read_update(up, expected_base_hash=state_hash(sent))
    new = aggregate(g, [ClientUpdate("c00", arrays, res.num_examples, ws)], spec)
    for k in counters:
        assert type(new[k]) is np.ndarray and new[k].shape == ()
        assert int(new[k]) == int(sent[k]) + 1

    # over Flower the arrays keep their shapes too
    pytest.importorskip("flwr")
    from mobile_client.flower_app import from_record, to_record

    back = from_record(to_record(res.shared))
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in res.shared.items()}
    assert state_hash(back) == state_hash(res.shared)


def test_state_hash_tells_a_zero_d_array_from_a_one_element_vector() -> None:
    from mobile_client.update import state_hash

    n = np.array(3, dtype=np.int64)
    assert state_hash({"n": n}) != state_hash({"n": n.reshape(1)})
    assert state_hash({"n": n}) == state_hash({"n": np.array(3, dtype=">i8")})  # byte order


def test_a_client_entry_without_shared_keys_is_refused_not_guessed(exported, tmp_path) -> None:
    """The device never guesses roles from key names: the manifest must say what travels."""
    import json

    from mobile_client.errors import ManifestError
    from mobile_client.manifest import load_manifest

    _, bundle = exported
    d = json.loads((bundle / "manifest.json").read_text())
    assert d["clients"][0]["shared_keys"]  # written by export, from the spec
    del d["clients"][0]["shared_keys"]
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=r"clients\[0\]\.shared_keys' is missing"):
        load_manifest(tmp_path)
