"""SGD with momentum, weight decay and nesterov in the step graphs: several steps in
onnxruntime against ``torch.optim.SGD`` with the same settings (parameters, buffers and
the momentum buffers the graph carries), and the refusal of what a graph cannot express."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_helpers import KINDS, make_model, random_batch

from export.bundle import RunExportError
from export.parity import head_step_parity, train_step_parity
from export.step_optimizer import StepOptimizer, step_optimizer
from export.trainstep import export_head_step, export_train_step

LR = 0.05
SIZES = (8, 5, 16, 3, 8)
OPTS = [StepOptimizer(0.9, 0.0), StepOptimizer(0.9, 0.01), StepOptimizer(0.5, 0.001, True),
        StepOptimizer(0.0, 0.01)]  # fmt: skip
OPT_IDS = ["momentum", "momentum+wd", "nesterov+wd", "wd only"]


@pytest.mark.parametrize(
    ("family", "norm", "opt"),
    [*(("mlp", "none", o) for o in OPTS), ("cnn", "batch", OPTS[2])],
    ids=[*(f"mlp-{i}" for i in OPT_IDS), f"cnn-batch-{OPT_IDS[2]}"],
)
def test_steps_match_torch_sgd(tmp_path, family: str, norm: str, opt: StepOptimizer) -> None:
    model = make_model(family, norm, 0.25)
    info = export_train_step(
        model, KINDS, tmp_path / "step.onnx", torch.zeros(1, 1, 28, 28), 18, opt
    )
    assert info.optimizer == opt.to_dict()
    params = [k for k, _ in model.named_parameters()]
    assert list(info.momentum_inputs.values()) == (params if opt.momentum else [])
    names = [i.name for i in info.inputs]
    assert names[: len(params)] == list(info.param_inputs)
    if opt.momentum:
        m0 = len(params) + len(info.buffer_inputs)
        assert names[m0 : m0 + len(params)] == list(info.momentum_inputs)
        assert [o.name for o in info.outputs][-len(params) :] == list(info.momentum_outputs)
    batches = [random_batch(b, seed) for seed, b in enumerate(SIZES)]
    res = train_step_parity(model, info, batches, LR)
    moms = [k for k in res.max_abs if k.startswith("momentum:")]
    assert len(moms) == (len(params) if opt.momentum else 0)
    assert res.worst <= 1e-5, sorted(res.max_abs.items(), key=lambda kv: -kv[1])[:3]
    np.testing.assert_allclose(res.ort_losses, res.torch_losses, rtol=1e-5)


@pytest.mark.parametrize("opt", OPTS[1:3], ids=OPT_IDS[1:3])
def test_head_step_matches_torch_sgd(tmp_path, opt: StepOptimizer) -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(12, 3)
    info = export_head_step(head, "multilabel", tmp_path / "hs.onnx", 12, 18, opt)
    assert [i.name for i in info.inputs] == ["p_weight", "p_bias", "m_weight", "m_bias",
                                             "features", "y", "lr"]  # fmt: skip
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(b, 12, generator=g), torch.randint(0, 2, (b, 3), generator=g).float())
               for b in SIZES]  # fmt: skip
    res = head_step_parity(head, info, batches, LR)
    assert {"momentum:weight", "momentum:bias"} <= set(res.max_abs)
    assert res.worst <= 1e-6, res.max_abs


def test_heads_outside_the_loss_are_not_decayed(tmp_path) -> None:
    """A head whose task the step does not train has no gradient: torch's SGD skips it
    (no weight decay, no momentum), and so does the graph."""
    model = make_model("mlp", "none", 0.5)
    opt = StepOptimizer(0.9, 0.1)
    info = export_train_step(model, {"mnist/digit": "multiclass"}, tmp_path / "s.onnx",
                             torch.zeros(1, 1, 28, 28), 18, opt)  # fmt: skip
    assert not any(k.startswith("heads.mnist__attrs") for k in info.momentum_inputs.values())
    batches = [random_batch(b, seed) for seed, b in enumerate(SIZES[:3])]
    res = train_step_parity(model, info, batches, LR)
    assert res.max_abs["heads.mnist__attrs.weight"] == 0.0
    assert res.worst <= 1e-5, sorted(res.max_abs.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: torch.optim.Adam(p), "trains with Adam; the exported step graph expresses SGD"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1), "dampening 0.1"),
        (lambda p: torch.optim.SGD(p, lr=0.1, maximize=True), "maximize True"),
        (
            lambda p: torch.optim.SGD(
                [{"params": p[:1], "momentum": 0.9}, {"params": p[1:]}], lr=0.1
            ),
            "param groups differ",
        ),
    ],
)
def test_refused_at_export(make, match: str) -> None:
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(RunExportError, match=match):
        step_optimizer(make(params), "client c00")
    ok = step_optimizer(torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4), "c")
    assert ok == StepOptimizer(0.9, 1e-4, False)


def test_export_model_takes_the_models_optimizer(tmp_path) -> None:
    """``export_model(optimizer=...)``: its SGD settings go into every step graph and the
    manifest; an optimizer a graph cannot express is refused before anything is written."""
    from export.run_export import export_model
    from mobile_client.manifest import load_manifest

    model = make_model("mlp", "none", 0.5)
    norm = {"mean": 0.1, "std": 0.3, "input_shape": [1, 28, 28]}
    with pytest.raises(RunExportError, match="client c07 trains with Adam"):
        export_model(model, KINDS, tmp_path / "a", normalisation=norm, client="c07",
                     optimizer=torch.optim.Adam(model.parameters()))  # fmt: skip
    assert not (tmp_path / "a").exists()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    m = load_manifest(export_model(model, KINDS, tmp_path / "b", normalisation=norm, optimizer=sgd))
    want = {"momentum": 0.9, "weight_decay": 1e-3, "nesterov": 0.0}
    steps = [m.widths[0].train_steps[0].file, *(h.head_step for h in m.heads)]
    for f in steps:
        assert f.optimizer == want and set(f.momentum_inputs.values()) <= set(f.weights.values())
    assert set(steps[0].momentum_inputs.values()) == {k for k, _ in model.named_parameters()}
