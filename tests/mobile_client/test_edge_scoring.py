"""The edge node scores weights other than its bundle's: EdgeScorer against torch.

The bundle's inference graphs have the exported weights baked in; the scorer replaces
them (onnxruntime ``add_initializer``) with a different state, and its logits,
accuracy and loss must be torch's on the same weights and inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
from edge_helpers import client_model, digits

from mobile_client.edge_scoring import EdgeScorer
from mobile_client.errors import InputError, ManifestError
from mobile_client.onnx_initializers import read_initializers
from mobile_client.runtime import EdgeClient


def _moved(state: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, 0.3, v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v
            for k, v in state.items()}  # fmt: skip


def test_initializers_read_without_onnx_equal_onnx_numpy_helper(mlp_export) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    _, bundle = mlp_export
    for f in sorted(bundle.glob("*.onnx")):
        ours = read_initializers(f)
        ref = {i.name: numpy_helper.to_array(i) for i in onnx.load(f).graph.initializer
               if i.data_type == 1}  # fmt: skip
        assert ours.keys() == ref.keys(), f
        for k in ref:
            assert np.array_equal(ours[k], ref[k]) and ours[k].dtype == np.float32, (f, k)


def test_scorer_with_new_weights_equals_torch(mlp_export) -> None:
    import torch

    from fmtl_lightning.models import load_arrays

    run_dir, bundle = mlp_export
    client = EdgeClient(bundle, "c00")
    scorer = EdgeScorer(client)
    state = _moved(client.base_state(), 1)  # not the weights baked into the graphs
    model = client_model(run_dir, "c00")
    load_arrays(model, state)
    _, x, ys = digits(60, ("digits/digit",))
    with torch.no_grad():
        ref = model(torch.from_numpy(x))["digits/digit"]
    logits = scorer.logits(state, x)["digits/digit"]
    np.testing.assert_allclose(logits, ref.numpy(), rtol=0, atol=1e-5)
    y = ys["digits/digit"]
    m = scorer.score(state, x, ys)
    assert m["acc/digits/digit"] == float((ref.argmax(1).numpy() == y).mean())
    loss = torch.nn.functional.cross_entropy(ref, torch.from_numpy(y).long()).item()
    assert m["loss/digits/digit"] == pytest.approx(loss, abs=1e-6)
    assert m["test-loss"] == m["loss/digits/digit"]
    # the baked weights are not what it scored: the bundle's own state scores otherwise
    base = scorer.logits(client.base_state(), x)["digits/digit"]
    assert not np.allclose(base, logits, atol=1e-3)
    np.testing.assert_allclose(base, client.predict("digits/digit", x), rtol=0, atol=1e-6)


def test_scorer_refuses_a_missing_key_and_a_non_multiclass_task(mlp_export) -> None:
    _, bundle = mlp_export
    client = EdgeClient(bundle, "c00")
    state = client.base_state()
    key = next(iter(state))
    _, x, ys = digits(8, ("digits/digit",))
    with pytest.raises(InputError, match=key.replace(".", r"\.")):
        EdgeScorer(client).score({k: v for k, v in state.items() if k != key}, x, ys)
    c01 = EdgeClient(bundle, "c01")
    kinds = {t: c01.head(t).kind for t in c01.entry.tasks}
    other = [t for t, k in kinds.items() if k != "multiclass"]
    if other:
        _, x1, ys1 = digits(8, tuple(kinds))
        with pytest.raises(InputError, match=other[0]):
            EdgeScorer(c01).score(c01.base_state(), x1, ys1)


def test_scorer_refuses_a_graph_whose_weights_were_folded(mlp_export, tmp_path) -> None:
    """A weight no initializer carries (as when the exporter folds it into a constant)
    is named, not scored with the baked value."""
    import shutil

    _, bundle = mlp_export
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    client = EdgeClient(copy, "c00", verify=False)
    f = copy / client.backbone_file().path
    name = next(iter(read_initializers(f)))  # renamed (same length): no key ends with it
    f.write_bytes(f.read_bytes().replace(name.encode(), name.replace(".", "_").encode()))
    assert name.replace(".", "_") in read_initializers(f)
    with pytest.raises(ManifestError, match="folded"):
        EdgeScorer(client)


def test_edge_node_answers_evaluate_with_torchs_accuracy_of_the_weights_sent(
    mlp_export, tmp_path, monkeypatch
) -> None:
    """The edge node's evaluate handler: the shared arrays sent + its own heads, on its
    test split, give torch's accuracy of the same weights; the reply carries them."""
    import torch
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fmtl_lightning.deploy.edge_eval import edge_evaluate
    from fmtl_lightning.models import load_arrays
    from mobile_client.flower_app import ARRAYS, CONFIG, METRICS, TrainInstructions, to_record
    from mobile_client.update import state_hash

    for name in ("_run_id", "_task_id", "_node_id"):  # as Flower sets them in a run
        monkeypatch.setattr(TaskIdentity, name, 1, raising=False)
    run_dir, bundle = mlp_export
    client = EdgeClient(bundle, "c00")
    sent = {k: v for k, v in _moved(client.base_state(), 2).items() if k in client.shared_keys}
    _, x, ys = digits(50, ("digits/digit",))
    data = tmp_path / "c00.npz"
    np.savez(data, x=x, y__digits__digit=ys["digits/digit"], x_test=x,
             y_test__digits__digit=ys["digits/digit"])  # fmt: skip
    ins = TrainInstructions(round=3, round_idx=2, client_id="c00", client_idx=0, width=1.0,
                            slicing="heterofl", base_hash=state_hash(sent), epochs=1,
                            batch_size=8, lr=0.1, steps=-1, batch_seed=0)  # fmt: skip
    msg = Message(RecordDict({ARRAYS: to_record(sent), CONFIG: ins.to_record()}),
                  dst_node_id=1, message_type="evaluate")  # fmt: skip
    nc = {"client-id": "c00", "width": 1.0, "tasks": "digits/digit", "runtime": "edge",
          "bundle": str(bundle), "data": str(data), "state-dir": str(tmp_path / "s")}  # fmt: skip
    reply = edge_evaluate(msg, Context(0, 1, nc, RecordDict(), {}))
    m = reply.content[METRICS]
    model = client_model(run_dir, "c00")
    load_arrays(model, {**client.base_state(), **sent})
    with torch.no_grad():
        pred = model(torch.from_numpy(x))["digits/digit"].argmax(1).numpy()
    assert m["acc/digits/digit"] == float((pred == ys["digits/digit"]).mean())
    assert m["num-examples"] == 50 and reply.content[CONFIG]["note"] == ""
    assert reply.content[CONFIG]["base-hash"] == ins.base_hash
