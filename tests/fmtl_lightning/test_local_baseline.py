"""The local-only baseline (``compare_local: true``) is itself a config the validator takes."""

from __future__ import annotations

import json

from fmtl_lightning.config import load_config
from fmtl_lightning.simulation import resume_run, run_config


def test_label_split_run_with_its_baseline_resumes(small_cfg, tmp_path):
    """A FedAvg + label-split run: its baseline drops the (server-side) label split, so
    ``--resume`` can reload the baseline's config.yaml and finishes with the same numbers."""
    small_cfg["algorithm"] = {"name": "fedavg", "masked_ce": True, "aggregator": "label_split"}
    small_cfg["federation"]["rounds"] = 1
    small_cfg["compare_local"] = True
    out = run_config(small_cfg, tmp_path / "run", progress=False)
    base = load_config(tmp_path / "run" / "local_baseline" / "config.yaml")
    assert base.algorithm.name == "local" and base.algorithm.aggregator.name == "mean"
    assert base.algorithm.masked_ce  # the same loss: same compute as the run's clients
    again = resume_run(tmp_path / "run", progress=False)
    assert again["local_baseline"] == out["local_baseline"]
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["local_baseline"]["mean_acc"] == out["local_baseline"]["mean_acc"]
