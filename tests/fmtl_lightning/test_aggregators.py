"""The aggregator registry: each rule on hand-computed cases, robustness, validation, config.

The hand cases use one spec (a width-scaled group of 4 channels) and clients at two
widths, one of them a FedRolex window that wraps around (width 1/2 at round 3 holds
global rows 3 then 0), so that global row 2 is held by nobody and keeps its value.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fmtl_lightning.aggregation import ClientUpdate, aggregate
from fmtl_lightning.aggregators import (
    AGGREGATORS,
    AggregatorParamError,
    LabelSplit,
    Mean,
    Median,
    NormBounded,
    TrimmedMean,
    build_aggregator,
)
from fmtl_lightning.config import ConfigError, config_to_dict, parse_config, validate_config
from fmtl_lightning.errors import StateValidationError
from fmtl_lightning.roles import POLICIES, ModelSpec, ParamSpec, WidthSpec
from tests.fmtl_lightning.test_aggregation_property import (
    CORRUPTIONS,
    SETTINGS,
    check_equal,
    corrupt,
    kept,
    rounds,
    snapshot,
)

SPEC = ModelSpec(
    groups={"h": 4},
    params=(
        ParamSpec("w", "backbone", (4, 2), ("h", None)),
        ParamSpec("b", "backbone", (4,), ("h",)),
        ParamSpec("v", "backbone", (3,), (None,)),
        ParamSpec("n", "counter", (), (), dtype="int64"),
        ParamSpec("head", "head", (2, 4), (None, "h")),  # local: never aggregated
    ),
)
ROBUST = [Median(), TrimmedMean(0.25), TrimmedMean(0.0), NormBounded(1.0)]


def global_state() -> dict[str, np.ndarray]:
    return {
        "w": np.full((4, 2), 100.0, np.float32),
        "b": np.full(4, 100.0, np.float32),
        "v": np.zeros(3, np.float32),
        "n": np.array(5, np.int64),
        "head": np.zeros((2, 4), np.float32),  # not a shared key: carried over
    }


def client(cid, width, rows, v, count, mode="heterofl", t=0, n=10) -> ClientUpdate:
    """``rows``: the client's own rows of ``b`` (and of both columns of ``w``)."""
    ws = WidthSpec(width, mode, t)
    b = np.array(rows, np.float32)
    assert b.shape == SPEC.shape_at("b", ws)
    st_ = {"w": np.stack([b, b], axis=1), "b": b, "v": np.full(3, v, np.float32),
           "n": np.array(count, np.int64)}  # fmt: skip
    return ClientUpdate(cid, st_, n, ws)


def four_clients() -> list[ClientUpdate]:
    return [
        client("p", 0.5, [1.0, 2.0], 1.0, 3),  # global rows 0, 1
        client("q", 0.5, [10.0, 20.0], 5.0, 9, "fedrolex", 3),  # rows 3, 0 (wraps)
        client("r", 0.25, [7.0], 3.0, 4),  # row 0
        client("s", 0.25, [40.0], -8.0, 1),  # row 0
    ]


def check_rows(new, want_b, want_v) -> None:
    np.testing.assert_array_equal(new["b"], np.array(want_b, np.float32))
    np.testing.assert_array_equal(new["w"], np.stack([new["b"]] * 2, axis=1))
    np.testing.assert_array_equal(new["v"], np.array(want_v, np.float32))
    assert new["n"].dtype == np.int64 and new["n"].shape == () and int(new["n"]) == 9  # max
    assert isinstance(new["n"], np.ndarray)
    np.testing.assert_array_equal(new["head"], np.zeros((2, 4)))


# ---------------------------------------------------------------- hand-computed cases
def test_median_over_holders():
    g = global_state()
    new = Median()(g, four_clients(), SPEC)
    # row 0: p 1, q 20, r 7, s 40 -> (7 + 20) / 2; row 1: p alone; row 2: nobody -> 100;
    # row 3: q alone (its first local row, the window wrapped); v: [-8, 1, 3, 5] -> 2
    check_rows(new, [13.5, 2.0, 100.0, 10.0], [2.0] * 3)
    assert g["b"][2] == 100.0 and new["b"] is not g["b"]


@pytest.mark.parametrize(
    ("beta", "row0", "v"),
    [
        (0.25, 13.5, 2.0),  # n=4: k=1 -> mean(7, 20); v: mean(1, 3)
        (0.2, 17.0, 0.25),  # n=4: k=floor(0.8)=0 -> the plain mean (1+20+7+40)/4
        (0.0, 17.0, 0.25),
    ],
)
def test_trimmed_mean_over_holders(beta, row0, v):
    new = TrimmedMean(beta)(global_state(), four_clients(), SPEC)
    # rows held by one client: k = 0 for any beta < 0.5, so the value itself
    check_rows(new, [row0, 2.0, 100.0, 10.0], [v] * 3)


def test_trimmed_mean_drops_floor_beta_n_from_each_end():
    spec = ModelSpec(groups={}, params=(ParamSpec("x", "backbone", (1,), (None,)),))
    ups = [ClientUpdate(f"c{i}", {"x": np.array([x], np.float32)}, 1)
           for i, x in enumerate([5.0, -1.0, 3.0, 100.0, 2.0, 4.0, 0.0])]  # fmt: skip
    g = {"x": np.zeros(1, np.float32)}
    # n = 7: beta 0.3 -> k = 2: sorted [-1, 0, 2, 3, 4, 5, 100] -> mean(2, 3, 4) = 3
    assert TrimmedMean(0.3)(g, ups, spec)["x"][0] == 3.0
    # beta 0.29 * 7 = 2.03 -> k = 2 as well; 0.28 * 7 = 1.96 -> k = 1: mean(0, 2, 3, 4, 5)
    assert TrimmedMean(0.29)(g, ups, spec)["x"][0] == 3.0
    assert TrimmedMean(0.28)(g, ups, spec)["x"][0] == np.float32(14 / 5)


def test_norm_bounded_clips_each_delta_to_its_width_scaled_bound():
    spec = ModelSpec(groups={"h": 4}, params=(ParamSpec("x", "backbone", (4,), ("h",)),))
    g = {"x": np.ones(4, np.float32)}
    a = ClientUpdate("a", {"x": np.array([4.0, 5.0, 1.0, 1.0], np.float32)}, 10)  # delta 3,4
    # width 1/2 at round 3: rows 3, 0; delta (6, 8), norm 10 > sqrt(2/4)
    b = ClientUpdate("b", {"x": np.array([7.0, 9.0], np.float32)}, 30,
                     WidthSpec(0.5, "fedrolex", 3))  # fmt: skip
    new = NormBounded(1.0)(g, [a, b], spec)
    da = np.array([0.6, 0.8])  # (3, 4) / 5: clipped to norm 1 (full width)
    db = np.array([6.0, 8.0]) / 10 * math.sqrt(0.5)  # clipped to sqrt(2/4): rows 3, 0
    want = 1 + np.array([(da[0] + db[1]) / 2, da[1], 0.0, db[0] / 2])
    np.testing.assert_allclose(new["x"], want, rtol=1e-6)
    new_ex = NormBounded(1.0)(g, [a, b], spec, weighting="examples")
    want_ex = 1 + np.array([(10 * da[0] + 30 * db[1]) / 40, da[1], 0.0, db[0] * 30 / 40])
    np.testing.assert_allclose(new_ex["x"], want_ex, rtol=1e-6)
    # a client within its bound is used as it is
    small = ClientUpdate("s", {"x": np.array([1.1, 1.0, 1.0, 1.0], np.float32)}, 1)
    np.testing.assert_array_equal(NormBounded(1.0)(g, [small], spec)["x"], small.state["x"])


def test_norm_bounded_with_a_loose_bound_is_the_mean_bit_for_bit():
    g = global_state()
    for weighting in ("uniform", "examples"):
        got = NormBounded(1e9)(g, four_clients(), SPEC, weighting=weighting)
        want = aggregate(g, four_clients(), SPEC, weighting=weighting)
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
            assert got[k].dtype == want[k].dtype


