"""Roles come from the ModelSpec only, never from key-name prefixes (issue 16, defect 3).

Under FedBN the norm parameters are named ``backbone.*`` but stay local: whatever treats
them as shared because of their name is wrong.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import fmtl_lightning.local_fit as local_fit
from fmtl_lightning.config import parse_config
from fmtl_lightning.models import MultiTaskModel
from fmtl_lightning.simulation import Simulation

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("policy", ["fedper", "fedbn"])
def test_fedrep_phases_train_what_the_spec_declares(small_cfg, tmp_path, monkeypatch, policy):
    small_cfg["model"] = {"family": "cnn", "hidden": [4, 8], "norm": "group"}
    small_cfg["algorithm"] = {"name": "fedrep", "policy": policy, "rep_head_epochs": 1}
    small_cfg["federation"]["rounds"] = 1
    sim = Simulation(parse_config(small_cfg), tmp_path / "run", progress=False)
    norms = sim.spec.keys_of_kind("norm")
    assert norms and all(k.startswith("backbone.") for k in norms)  # named like the body

    fits: list[tuple[set[str], set[str]]] = []  # per fit: (stepped, changed) parameters
    real_fit = local_fit.fit  # the one training loop every phase goes through

    def spy(fabric, module, x, y, plan, seed, train, *args, **kw):
        named = dict(module.model.named_parameters())
        stepped = {id(p) for p in module.trainable_parameters(train.keys)}
        before = {k: p.detach().clone() for k, p in named.items()}
        out = real_fit(fabric, module, x, y, plan, seed, train, *args, **kw)
        fits.append(
            (
                {k for k, p in named.items() if id(p) in stepped},
                {k for k, v in before.items() if not np.array_equal(v, named[k].detach())},
            )
        )
        return out

    monkeypatch.setattr(local_fit, "fit", spy)
    sim.run()
    assert len(fits) == 2 * len(sim.fed.clients)  # head phase, body phase per client
    for c, head, body in zip(sim.fed.clients, fits[0::2], fits[1::2], strict=True):
        params = {k for k, _ in sim.pool.module_for(c, c.width).model.named_parameters()}
        # independent of the code under test: the policy's shared kinds, read off the spec
        shared = {k for k in params if sim.spec[k].kind in sim.spec.policy.shared_kinds}
        assert head[0] == params - shared and body[0] == shared, c.cid
        assert head[1] <= head[0] and body[1] <= body[0], c.cid  # nothing else moved
        # FedBN: the norms (named backbone.*) are the client's own and train with its head
        mine, theirs = (head, body) if policy == "fedbn" else (body, head)
        assert set(norms) <= mine[1] and not set(norms) & theirs[0], c.cid


def test_client_keys_are_the_keys_of_the_clients_own_model(small_cfg, tmp_path):
    sim = Simulation(parse_config(small_cfg), tmp_path / "run", progress=False)
    for c in sim.fed.clients:
        model = MultiTaskModel(
            sim.engine.plan.model.cfg, {t: sim.engine.plan.layout.task_outputs[t] for t in c.tasks}
        )
        assert set(sim.pool.client_keys(c)) == set(model.state_dict()), c.cid


def test_no_library_code_decides_a_role_by_key_name():
    pattern = re.compile(r"""startswith\(\s*["'](backbone|heads)\.""")
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for pkg in ("fmtl_lightning", "export", "mobile_client")
        for p in sorted((ROOT / pkg).rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == []
