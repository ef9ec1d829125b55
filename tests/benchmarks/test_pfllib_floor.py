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

import json
import math
import time

import numpy as np
import pytest

pytest.importorskip("torch")

from benchmarks import pfllib  # noqa: E402
from benchmarks.pfllib_report import first_met, goal, last_gain, report, table  # noqa: E402
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
    assert "| met | +5.00 | 5 (PFLlib: 2000) | 5.5 | 61 |" in text  # curve 0.90 -> 0.95
    assert "| pathological (2 classes) | Local | n/a | 97.50 (r4) | 97.01 |  |  |" in text


def test_goal_and_last_gain():
    assert goal("dir", "fedper", 0.9695, 5) == "met"  # 97.44 - 0.5 = 96.94
    assert goal("dir", "fedper", 0.9690, 5) == "short by 0.04"
    assert goal("dir", "fedper", 0.99, 2000) == "rounds > 200"
    assert goal("dir", "fedavg", 0.8580, 5) == "short by 0.05"  # FedAvg: >= theirs, no slack
    assert goal("dir", "fedavg", 0.8590, 5) == "met"
    assert goal("dir", "local", 0.99, 5) == goal("dir", "fedavg_ft", 0.99, 5) == ""
    assert last_gain([[1, 0.5], [2, 0.625]]) == "+12.50" and last_gain([[3, 0.5]]) == ""


def test_headline_takes_pfllibs_best_over_its_list_and_our_kept_model_as_final():
    ditto = [
        {"label": "personal models", "curve": [[1, 0.7], [2, 0.8]], "in_best": True, "final": True},
        {"label": "global model", "curve": [[1, 0.9], [2, 0.6]], "in_best": True, "final": False},
    ]
    assert pfllib.headline("ditto", ditto) == {"best": 0.9, "best_round": 1, "final": 0.8}
    babu = [
        {"label": "init heads", "curve": [[1, 0.3], [2, 0.5]], "in_best": True, "final": False},
        {"label": "whole FT", "curve": [[2, 0.85]], "in_best": True, "final": True},
        {"label": "head FT", "curve": [[2, 0.95]], "in_best": False, "final": False},
    ]
    assert pfllib.headline("fedbabu", babu) == {"best": 0.85, "best_round": 2, "final": 0.85}


def test_cli_modes_and_refusals():
    assert pfllib.parse_args([]).mode == "default"
    assert pfllib.parse_args([]).rounds == pfllib.DEFAULT_ROUNDS
    full = pfllib.parse_args(["--full"])
    assert (full.mode, full.rounds) == ("full", 2000)
    assert pfllib.parse_args(["--clients", "4", "--rounds", "2"]).mode == "smoke"
    assert pfllib.parse_args(["--rounds", "50", "--minutes", "90"]).mode == "long"
    with pytest.raises(SystemExit, match="--minutes"):
        pfllib.parse_args(["--rounds", "50", "--minutes", "0"])
    with pytest.raises(SystemExit, match="--methods"):
        pfllib.parse_args(["--methods", "fedavg,fedprox"])
    cfg = parse_config(pfllib.run_config("fedbabu", 7, 20))
    # scored every round with the init heads; the end fine-tunes run in the benchmark
    assert cfg.federation.eval_every == 1 and cfg.algorithm.finetune_epochs == 0
    f = cfg.federation
    assert (f.batch_size, f.drop_last, cfg.optimizer.lr, cfg.optimizer.momentum) == (
        10,
        True,
        0.005,
        0,
    )
    assert cfg.model.family == "fedavgcnn" and cfg.model.norm == "none"


def _narrow_sim(fed, method: str, tmp_path, rounds: int = 1):
    import torch

    torch.set_num_threads(1)
    raw = pfllib.run_config(method, rounds, 4)
    raw["model"]["hidden"] = [8, 16, 32]
    raw["optimizer"]["lr"] = 0.05
    return Simulation(parse_config(raw), tmp_path / method, progress=False, federation=fed)


def test_extra_evaluations_score_the_global_copies_and_leave_the_run_alone(tmp_path):
    from benchmarks import pfllib_evals

    fed = pfllib.build_federation("dir", num_clients=4, max_samples=600)  # 450 train images

    n_test = {c.cid: int(c.x_test.shape[0]) for c in fed.clients}
    ditto, glob = _narrow_sim(fed, "ditto", tmp_path), []
    ditto.run(pfllib_evals.global_model_curve(ditto, glob))
    fedper = _narrow_sim(fed, "fedper", tmp_path)
    fedper.run()
    # Ditto's global copy trains exactly as FedPer (same phase seeds, local heads)
    assert glob == pfllib.pooled_curve(fedper.history, n_test)
    assert glob != pfllib.pooled_curve(ditto.history, n_test)  # the personal models
    # a 0-epoch fine-tune scores the model as held; the fine-tunes change no stored state
    babu = _narrow_sim(fed, "fedbabu", tmp_path)
    babu.run()
    held = pfllib.pooled_curve(babu.history, n_test)[-1][1]
    before = {k: v.copy() for k, v in babu.global_state.items()}
    assert pfllib_evals.finetuned_accuracy(babu, 0, whole_model=True) == held
    whole = pfllib_evals.finetuned_accuracy(babu, 1, whole_model=True)
    head = pfllib_evals.finetuned_accuracy(babu, 1, whole_model=False)
    assert whole != held and head != held and whole != head
    assert all(np.array_equal(before[k], v) for k, v in babu.global_state.items())
    assert pfllib_evals.finetuned_accuracy(babu, 0, whole_model=False) == held


def test_budget_guard_ends_the_run_after_the_round_past_its_minutes():
    seen: list[int] = []
    log = seen.append
    assert pfllib.budget_guard(0.0, None, log) is log  # no budget: the callback as is
    fresh = pfllib.budget_guard(time.perf_counter(), 10.0, log)
    fresh(1)  # well inside 10 minutes: goes on
    spent = pfllib.budget_guard(time.perf_counter() - 61.0, 1.0, log)
    with pytest.raises(pfllib._Budget):
        spent(2)
    assert seen == [1, 2]  # the inner callback still ran for the last round


def _long_result(split: str, method: str, curve: list, **kw) -> dict:
    best = max(curve, key=lambda p: p[1])
    return {
        "split": split,
        "method": method,
        "rounds": len(curve),
        "curve": curve,
        "best": best[1],
        "best_round": best[0],
        "final": curve[-1][1],
        "round_s": [60.0] * len(curve),
        "wall": 60.0 * len(curve),
        **kw,
    }


def test_long_runs_merge_by_split_and_method_and_report_the_round_the_goal_was_met(tmp_path):
    out = tmp_path / "long.json"
    base = {"mode": "long", "rounds": 50, "ditto_lam": 0.1, "workers": 1, "load": [1.0]}
    fedrep = _long_result("pat", "fedrep", [[1, 0.98], [2, 0.9905], [3, 0.9910]])
    pfllib.save(out, {**base, "results": [fedrep], "command": "A"})
    fedper = _long_result("dir", "fedper", [[1, 0.95], [2, 0.96]], rounds_planned=50, minutes=9)
    merged = pfllib.save(out, {**base, "results": [fedper], "command": "B"})
    assert [(r["split"], r["method"]) for r in merged["results"]] == [
        ("pat", "fedrep"),
        ("dir", "fedper"),
    ]
    again = _long_result("pat", "fedrep", [[1, 0.97]])  # the same pair again replaces it
    merged = pfllib.save(out, {**base, "results": [again], "command": "A"})
    assert json.loads(out.read_text()) == merged
    assert [r["curve"] for r in merged["results"]] == [fedper["curve"], [[1, 0.97]]]
    assert merged["commands"] == ["B", "A"]
    # PFLlib's FedRep 99.56 - 0.5 = 99.06: not at round 2 (99.05), met at round 3 (99.10)
    assert first_met("pat", "fedrep", [{"curve": fedrep["curve"], "in_best": True}]) == 3
    assert first_met("dir", "fedper", [{"curve": fedper["curve"], "in_best": True}]) is None
    assert first_met("pat", "local", [{"curve": [[1, 1.0]], "in_best": True}]) is None
    text = report(merged)
    assert "| 2 of 50, cut at 9 min (PFLlib: 2000) |" in text
    assert "goal not met in these rounds" in text
    # a run taken further by a later invocation: its rows count every invocation's time
    went_on = _long_result("dir", "fedavg", [[1, 0.5], [2, 0.6], [3, 0.7]], resumed_from=2,
                           rounds_planned=50, minutes=1, round_s=[60.0, 120.0, 30.0],
                           wall=40.0)  # fmt: skip
    row = next(line for line in table([went_on]).splitlines() if "FedAvg" in line)
    assert "| 3 of 50, cut at 1 min, rounds 3+ by this invocation (PFLlib: 2000) |" in row
    assert "| 3.7 | 70 |" in row  # (60 + 120 + 40) s; 210 s over 3 rounds