@pytest.mark.parametrize(("width", "held"), [(1.0, 32), (0.5, 16)])  # of N = 8*3 + 8 elements
def test_norm_bounded_clips_a_scaled_delta_to_the_bound_exactly(width, held):
    rng = np.random.default_rng(0)
    spec = ModelSpec(
        groups={"h": 8},
        params=(ParamSpec("x", "backbone", (8, 3), ("h", None)),
                ParamSpec("y", "backbone", (8,), ("h",))),
    )  # fmt: skip
    g = {k: rng.standard_normal(spec[k].shape).astype(np.float32) for k in ("x", "y")}
    ws = WidthSpec(width)
    u = {k: rng.standard_normal(spec.shape_at(k, ws)) for k in ("x", "y")}
    sent = {k: (g[k][: spec.shape_at(k, ws)[0]] + 1e4 * u[k]).astype(np.float32) for k in u}
    new = NormBounded(2.0)(g, [ClientUpdate("big", sent, 1, ws)], spec)
    rows = {k: slice(0, spec.shape_at(k, ws)[0]) for k in u}
    d = {k: new[k][rows[k]].astype(np.float64) - g[k][rows[k]] for k in u}
    norm = math.sqrt(sum(float((v**2).sum()) for v in d.values()))
    bound = 2.0 * math.sqrt(held / 32)
    assert norm == pytest.approx(bound, rel=1e-5)
    unit = math.sqrt(sum(float((v**2).sum()) for v in u.values()))
    for k in u:  # the direction is the client's
        np.testing.assert_allclose(d[k], u[k] * bound / unit, rtol=1e-3, atol=1e-5)
        np.testing.assert_array_equal(new[k][rows[k].stop :], g[k][rows[k].stop :])


def test_mean_and_label_split_are_the_existing_functions_bit_for_bit():
    from fmtl_lightning.aggregation import aggregate_label_split

    g, ups = global_state(), four_clients()
    for weighting in ("uniform", "examples"):
        want = aggregate(g, ups, SPEC, weighting=weighting)
        got = Mean()(g, ups, SPEC, weighting=weighting)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    spec = ModelSpec(
        groups={"h": 4},
        params=(ParamSpec("hw", "head", (3, 4), (None, "h")),),
        policy=POLICIES["fedavg"],
    )
    hg = {"hw": np.zeros((3, 4), np.float32)}
    hu = [
        ClientUpdate(c, {"hw": np.full((3, 4), x, np.float32)}, 1) for c, x in (("a", 1), ("b", 3))
    ]
    masks = {"a": {"hw": np.array([1, 1, 0], bool)}, "b": {"hw": np.array([0, 1, 0], bool)}}
    got = LabelSplit()(hg, hu, spec, row_masks=masks)
    np.testing.assert_array_equal(got["hw"], aggregate_label_split(hg, hu, spec, masks)["hw"])
    np.testing.assert_array_equal(got["hw"][:, 0], [1.0, 2.0, 0.0])


@pytest.mark.parametrize("rule", [Median(), TrimmedMean(0.25)])
def test_a_global_state_in_fortran_order_aggregates_the_same(rule):
    g = global_state()
    want = rule(g, four_clients(), SPEC)
    g["w"] = np.asfortranarray(g["w"])
    got = rule(g, four_clients(), SPEC)
    np.testing.assert_array_equal(got["w"], want["w"])


def test_no_updates_keep_the_global_state():
    g = global_state()
    for rule in [Mean(), *ROBUST]:
        new = rule(g, [], SPEC)
        for k in g:
            np.testing.assert_array_equal(new[k], g[k])
            assert new[k] is not g[k]


# ---------------------------------------------------------------- robustness
def honest_and_outlier(width: float = 1.0) -> tuple[dict, list[ClientUpdate]]:
    rng = np.random.default_rng(1)
    spec = ModelSpec(groups={"h": 4}, params=(ParamSpec("x", "backbone", (4, 5), ("h", None)),))
    g = {"x": np.zeros((4, 5), np.float32)}
    ups = [ClientUpdate(f"h{i}", {"x": (1 + 0.01 * rng.standard_normal((4, 5))).astype(np.float32)}, 1)
           for i in range(5)]  # fmt: skip
    ws = WidthSpec(width)
    ups.append(ClientUpdate("evil", {"x": np.full(spec.shape_at("x", ws), 1e6, np.float32)}, 1, ws))
    return (spec, g), ups


