"""The multi-task gain benchmark's parts: large matched test sets, paired intervals, report."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import acc_gain  # noqa: E402
from fmtl_lightning.config import parse_config  # noqa: E402
from fmtl_lightning.data import load_dataset  # noqa: E402
from fmtl_lightning.fed_data import build_federation  # noqa: E402


def test_matched_test_sets_follow_each_clients_training_mix():
    cfg = {
        "seed": 3,
        "data": {"samples_per_client": 60, "partition": {"kind": "dirichlet", "alpha": 0.3}},
        "model": {"family": "mlp", "hidden": [8], "norm": "none"},
        "clients": [
            {"count": 2, "tasks": ["mnist/digit"]},
            {"count": 1, "tasks": ["fashion/item", "fashion/group"]},
        ],
    }
    fed = build_federation(parse_config(cfg))
    big = acc_gain.matched_test_sets(fed, 120, seed=3)
    for old, new in zip(fed.clients, big.clients, strict=True):
        train = load_dataset(old.spec.domain, "train")
        mix = np.bincount(train.labels[old.spec.train_idx], minlength=10)
        assert new.x_test.shape == (120, 1, 28, 28)
        assert torch.equal(new.x_train, old.x_train)  # training data unchanged
        digits = new.y_test[new.tasks[0]].numpy()  # digit / item: the label itself
        got = np.bincount(digits, minlength=10)
        np.testing.assert_allclose(got, mix * 120 / mix.sum(), atol=1)
        if "fashion/group" in new.tasks:  # the other task's targets come from the same labels
            groups = new.y_test["fashion/group"].numpy()
            assert np.array_equal(groups, np.array([0, 1, 0, 0, 0, 2, 0, 2, 3, 2])[digits])
        mean, std = train.mean, train.std  # normalised like training: pixel 0 -> -mean/std
        assert math.isclose(float(new.x_test.min()), -mean / std, rel_tol=1e-5)


def test_paired_interval_by_hand():
    # differences 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.303 -> 2 ± 4.303 / sqrt(3)
    d, lo, hi = acc_gain.paired([2.0, 3.0, 4.0], [1.0, 1.0, 1.0])
    half = 4.303 / math.sqrt(3)
    assert (d, round(lo, 6), round(hi, 6)) == (2.0, round(2 - half, 6), round(2 + half, 6))
    assert math.isnan(acc_gain.paired([1.0], [0.0])[1])


def test_report_picks_the_best_personalised_method_and_says_if_it_clears_the_ci():
    res = []
    for seed, base in enumerate((0.80, 0.82, 0.78)):
        for m, add in (("local", 0.0), ("fedavg", -0.1), ("fedper", 0.03), ("fedrep", 0.01)):
            res.append(
                {
                    "model": "mlp",
                    "seed": seed,
                    "method": m,
                    "mean": base + add,
                    "worst": 0.5 + add + 0.01 * seed,
                }
            )
    data = {"mode": "default", "seeds": [0, 1, 2], "test_size": 500, "rounds": 80, "wall": 60.0}
    text = acc_gain.report(res, data)
    assert "best personalised method = **fedper**" in text
    assert "| fedper − local | +3.0 [+3.0, +3.0] (yes) | +3.0 [+3.0, +3.0] (yes) |" in text
    assert "| fedavg | 70.0 ± 2.0 | 41.0 ± 1.0 |" in text