def test_a_long_run_goes_on_from_its_kept_run_dir_as_one_straight_run_would(tmp_path):
    from fmtl_lightning.checkpoint import completed_rounds
    from fmtl_lightning.config import ConfigError

    kept = tmp_path / "dir-ditto"
    job = {"split": "dir", "method": "ditto", "rounds": 2, "clients": 4, "max_samples": 400,
           "ditto_lam": 0.1, "minutes": None, "run_dir": str(kept)}  # fmt: skip
    first = pfllib.run_job(job)
    assert (first["resumed_from"], first["rounds"]) == (0, 2)
    assert completed_rounds(kept) == [2]  # kept after the run
    again = pfllib.run_job({**job, "rounds": 3})  # a later invocation asks for more
    assert (again["resumed_from"], again["rounds"]) == (2, 3)
    straight = pfllib.run_job({**job, "rounds": 3, "run_dir": None})
    assert straight["resumed_from"] == 0
    # personal models from the history, global copies from the kept curve file
    for a, b in zip(again["variants"], straight["variants"], strict=True):
        assert a["curve"] == b["curve"] and len(a["curve"]) == 3, (a, b)
    # asking for fewer rounds than it holds reports them, trains nothing
    assert pfllib.run_job({**job, "rounds": 1})["curve"] == straight["curve"]
    # rounds of another config are refused, naming --fresh, and left as they were
    with pytest.raises(ConfigError, match="--fresh"):
        pfllib.run_job({**job, "ditto_lam": 0.5, "rounds": 4})
    assert completed_rounds(kept) == [3]
    fed = pfllib.build_federation("dir", num_clients=4, max_samples=400)
    with pytest.raises(ConfigError, match=r"federation.rounds: 2 is fewer than the 3"):
        Simulation.resume(kept, rounds=2, federation=fed, progress=False)
    args = pfllib.parse_args(["--rounds", "50", "--methods", "fedper", "--splits", "pat"])
    assert [j["run_dir"] for j in pfllib.jobs_for(args)] == [str(pfllib.LONG_RUNS / "pat-fedper")]
    assert [j["run_dir"] for j in pfllib.jobs_for(pfllib.parse_args([]))] == [None] * 14


def test_the_reference_report_pairs_rounds_and_stops_at_the_first_missing_one():
    """PFLlib's own code against ours, round by round: our curve is [round, acc] pairs
    (from ``pooled_curve``), theirs a list from round 1; gaps are ours minus theirs."""
    from benchmarks.pfllib_reference import report as ref_report

    ref = {"curve": [0.5, 0.6, 0.7, 0.8], "round_s": [30.0, 40.0], "wall": 120.0, "rounds": 4,
           "seed": 0, "split": "dir", "pfllib_commit": "d832e76f6a23b833"}  # fmt: skip
    ours = {"curve": [[1, 0.45], [2, 0.63], [4, 0.9]]}  # round 3 was not evaluated
    md = ref_report(ref, ours)
    assert "| 1 | 50.00 | 45.00 | -5.00 |" in md
    assert "| 2 | 60.00 | 63.00 | +3.00 |" in md
    assert "| 3 | 70.00 |  |  |" in md and "| 4 | 80.00 |  |  |" in md  # not paired past a gap
    assert "Over rounds 1-2: mean gap -1.00 points, largest -5.00" in md
    assert "over rounds 2-2: mean +3.00, mean |gap| 3.00" in md
    assert "Their best in these rounds: 60.00; ours: 63.00." in md
    assert "at `d832e76f6a23`" in md and "35 s a round" in md