@pytest.mark.parametrize("rule", [Median(), TrimmedMean(0.2)])
@pytest.mark.parametrize("width", [1.0, 0.5])
def test_order_statistics_ignore_one_outlier_client(rule, width):
    (spec, g), ups = honest_and_outlier(width)
    honest = np.stack([u.state["x"] for u in ups[:-1]])
    new = rule(g, ups, spec)["x"]
    assert (honest.min(0) <= new).all() and (new <= honest.max(0)).all()
    assert aggregate(g, ups, spec)["x"].max() > 1e5  # what the mean does


def test_norm_bounded_limits_one_outlier_to_its_bound():
    (spec, g), ups = honest_and_outlier()
    new = NormBounded(1.0)(g, ups, spec)["x"]
    # six clients, each delta clipped to norm 1: the global delta has norm <= 1
    assert np.sqrt((new.astype(np.float64) ** 2).sum()) <= 1.0 + 1e-6


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("rule", ROBUST, ids=lambda r: repr(r))
@pytest.mark.parametrize(
    ("how", "key"),
    [
        ("nan", "b"),
        ("huge", "b"),
        ("shape", "w"),
        ("dtype", "v"),
        ("missing", "v"),
        ("extra", "head"),
    ],
)
def test_a_bad_update_raises_naming_client_and_key_and_changes_nothing(rule, how, key):
    g, ups = global_state(), four_clients()
    st_ = {k: v.copy() for k, v in ups[2].state.items()}
    if how == "nan":
        st_["b"][0] = np.nan
    elif how == "huge":
        st_["b"][0] = 3e38  # finite, past the bound sqrt(float32 max)
    elif how == "shape":
        st_["w"] = np.zeros((2, 2), np.float32)
    elif how == "dtype":
        st_["v"] = st_["v"].astype(np.float64)
    elif how == "missing":
        del st_["v"]
    else:
        st_["head"] = np.zeros((2, 1), np.float32)
    ups[2] = ClientUpdate("r", st_, 10, ups[2].width)
    before = snapshot(g, ups)
    with pytest.raises(StateValidationError) as ei:
        rule(g, ups, SPEC)
    assert (ei.value.client, ei.value.key) == ("r", key)
    assert snapshot(g, ups) == before


def test_norm_bounded_checks_sample_counts_under_example_weighting():
    ups = four_clients()
    ups[1] = dataclasses.replace(ups[1], num_examples=0)
    with pytest.raises(StateValidationError) as ei:
        NormBounded(1.0)(global_state(), ups, SPEC, weighting="examples")
    assert ei.value.client == "q"


def test_a_bad_global_state_is_named():
    g = global_state()
    g["v"] = np.array([0.0, np.inf, 0.0], np.float32)
    for rule in ROBUST:
        with pytest.raises(StateValidationError) as ei:
            rule(g, four_clients(), SPEC)
        assert (ei.value.client, ei.value.key) == ("<global>", "v")


def test_a_call_the_rule_cannot_honour_is_refused():
    g, ups = global_state(), four_clients()
    with pytest.raises(ValueError, match="median aggregator counts each holder once"):
        Median()(g, ups, SPEC, weighting="examples")
    with pytest.raises(ValueError, match="label_split aggregator needs row_masks"):
        LabelSplit()(g, ups, SPEC)
    with pytest.raises(ValueError, match="mean aggregator takes no row_masks"):
        Mean()(g, ups, SPEC, row_masks={})


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: TrimmedMean(0.5), "beta"),
        (lambda: TrimmedMean(-0.1), "beta"),
        (lambda: TrimmedMean(float("nan")), "beta"),
        (lambda: TrimmedMean("0.1"), "beta"),
        (lambda: NormBounded(0.0), "clip_norm"),
        (lambda: NormBounded(float("inf")), "clip_norm"),
        (lambda: NormBounded(True), "clip_norm"),
    ],
)
def test_bad_parameters_raise_naming_the_parameter(make, field):
    with pytest.raises(AggregatorParamError) as ei:
        make()
    assert ei.value.field == field and str(ei.value).startswith(f"{field}: ")


