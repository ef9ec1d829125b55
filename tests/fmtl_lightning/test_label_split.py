"""HeteroFL's label split: each output row averaged only over the clients holding it."""

from __future__ import annotations

import numpy as np
import pytest

from fmtl_lightning.aggregation import ClientUpdate, aggregate, aggregate_label_split
from fmtl_lightning.config import ConfigError, parse_config
from fmtl_lightning.errors import StateValidationError
from fmtl_lightning.roles import POLICIES, ModelSpec, ParamSpec, WidthSpec

SPEC = ModelSpec(
    groups={"h": 4},
    params=(
        ParamSpec("w", "backbone", (4, 2), ("h", None)),
        ParamSpec("head.weight", "head", (3, 4), (None, "h")),
        ParamSpec("head.bias", "head", (3,), (None,)),
    ),
    policy=POLICIES["fedavg"],
)


def _global() -> dict[str, np.ndarray]:
    return {
        "w": np.zeros((4, 2), np.float32),
        "head.weight": np.full((3, 4), -1.0, np.float32),
        "head.bias": np.full(3, -1.0, np.float32),
    }


def _update(cid: str, width: float, value: float, n: int) -> ClientUpdate:
    ws = WidthSpec(width)
    st = {
        k: np.full(SPEC.shape_at(k, ws), value, np.float32)
        for k in ("w", "head.weight", "head.bias")
    }
    return ClientUpdate(cid, st, n, ws)


def _rows(*bits: int) -> dict[str, np.ndarray]:
    m = np.array(bits, dtype=bool)
    return {"head.weight": m, "head.bias": m}


def test_rows_average_over_their_holders_only():
    g = _global()
    ups = [_update("a", 1.0, 2.0, 10), _update("b", 0.5, 4.0, 30), _update("c", 1.0, 8.0, 20)]
    masks = {"a": _rows(1, 1, 0), "b": _rows(1, 0, 0), "c": _rows(0, 1, 0)}
    new = aggregate_label_split(g, ups, SPEC, masks, weighting="examples")
    # row 0: held by a (width 1) and b (width 1/2: columns 0-1 only)
    #   columns 0-1: (10*2 + 30*4) / 40 = 3.5 ; columns 2-3: a alone = 2
    np.testing.assert_allclose(new["head.weight"][0], [3.5, 3.5, 2.0, 2.0])
    np.testing.assert_allclose(new["head.bias"][0], 3.5)
    # row 1: a and c, both width 1: (10*2 + 20*8) / 30 = 6
    np.testing.assert_allclose(new["head.weight"][1], [6.0] * 4)
    np.testing.assert_allclose(new["head.bias"][1], 6.0)
    # row 2: nobody holds it -> the global value, untouched
    np.testing.assert_array_equal(new["head.weight"][2], [-1.0] * 4)
    np.testing.assert_array_equal(new["head.bias"][2], -1.0)
    # every other entry exactly as plain aggregation
    plain = aggregate(g, ups, SPEC, weighting="examples")
    np.testing.assert_array_equal(new["w"], plain["w"])
    np.testing.assert_array_equal(g["head.weight"], np.full((3, 4), -1.0))  # input untouched


def test_no_masks_equals_plain_aggregation():
    g = _global()
    ups = [_update("a", 1.0, 2.0, 10), _update("b", 0.25, 4.0, 30)]
    plain = aggregate(g, ups, SPEC)
    for masks in ({}, {"a": _rows(1, 1, 1)}):
        new = aggregate_label_split(g, ups, SPEC, masks)
        for k in plain:
            np.testing.assert_array_equal(new[k], plain[k])


