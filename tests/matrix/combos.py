"""The combination matrix: every config factor, and a pairwise covering set of configs.

A covering design (every pair of factor values that the validator accepts together
appears in at least one config) replaces the full product, which has thousands of
members. :func:`covering_set` is deterministic: the same factors give the same configs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# factor -> its values. Every field of the config that changes which code runs.
FACTORS: dict[str, tuple[Any, ...]] = {
    "family": ("mlp", "cnn", "dwcnn"),
    "norm": ("group", "batch", "static_batch", "none"),
    "algorithm": ("local", "fedavg", "fedper", "fedrep", "ditto", "fedbabu", "fedavg_ft"),
    "policy": ("fedper", "fedbn"),
    # median runs trimmed_mean's code path (aggregators/order.py) but for its reduce step,
    # which the unit tests cover; leaving it out keeps the matrix within its time budget
    "aggregator": ("mean", "label_split", "trimmed_mean", "norm_bounded"),
    "masked_ce": (False, True),
    "slicing": ("heterofl", "fedrolex"),
    "width_assignment": ("fixed", "dynamic"),
    "edge": (False, True),
    "compare_local": (False, True),
    "scaler": (False, True),
    "weighting": ("uniform", "examples"),
}

# each aggregator with parameters that make it act on three clients (beta: trim one per end)
AGGREGATOR_CONFIG: dict[str, Any] = {
    "mean": "mean",
    "label_split": "label_split",
    "median": "median",
    "trimmed_mean": {"name": "trimmed_mean", "beta": 0.34},
    "norm_bounded": {"name": "norm_bounded", "clip_norm": 0.5},
}

HIDDEN = {"mlp": [12, 8], "cnn": [4, 8], "dwcnn": [4, 4, 8]}


def _fresh(v: Any) -> Any:
    return dict(v) if isinstance(v, dict) else v


def config_of(combo: Mapping[str, Any]) -> dict[str, Any]:
    """A tiny real-data config (sklearn digits, three widths, three task sets)."""
    c = combo
    edge = bool(c["edge"])
    return (  # a fresh literal: nothing shared between calls
        {
            "name": "matrix",
            "seed": 5,
            "data": {"samples_per_client": 40, "test_fraction": 0.25, "partition": {"kind": "iid"}},
            "model": {
                "family": c["family"],
                "hidden": list(HIDDEN[c["family"]]),
                "norm": c["norm"],
                "scaler": c["scaler"],
            },
            "clients": [
                {"count": 1, "tasks": ["digits/digit"], "width": 1.0},
                {"count": 1, "tasks": ["digits/parity", "digits/attrs"], "width": 0.5},
                {"count": 1, "tasks": ["digits/digit"], "width": 0.25, "edge": edge},
            ],
            "algorithm": {
                "name": c["algorithm"],
                "policy": c["policy"],
                "aggregator": _fresh(AGGREGATOR_CONFIG[c["aggregator"]]),
                "masked_ce": c["masked_ce"],
                "slicing": c["slicing"],
                "width_assignment": c["width_assignment"],
                "weighting": c["weighting"],
                "rep_head_epochs": 1,
                "lam": 0.5,
            },
            "federation": {"rounds": 2, "local_steps": 2, "batch_size": 8},
            "optimizer": {"name": "sgd", "lr": 0.05},
            "compare_local": c["compare_local"],
        }
    )


def covering_set(
    factors: Mapping[str, Sequence[Any]],
    accepts: Callable[[dict[str, Any]], bool],
) -> list[dict[str, Any]]:
    """Configs (as factor dicts) in which every accepted pair of values appears.

    A pair counts as accepted if some full combination containing it is accepted.
    Greedy: each new combination is the accepted one that covers the most pairs not
    yet covered, searched over the full product in a fixed order (ties: first found).
    """
    names = list(factors)
    full = [dict(zip(names, vals, strict=True)) for vals in itertools.product(*factors.values())]
    ok = [c for c in full if accepts(c)]

    def pairs(c: Mapping[str, Any]) -> set[tuple]:
        return {(a, c[a], b, c[b]) for a, b in itertools.combinations(names, 2)}

    cover = [pairs(c) for c in ok]
    todo = set().union(*cover)
    chosen: list[dict[str, Any]] = []
    while todo:
        best = max(range(len(ok)), key=lambda i: len(cover[i] & todo))
        chosen.append(ok[best])
        todo -= cover[best]
    return chosen


def all_pairs(combos: Sequence[Mapping[str, Any]]) -> set[tuple]:
    names = list(FACTORS)
    return {(a, c[a], b, c[b]) for c in combos for a, b in itertools.combinations(names, 2)}
