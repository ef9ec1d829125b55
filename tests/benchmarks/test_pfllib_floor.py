"""A learning-signal floor on PFLlib's protocol, and the PFLlib benchmark's own arithmetic.

The floor: 4 clients on a PFLlib Dir(0.1) split of 2,000 Fashion-MNIST images (their
partition code, a seeded subset), a narrow FedAvgCNN, 3 rounds. Under label skew a
personalised head must beat one global model; FedPer's pooled test accuracy has to exceed
FedAvg's, and each client's majority-class guess, by more than chance allows on this test
set: the difference of two accuracies on n samples has a standard deviation of at most
sqrt(2 * 0.25 / n) (binomial, worst case p = 0.5), and we ask for 3.09 of those (one-sided
p = 0.001). With n = 502 that is 9.8 points.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("torch")

from benchmarks import pfllib  # noqa: E402
from benchmarks.pfllib_report import table  # noqa: E402
from fmtl_lightning.config import parse_config  # noqa: E402
from fmtl_lightning.simulation import Simulation  # noqa: E402

Z_ONE_SIDED_0001 = 3.09


def chance_margin(n: int, z: float = Z_ONE_SIDED_0001) -> float:
    """``z`` standard deviations of a difference of two accuracies on ``n`` samples."""
    return z * math.sqrt(2 * 0.25 / n)


@pytest.fixture(scope="module")
def fed():
    return pfllib.build_federation("dir", num_clients=4, max_samples=2000)


def _pooled_final(fed, method: str, tmp_path) -> float:
    import torch

    torch.set_num_threads(1)
    raw = pfllib.run_config(method, 3, 4)
    raw["model"]["hidden"] = [8, 16, 32]  # narrow: seconds, not minutes
    raw["optimizer"]["lr"] = 0.05  # 3 rounds instead of hundreds
    sim = Simulation(parse_config(raw), tmp_path / method, progress=False, federation=fed)
    sim.run()
    n_test = {c.cid: int(c.x_test.shape[0]) for c in fed.clients}
    curve = pfllib.pooled_curve(sim.history, n_test)
    assert [r for r, _ in curve] == [1, 2, 3]
    return curve[-1][1]


def test_fedper_beats_fedavg_and_majority_guess_beyond_chance(fed, tmp_path):
    n = sum(int(c.x_test.shape[0]) for c in fed.clients)
    assert n == 502 and len(fed.clients) == 4
    margin = chance_margin(n)
    assert round(margin, 4) == 0.0975
    majority = (
        sum(
            int((c.y_test[pfllib.TASK] == np.bincount(c.y_train[pfllib.TASK]).argmax()).sum())
            for c in fed.clients
        )
        / n
    )
    fedper = _pooled_final(fed, "fedper", tmp_path)
    fedavg = _pooled_final(fed, "fedavg", tmp_path)
    assert fedper - fedavg > margin, (fedper, fedavg, margin)
    assert fedper - majority > margin, (fedper, majority, margin)


def test_pooled_curve_weights_clients_by_test_size():
    rows = [
        {"round": 1, "client": "a", "acc": 0.5},  # 2 of 4
        {"round": 1, "client": "b", "acc": 1.0},  # 12 of 12
        {"round": 2, "client": "a", "acc": 0.75},  # 3 of 4
        {"round": 2, "client": "b", "acc": 0.916667},  # 11 of 12 (rounded in metrics.csv)
    ]
    curve = pfllib.pooled_curve(rows, {"a": 4, "b": 12})
    assert curve == [[1, 14 / 16], [2, 14 / 16]]  # not the unweighted 0.75 / 0.83


def test_report_table_puts_theirs_next_to_ours():
    res = {
        "split": "dir",
        "method": "fedper",
        "rounds": 5,
        "curve": [[1, 0.9], [2, 0.95]],
        "best": 0.9750,
        "best_round": 4,
        "final": 0.9701,
        "round_s": [60.0, 62.0],
        "wall": 330.0,
    }
    text = table([res, {**res, "method": "local", "split": "pat"}])
    assert "| Dir(0.1) (practical) | FedPer | 97.44 ± 0.06 | 97.50 (r4) | 97.01 | +0.06 |" in text
    assert "| 5 (PFLlib: 2000) | 5.5 | 61 |" in text
    assert "| pathological (2 classes) | Local | n/a | 97.50 (r4) | 97.01 |  |" in text


def test_cli_modes_and_refusals():
    assert pfllib.parse_args([]).mode == "default"
    assert pfllib.parse_args([]).rounds == pfllib.DEFAULT_ROUNDS
    full = pfllib.parse_args(["--full"])
    assert (full.mode, full.rounds) == ("full", 2000)
    assert pfllib.parse_args(["--clients", "4", "--rounds", "2"]).mode == "smoke"
    with pytest.raises(SystemExit, match="--methods"):
        pfllib.parse_args(["--methods", "fedavg,fedprox"])
    cfg = parse_config(pfllib.run_config("fedbabu", 7, 20))
    assert cfg.federation.eval_every == 7 and cfg.algorithm.finetune_epochs == 10
    assert (cfg.federation.batch_size, cfg.optimizer.lr, cfg.optimizer.momentum) == (10, 0.005, 0)
    assert cfg.model.family == "fedavgcnn" and cfg.model.norm == "none"