@pytest.mark.parametrize(
    ("masks", "key", "client"),
    [
        ({"a": {"head.weight": np.array([1, 0, 1])}}, "head.weight", "a"),  # not bool
        ({"a": {"head.bias": np.ones(4, bool)}}, "head.bias", "a"),  # wrong length
        ({"a": {"w": np.ones(4, bool)}}, "w", None),  # rows are width-scaled
        ({"a": {"nope": np.ones(3, bool)}}, "nope", None),  # unknown key
        ({"zz": _rows(1, 1, 1)}, None, "zz"),  # no update from that client
    ],
)
def test_bad_masks_raise_naming_the_field(masks, key, client):
    g = _global()
    before = {k: v.copy() for k, v in g.items()}
    with pytest.raises(StateValidationError) as e:
        aggregate_label_split(g, [_update("a", 1.0, 2.0, 10)], SPEC, masks)
    assert e.value.key == key and e.value.client == client
    for k in g:
        np.testing.assert_array_equal(g[k], before[k])


def _raw(**alg) -> dict:
    return {
        "name": "ls",
        "data": {"samples_per_client": 60, "partition": {"kind": "iid"}},
        "model": {"family": "mlp", "hidden": [8]},
        "clients": [{"count": 2, "tasks": ["digits/digit"]}],
        "algorithm": alg,
        "federation": {"rounds": 1},
    }


@pytest.mark.parametrize(
    "alg",
    [
        {"name": "fedavg", "aggregator": "label_split"},  # masked_ce off
        {"name": "fedper", "aggregator": "label_split", "masked_ce": True},  # heads not shared
    ],
)
def test_label_split_config_needs_fedavg_and_masked_ce(alg):
    with pytest.raises(ConfigError, match="algorithm.aggregator: label_split needs"):
        parse_config(_raw(**alg))
    cfg = parse_config(_raw(name="fedavg", aggregator="label_split", masked_ce=True))
    assert cfg.algorithm.aggregator.needs_label_masks


def test_simulation_label_split_rescales_each_row_to_its_holders(small_cfg, tmp_path):
    """One FedAvg round with and without label split, same clients and batches.

    Masked CE and no weight decay leave a client's rows of absent classes exactly at the
    global value, so plain averaging gives old + (sum of holders' changes) / K, and the
    label split old + (same sum) / holders: the two must differ by that factor per row.
    """
    import torch

    from fmtl_lightning.algorithms import UNION_HEAD
    from fmtl_lightning.simulation import Simulation

    torch.set_num_threads(1)
    small_cfg["data"]["partition"] = {"kind": "shards", "classes_per_client": 2}
    small_cfg["clients"] = [{"count": 6, "tasks": ["digits/digit"], "width": 1.0}]
    small_cfg["federation"]["rounds"] = 1
    small_cfg["algorithm"] = {"name": "fedavg", "masked_ce": True, "weighting": "uniform"}
    sims = {}
    for split in (False, True):
        small_cfg["algorithm"]["aggregator"] = "label_split" if split else "mean"
        sims[split] = Simulation(parse_config(small_cfg), tmp_path / str(split), progress=False)
        init = {k: v.copy() for k, v in sims[split].global_state.items()}
        sims[split].run()
    plain, split = sims[False].global_state, sims[True].global_state
    holders = np.sum(
        [
            sims[True].pool.head_row_masks(c)[f"heads.{UNION_HEAD}.bias"]
            for c in sims[True].fed.clients
        ],
        axis=0,
    )
    assert holders.sum() == 12 and 2 <= holders.max() < 6  # 2 classes each, shared, not by all
    for k in (f"heads.{UNION_HEAD}.weight", f"heads.{UNION_HEAD}.bias"):
        old = init[k]
        for r, h in enumerate(holders):
            if h == 0:  # nobody holds the class: both keep the initial row
                np.testing.assert_array_equal(split[k][r], old[r])
                np.testing.assert_allclose(plain[k][r], old[r], atol=1e-7)
            else:
                want = old[r] + (plain[k][r] - old[r]) * 6 / h
                np.testing.assert_allclose(split[k][r], want, rtol=1e-4, atol=1e-6)
                assert np.abs(split[k][r] - old[r]).max() > 1e-4  # the row did move
    np.testing.assert_array_equal(
        split["backbone.layers.1.weight"], plain["backbone.layers.1.weight"]
    )
