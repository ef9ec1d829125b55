"""Small versions of the accuracy benchmark (benchmarks/accuracy.py) with learning floors.

Each test runs a few-client, few-round federation on scikit-learn's 8x8 digits (no
download) and checks accuracy against a floor derived from the chance level only:
``chance + 0.5 * (1 - chance)`` (10 classes: 0.55, 2 classes: 0.75), i.e. at least half
of the way from guessing to perfect. IID partitions, so chance is 1/classes per client.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from benchmarks.acc_common import accuracy, global_model_logits, masked_accuracy  # noqa: E402
from benchmarks.acc_heterofl import (  # noqa: E402
    build_mnist_federation,
    evaluate_global,
    heterofl_config,
    stats_images,
)
from fmtl_lightning.config import parse_config  # noqa: E402
from fmtl_lightning.simulation import Simulation  # noqa: E402
from fmtl_lightning.tasks import get_task  # noqa: E402


def floor(num_classes: int) -> float:
    chance = 1.0 / num_classes
    return chance + 0.5 * (1.0 - chance)


def _run(cfg: dict, tmp_path, fed=None) -> Simulation:
    import torch

    torch.set_num_threads(1)
    sim = Simulation(parse_config(cfg), tmp_path / "run", progress=False, federation=fed)
    sim.run()
    return sim


def test_fedper_multitask_beats_chance_on_every_client(tmp_path):
    cfg = {
        "name": "floor-fedper",
        "seed": 0,
        "data": {"samples_per_client": 200, "test_fraction": 0.25, "partition": {"kind": "iid"}},
        "model": {"family": "mlp", "hidden": [128, 64], "norm": "group"},
        "clients": [
            {"count": 2, "tasks": ["digits/digit"], "width": 1.0},
            {"count": 2, "tasks": ["digits/parity"], "width": 0.5},
            {"count": 2, "tasks": ["digits/ge5"], "width": 0.25},
        ],
        "algorithm": {"name": "fedper"},
        "federation": {"rounds": 12, "local_epochs": 2, "batch_size": 32, "eval_every": 12},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "compare_local": False,
    }
    sim = _run(cfg, tmp_path)
    last = [r for r in sim.history if r["round"] == 12]
    assert len(last) == 6
    for r in last:
        n = get_task(r["task"]).num_outputs
        assert r["acc"] >= floor(n), (r["client"], r["task"], r["acc"], floor(n))


def _digits_fed(partition: str, widths: list[float], per_client: int, seed: int = 0):
    return build_mnist_federation(
        partition, widths, per_client, seed, domain="digits", task="digits/digit"
    )


def test_width_quarter_submodel_of_width_mix_is_far_above_chance(tmp_path):
    widths = [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    fed, ev = _digits_fed("iid", widths, 200)
    raw = heterofl_config(
        "floor-mix",
        len(widths),
        10,
        dynamic=False,
        client_widths=widths,
        hidden=(32, 64),
        local_epochs=2,
        batch_size=16,
        lr=0.05,
        task="digits/digit",
    )
    sim = _run(raw, tmp_path, fed)
    stats_x = stats_images(fed, 600, 0)
    for w in (1.0, 0.25):
        logits = global_model_logits(
            sim.global_state,
            sim.spec,
            sim.engine.plan.model.cfg,
            sim.engine.plan.layout.model_tasks,
            w,
            ev["x_test"],
            stats_x=stats_x,
        )
        assert logits.shape == (ev["x_test"].shape[0], 10)
        acc = accuracy(logits, ev["y_test"])
        assert acc >= floor(10), (w, acc)


@pytest.mark.parametrize("partition", ["iid", "shards"])
def test_heterofl_style_global_model_far_above_chance(tmp_path, partition):
    # dynamic widths 1, 1/2, 1/4 with static BN + scaler + masked CE (HeteroFL's recipe).
    # IID: the full-width global model on the whole test set is far above 10-way chance.
    # 2-class shards: its masked local accuracy (HeteroFL's "local") is far above 2-way
    # chance on the pooled client test sets.
    n = 8
    fed, ev = _digits_fed(partition, [1.0] * n, 170)
    raw = heterofl_config(
        f"floor-heterofl-{partition}",
        n,
        10,
        dynamic=True,
        levels=(1.0, 0.5, 0.25),
        hidden=(32, 64),
        local_epochs=2,
        batch_size=16,
        lr=0.05,
        task="digits/digit",
    )
    sim = _run(raw, tmp_path, fed)
    assert {sim.engine.width_of(i, r).width for i in range(n) for r in range(10)} == {
        1.0,
        0.5,
        0.25,
    }
    for c, mask in zip(fed.clients, ev["client_mask"], strict=True):
        assert bool(np.all(mask == c.label_masks["digits/digit"].numpy()))
        if partition == "shards":
            assert 1 <= int(mask.sum()) <= 2
    stats_x = stats_images(fed, 600, 0)
    g, loc = evaluate_global(sim, ev, stats_x)
    if partition == "iid":
        assert g >= floor(10), g
    else:
        assert loc >= floor(2), loc
    # masking to the client's own classes never lowers its accuracy
    logits = global_model_logits(
        sim.global_state,
        sim.spec,
        sim.engine.plan.model.cfg,
        sim.engine.plan.layout.model_tasks,
        1.0,
        ev["x_test"],
        stats_x=stats_x,
    )
    for te, mask in zip(ev["client_test"], ev["client_mask"], strict=True):
        y = ev["y_test"][te]
        assert masked_accuracy(logits[te], y, mask) >= accuracy(logits[te], y)


def test_part1_job_and_report_smoke():
    from benchmarks import acc_part1, acc_part1_report

    P = dict(acc_part1.PARAMS["quick"], rounds=1, steps=2, per_task=(1, 1, 1, 1, 1, 1))
    res = [
        acc_part1.run_job(
            {"params": P, "partition": "dirichlet", "widths": "mixed", "seed": 0, "method": m}
        )
        for m in ("local", "fedrep", "ditto-1")
    ]
    for r in res:
        assert 0.0 <= r["worst"] <= r["mean"] <= 1.0
        assert len(r["clients"]) == 6 and r["curve"][-1][0] == 1
    assert res[2]["steps_per_round"] == 2.0  # Ditto: two fits of steps/2
    text = acc_part1_report.report(res, P, [0], 1.0, "quick")
    assert "### Verdict" in text and "fedrep" in text


def test_sweep_report_pairs_each_seed_with_local_only():
    from benchmarks import acc_part1, acc_part1_report

    acc = {  # (samples, method) -> accuracy per seed 0, 1
        (40, "local"): (0.70, 0.80),
        (40, "fedper"): (0.73, 0.81),
        (400, "local"): (0.90, 0.92),
        (400, "fedper"): (0.90, 0.90),
    }
    results = [
        {
            "samples_per_client": n,
            "method": m,
            "seed": s,
            "mean": acc.get((n, m), (0.5, 0.5))[s],
            "n_train": [n // 2, n // 2 + 2],
        }
        for n in (40, 400)
        for m in acc_part1.SWEEP_METHODS
        for s in (0, 1)
    ]
    text = acc_part1_report.report_sweep(results, acc_part1.PARAMS["default"], 60.0)
    rows = {
        line.split(" |")[0].lstrip("| "): line
        for line in text.splitlines()
        if line.startswith("| 4")
    }
    # paired fedper - local: seed diffs (+3, +1) -> +2.0 ± 1.4 ; (0, -2) -> -1.0 ± 1.4
    assert "| +2.0 ± 1.4 |" in rows["40 (21)"]
    assert "| -1.0 ± 1.4 |" in rows["400 (201)"]
    assert "75.0 ± 7.1" in rows["40 (21)"]  # local's mean ± std over the two seeds