# ---------------------------------------------------------------- registry and config
def _raw(**alg) -> dict:
    return {
        "data": {"samples_per_client": 60, "partition": {"kind": "iid"}},
        "model": {"family": "mlp", "hidden": [8]},
        "clients": [{"count": 2, "tasks": ["digits/digit"]}],
        "algorithm": {"name": "fedavg", **alg},
    }


def test_the_registry_holds_every_rule_by_name():
    assert sorted(AGGREGATORS) == ["label_split", "mean", "median", "norm_bounded", "trimmed_mean"]
    for name, cls in AGGREGATORS.items():
        assert cls.name == name and dataclasses.is_dataclass(cls)
        assert cls.__dataclass_params__.frozen
    assert [n for n, c in AGGREGATORS.items() if c.needs_label_masks] == ["label_split"]
    assert sorted(n for n, c in AGGREGATORS.items() if not c.weighted) == ["median", "trimmed_mean"]
    rule = build_aggregator({"name": "trimmed_mean", "beta": 0})
    assert rule == TrimmedMean(0.0) and type(rule.beta) is float  # dumped as 0.0
    assert build_aggregator("median") == Median()
    with pytest.raises(AggregatorParamError) as ei:
        build_aggregator({"name": "norm_bounded"})
    assert ei.value.field == "clip_norm"


@pytest.mark.parametrize(
    ("alg", "want"),
    [
        ({}, Mean()),
        ({"aggregator": "median", "weighting": "uniform"}, Median()),
        ({"aggregator": {"name": "trimmed_mean"}, "weighting": "uniform"}, TrimmedMean(0.2)),
        (
            {"aggregator": {"name": "trimmed_mean", "beta": 0}, "weighting": "uniform"},
            TrimmedMean(0.0),
        ),
        ({"aggregator": {"name": "norm_bounded", "clip_norm": 3}}, NormBounded(3.0)),
        ({"aggregator": "label_split", "masked_ce": True}, LabelSplit()),
        ({"label_split": True, "masked_ce": True}, LabelSplit()),  # older configs
        ({"label_split": True, "masked_ce": True, "aggregator": "label_split"}, LabelSplit()),
        ({"label_split": False, "aggregator": "median", "weighting": "uniform"}, Median()),
    ],
)
def test_config_reads_the_aggregator_and_round_trips(alg, want):
    cfg = parse_config(_raw(**alg))
    assert cfg.algorithm.aggregator == want and type(cfg.algorithm.aggregator) is type(want)
    raw = config_to_dict(cfg)
    assert raw["algorithm"]["aggregator"] == {"name": want.name, **dataclasses.asdict(want)}
    assert "label_split" not in raw["algorithm"]
    assert parse_config(raw) == cfg


@pytest.mark.parametrize(
    ("alg", "msg"),
    [
        ({"aggregator": "krum"}, "algorithm.aggregator.name: unknown aggregator 'krum' (registered: "
         "['label_split', 'mean', 'median', 'norm_bounded', 'trimmed_mean'])"),
        ({"aggregator": {"beta": 0.1}}, "algorithm.aggregator.name: required"),
        ({"aggregator": 3}, "algorithm.aggregator: expected an aggregator name or a mapping"),
        ({"aggregator": {"name": "median", 1: 2}, "weighting": "uniform"},
         "algorithm.aggregator.1: not a parameter of the median aggregator"),
        ({"aggregator": {"name": "trimmed_mean", "gamma": 1}, "weighting": "uniform"},
         "algorithm.aggregator.gamma: not a parameter of the trimmed_mean aggregator "
         "(its parameters: ['beta'])"),
        ({"aggregator": {"name": "trimmed_mean", "beta": 0.5}, "weighting": "uniform"},
         "algorithm.aggregator.beta: must be in [0, 0.5), got 0.5"),
        ({"aggregator": {"name": "trimmed_mean", "beta": "x"}, "weighting": "uniform"},
         "algorithm.aggregator.beta: expected a number"),
        ({"aggregator": "norm_bounded"}, "algorithm.aggregator.clip_norm: required by the "
         "norm_bounded aggregator"),
        ({"aggregator": {"name": "norm_bounded", "clip_norm": -1}},
         "algorithm.aggregator.clip_norm: must be a finite number > 0"),
        ({"aggregator": "median"}, "algorithm.weighting: the median aggregator counts each "
         "client once"),
        ({"aggregator": "trimmed_mean", "weighting": "examples"}, "algorithm.weighting: the "
         "trimmed_mean aggregator"),
        ({"aggregator": "label_split"}, "algorithm.aggregator: label_split needs each client's "
         "label set"),
        ({"name": "fedper", "aggregator": "label_split", "masked_ce": True},
         "algorithm.aggregator: label_split needs"),
        ({"label_split": True, "masked_ce": True, "aggregator": "median", "weighting": "uniform"},
         "algorithm.label_split: true means aggregator label_split, but algorithm.aggregator "
         "is 'median'"),
        ({"label_split": "yes"}, "algorithm.label_split: expected true/false"),
    ],
)  # fmt: skip
def test_config_errors_name_the_field(alg, msg):
    with pytest.raises(ConfigError) as ei:
        parse_config(_raw(**alg))
    got = str(ei.value).replace("config.", "")  # the parser's errors say config.algorithm...
    assert got.startswith(msg), str(ei.value)


