"""Shared fixtures: small, real-data federation configs that run in seconds."""

from __future__ import annotations

import copy
from typing import Any

import pytest

BASE: dict[str, Any] = {
    "name": "t",
    "seed": 3,
    "data": {"samples_per_client": 60, "test_fraction": 0.25, "partition": {"kind": "iid"}},
    "model": {"family": "mlp", "hidden": [32, 16], "norm": "none"},
    "clients": [
        {"count": 2, "tasks": ["digits/digit"], "width": 1.0},
        {"count": 1, "tasks": ["digits/parity", "digits/attrs"], "width": 0.5},
    ],
    "algorithm": {"name": "fedper"},
    "federation": {"rounds": 2, "local_epochs": 1, "batch_size": 16},
    "optimizer": {"name": "sgd", "lr": 0.1},
    "compare_local": False,
}


@pytest.fixture
def small_cfg() -> dict[str, Any]:
    """A fresh deep copy of a 3-client sklearn-digits config (edit freely)."""
    return copy.deepcopy(BASE)
