"""local_fit.fit with a restricted set of keys: the same steps as a hand-run torch SGD on
those parameters, no gradient computed for the others, and their flags restored."""

from __future__ import annotations

import copy

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from fmtl_lightning.local_fit import FitPlan, batch_indices, fit
from fmtl_lightning.models import BackboneConfig, MultiTaskModel
from fmtl_lightning.module import MultiTaskModule, TrainSpec
from fmtl_lightning.tasks import Task


def test_head_only_fit_equals_torch_sgd_on_the_head_and_leaves_the_rest_untouched():
    torch.manual_seed(0)
    model = MultiTaskModel(BackboneConfig("fedavgcnn", norm="none", hidden=(4, 8, 16)), {"t": 3})
    ref = copy.deepcopy(model)
    module = MultiTaskModule(model, [Task("t", 3, "multiclass")], lr=0.1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(23, 1, 28, 28, generator=g), torch.randint(0, 3, (23,), generator=g)
    head = frozenset(k for k, _ in model.named_parameters() if k.startswith("heads."))
    plan = FitPlan(batch_size=10, epochs=1)
    fabric = L.Fabric(accelerator="cpu", devices=1)
    steps, _ = fit(fabric, module, x, {"t": y}, plan, seed=4, train=TrainSpec(keys=head))
    assert steps == 3  # 10 + 10 + 3
    opt = torch.optim.SGD([p for k, p in ref.named_parameters() if k in head], lr=0.1)
    for idx in batch_indices(23, plan, 4):
        opt.zero_grad()
        F.cross_entropy(ref(x[idx])["t"], y[idx]).backward()
        opt.step()
    got, want = model.state_dict(), ref.state_dict()
    for k in want:
        np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), rtol=0, atol=1e-7, err_msg=k)
    named = dict(model.named_parameters())
    assert all(p.requires_grad for p in named.values())  # restored after the fit
    assert all(named[k].grad is None for k in named if k not in head)  # never computed
    assert all(named[k].grad is not None for k in head)