def test_validate_config_refuses_an_unregistered_aggregator():
    cfg = parse_config(_raw())
    bad = cfg.replace(algorithm=dataclasses.replace(cfg.algorithm, aggregator=object()))
    with pytest.raises(ConfigError, match=r"^algorithm.aggregator: .* is not a registered"):
        validate_config(bad)


def test_importing_the_aggregators_and_the_config_needs_no_torch():
    code = ("import sys; import fmtl_lightning.aggregators, fmtl_lightning.config; "
            "sys.exit('torch' in sys.modules)")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_simulation_aggregates_with_the_configured_rule(small_cfg, tmp_path, monkeypatch):
    import fmtl_lightning.aggregators.median as median_mod
    from fmtl_lightning.simulation import Simulation

    calls = []
    real = median_mod.aggregate_median

    def spy(g, ups, spec):
        calls.append([u.client_id for u in ups])
        calls.append(out := real(g, ups, spec))
        return out

    monkeypatch.setattr(median_mod, "aggregate_median", spy)
    small_cfg["algorithm"] = {"name": "fedper", "aggregator": "median", "weighting": "uniform"}
    small_cfg["federation"]["rounds"] = 1
    sim = Simulation(parse_config(small_cfg), tmp_path / "run", progress=False)
    sim.run()
    assert calls[0] == ["c00", "c01", "c02"]
    assert sim.global_state.keys() == calls[1].keys()
    for k, v in calls[1].items():
        np.testing.assert_array_equal(sim.global_state[k], v)


# ---------------------------------------------------------------- properties
def naive_holders(spec: ModelSpec, g: dict, ups: list[ClientUpdate], stat) -> dict:
    """Per element, ``stat`` of the values of the clients that hold it (independent of
    the slicing module: positions from ``kept``), else the global value; ints by max."""
    out = {}
    for key in spec.shared_keys():
        p = spec[key]
        if not p.is_float:
            out[key] = max([int(u.state[key]) for u in ups], default=int(g[key]))
            continue
        held = []
        for u in ups:
            full = np.full(p.shape, np.nan)
            idx = [list(range(n)) if ax is None else kept(spec.groups[ax], u.width)
                   for n, ax in zip(p.shape, p.axes, strict=True)]  # fmt: skip
            if p.shape:
                full[np.ix_(*idx)] = u.state[key]
            else:
                full[()] = u.state[key]
            held.append(full)
        res = np.array(g[key], np.float64)
        for pos in np.ndindex(*p.shape):
            vals = [float(h[pos]) for h in held if not np.isnan(h[pos])]
            if vals:
                res[pos] = stat(vals)
        out[key] = res
    return out


def trimmed(beta: float):
    def stat(vals: list[float]) -> float:
        k = int(beta * len(vals) + 1e-9)
        kept_vals = sorted(vals)[k : len(vals) - k]
        return math.fsum(kept_vals) / len(kept_vals)

    return stat


def check_against(spec, g, ups, new, want, *, exact: bool) -> None:
    assert set(new) == set(want)
    for k, v in want.items():
        got = new[k]
        assert got.shape == spec[k].shape and got.dtype == np.dtype(spec[k].dtype), k
        if not spec[k].is_float:
            assert int(got) == v, k
        elif exact:  # a median is one or the mean of two of the values: no rounding to speak of
            np.testing.assert_array_equal(got, v.astype(got.dtype), err_msg=k)
        else:
            np.testing.assert_allclose(got, v, rtol=1e-5, atol=1e-6, err_msg=k)


