"""The multi-task gain benchmark's parts: large matched test sets, paired intervals, report."""

from __future__ import annotations

import json
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
    assert d == 2.0 and (lo, hi) == pytest.approx((2 - half, 2 + half), abs=1e-3)
    assert math.isnan(acc_gain.paired([1.0], [0.0])[1])


def test_paired_interval_at_15_seeds_is_scipys_one_sample_t_interval():
    from scipy.stats import ttest_1samp

    rng = np.random.default_rng(0)
    a, b = rng.normal(0.8, 0.05, 15), rng.normal(0.75, 0.05, 15)
    d, lo, hi = acc_gain.paired(a, b)
    ci = ttest_1samp(a - b, 0.0).confidence_interval(0.95)
    assert d == pytest.approx(float(np.mean(a - b)))
    assert (lo, hi) == pytest.approx((ci.low, ci.high), abs=1e-12)
    half = 2.1448 * np.std(a - b, ddof=1) / math.sqrt(15)  # t(0.975, 14), from a table
    assert (hi - lo) / 2 == pytest.approx(half, rel=1e-4)


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
    assert "| fedavg | 3 | 70.0 ± 2.0 | 41.0 ± 1.0 |" in text


def test_report_shows_every_personalised_method_and_pairs_only_shared_seeds():
    res = [
        {"model": "mlp", "seed": s, "method": m, "mean": v + 0.01 * s, "worst": v - 0.2}
        for s in (0, 1, 2)
        for m, v in (("local", 0.80), ("fedavg", 0.78), ("fedper", 0.82), ("fedavg_ft", 0.84))
    ]
    res.append({"model": "mlp", "seed": 0, "method": "fedrep", "mean": 0.99, "worst": 0.9})
    data = {"mode": "default", "seeds": [0, 1, 2], "test_size": 500, "rounds": 80, "wall": 60.0}
    text = acc_gain.report(res, data)
    assert "best personalised method = **fedrep**" in text  # one seed at 0.99: highest mean
    assert "fedrep − local" not in text  # its one seed cannot pair with three
    assert "| fedrep | 1 | 99.0 | 90.0 |" in text  # each method's row counts its seeds
    assert "| fedavg_ft − local | +4.0 [+4.0, +4.0] (yes) | +4.0 [+4.0, +4.0] (yes) |" in text
    assert "| fedper − fedavg | +4.0 [+4.0, +4.0] (yes) | +4.0 [+4.0, +4.0] (yes) |" in text


def test_a_later_invocation_adds_its_runs_and_replaces_only_its_own(tmp_path):
    out = tmp_path / "gain.json"
    row = lambda m, s, v: {"model": "mlp", "seed": s, "method": m, "mean": v}  # noqa: E731
    first = {"mode": "default", "test_size": 500, "rounds": 80, "seeds": [0, 1], "wall": 10.0,
             "command": "A", "results": [row("local", 0, 0.1), row("fedper", 0, 0.2)]}  # fmt: skip
    assert acc_gain.save(out, first) == {**first, "commands": ["A"]}  # nothing there yet
    second = {**first, "seeds": [0, 2], "wall": 5.0, "command": "B",
              "results": [row("fedper", 0, 0.3), row("fedper", 2, 0.4)]}  # fmt: skip
    got = acc_gain.save(out, second)
    assert json.loads(out.read_text()) == got
    assert [(r["method"], r["seed"], r["mean"]) for r in got["results"]] == [
        ("local", 0, 0.1),
        ("fedper", 0, 0.3),
        ("fedper", 2, 0.4),
    ]
    assert (got["seeds"], got["wall"], got["commands"]) == ([0, 1, 2], 15.0, ["A", "B"])
    other = {**second, "test_size": 100}  # other settings: replaces the file's runs
    assert acc_gain.save(out, other) == {**other, "commands": ["B"]}
    assert json.loads(out.read_text())["results"] == other["results"]


def test_the_baselines_worst_client_is_compared_on_the_same_client():
    # seed 0: local serves c1 worst (0.5); fedper's own worst is c0 (0.6), its c1 is 0.9
    clients = {
        (0, "local"): {"c0": 0.7, "c1": 0.5},
        (0, "fedavg"): {"c0": 0.6, "c1": 0.8},
        (0, "fedper"): {"c0": 0.6, "c1": 0.9},
        (1, "local"): {"c0": 0.4, "c1": 0.8},
        (1, "fedavg"): {"c0": 0.7, "c1": 0.7},
        (1, "fedper"): {"c0": 0.6, "c1": 0.7},
    }
    res = [
        {"model": "mlp", "seed": s, "method": m, "clients": c,
         "mean": sum(c.values()) / 2, "worst": min(c.values())}
        for (s, m), c in clients.items()
    ]  # fmt: skip
    assert np.allclose(acc_gain._on_bases_worst(res, "mlp", "fedper", "local"), [0.4, 0.2])
    # fedavg's worst: c0 at seed 0 (0.6 vs fedper 0.6), a tie at seed 1 -> the first, c0
    assert np.allclose(acc_gain._on_bases_worst(res, "mlp", "fedper", "fedavg"), [0.0, -0.1])
    data = {"mode": "default", "seeds": [0, 1], "test_size": 500, "rounds": 80, "wall": 60.0}
    text = acc_gain.report(res, data)
    # means +15, +5 -> +10; own worsts 0.6, 0.6 vs 0.5, 0.4 -> +15; same client +40, +20 -> +30
    row = next(line for line in text.splitlines() if line.startswith("| fedper − local |"))
    assert [c.split(" [")[0] for c in row.split(" | ")[1:]] == ["+10.0", "+15.0", "+30.0"]
    assert "baseline's worst client |" in text