@SETTINGS
@given(rounds())
def test_median_is_the_median_over_holders(case):
    spec, g, ups, _ = case
    before = snapshot(g, ups)
    new = Median()(g, ups, spec)
    check_against(spec, g, ups, new, naive_holders(spec, g, ups, statistics.median), exact=True)
    assert snapshot(g, ups) == before


@SETTINGS
@given(rounds(), st.sampled_from([0.0, 0.1, 0.2, 0.25, 1 / 3, 0.49]))
def test_trimmed_mean_is_the_trimmed_mean_over_holders(case, beta):
    spec, g, ups, _ = case
    before = snapshot(g, ups)
    new = TrimmedMean(beta)(g, ups, spec)
    check_against(spec, g, ups, new, naive_holders(spec, g, ups, trimmed(beta)), exact=False)
    assert snapshot(g, ups) == before


@SETTINGS
@given(rounds(), st.sampled_from(CORRUPTIONS), st.integers(0, 10**6), st.integers(0, 4),
       st.sampled_from(["median", "trimmed_mean"]))  # fmt: skip
def test_order_statistics_refuse_every_bad_value(case, how, pos, which, name):
    """Every input is validated in full: only sample counts (which these unweighted
    rules do not read) may be odd; anything else raises naming the client."""
    spec, g, ups, _ = case
    if not ups:
        return
    i = which % len(ups)
    ups = [*ups[:i], corrupt(ups[i], how, pos), *ups[i + 1 :]]
    rule = Median() if name == "median" else TrimmedMean(0.25)
    before = snapshot(g, ups)
    try:
        new = rule(g, ups, spec)
    except StateValidationError as exc:
        assert exc.client == ups[i].client_id
        assert how not in ("big_count", "zero_count", "bool_count")
    else:
        assert how in ("big_count", "zero_count", "bool_count")
        stat = statistics.median if name == "median" else trimmed(0.25)
        check_against(spec, g, ups, new, naive_holders(spec, g, ups, stat), exact=name == "median")
    assert snapshot(g, ups) == before


def positions(spec: ModelSpec, key: str, ws: WidthSpec) -> tuple:
    """Where a client's array lands in the global one (from ``kept``, not the slicing module)."""
    p = spec[key]
    idx = [list(range(n)) if ax is None else kept(spec.groups[ax], ws)
           for n, ax in zip(p.shape, p.axes, strict=True)]  # fmt: skip
    return np.ix_(*idx) if p.shape else ()


@SETTINGS
@given(rounds(), st.sampled_from([1e-3, 0.5, 3.0, 1e9]))
def test_norm_bounded_is_the_mean_of_deltas_clipped_by_the_width_rule(case, clip):
    """Independently: each client's float64 delta over the positions it holds, its norm,
    its bound ``clip * sqrt(held / N)``; the mean over holders of ``g + clipped delta``."""
    spec, g, ups, weighting = case
    before = snapshot(g, ups)
    fkeys = [k for k in spec.shared_keys() if spec[k].is_float]
    total = sum(math.prod(spec[k].shape) for k in fkeys)
    clipped = []
    for u in ups:
        d = {k: u.state[k].astype(np.float64) - g[k].astype(np.float64)[positions(spec, k, u.width)]
             for k in fkeys}  # fmt: skip
        norm = math.sqrt(sum(float((v**2).sum()) for v in d.values()))
        bound = clip * math.sqrt(sum(v.size for v in d.values()) / total)
        s = min(1.0, bound / norm) if norm > 0 else 1.0
        st_ = {k: g[k].astype(np.float64)[positions(spec, k, u.width)] + s * d[k] for k in fkeys}
        clipped.append(ClientUpdate(u.client_id, {**st_, "count": u.state["count"]},
                                    u.num_examples, u.width))  # fmt: skip
    new = NormBounded(clip)(g, ups, spec, weighting=weighting)
    check_equal(spec, g, clipped, weighting, new)
    assert snapshot(g, ups) == before
