"""Aggregation against hand-computed answers on tiny hand-built arrays."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from fmtl_lightning.aggregation import Aggregator, ClientUpdate, aggregate
from fmtl_lightning.errors import StateValidationError
from fmtl_lightning.roles import ModelSpec, ParamSpec, WidthSpec
from fmtl_lightning.slicing import slice_state

SPEC = ModelSpec(
    groups={"h": 4},
    params=(
        ParamSpec("w", "backbone", (4, 2), ("h", None)),
        ParamSpec("b", "backbone", (4,), ("h",)),
        ParamSpec("v", "backbone", (3,), (None,)),
        ParamSpec("n", "counter", (), (), dtype="int64"),
        ParamSpec("head", "head", (2, 4), (None, "h")),
    ),
)


def global_state() -> dict[str, np.ndarray]:
    return {
        "w": np.arange(8, dtype=np.float32).reshape(4, 2),
        "b": np.full(4, 100.0, dtype=np.float32),
        "v": np.array([1.0, 2.0, 3.0], dtype=np.float32),
        "n": np.array(5, dtype=np.int64),
    }


def client(cid: str, width: float, value: float, n: int, counter: int = 7, mode="heterofl", t=0):
    ws = WidthSpec(width, mode, t)
    st = {k: np.full(SPEC.shape_at(k, ws), value, dtype=np.float32) for k in ("w", "b", "v")}
    st["n"] = np.array(counter, dtype=np.int64)
    return ClientUpdate(cid, st, n, ws)


def test_two_clients_different_widths_uniform():
    g = global_state()
    new = aggregate(g, [client("a", 1.0, 2.0, 10), client("b", 0.5, 4.0, 30)], SPEC)
    # rows 0-1 held by both -> (2+4)/2 = 3; rows 2-3 only by the width-1 client -> 2
    np.testing.assert_array_equal(new["b"], [3.0, 3.0, 2.0, 2.0])
    np.testing.assert_array_equal(new["w"], [[3, 3], [3, 3], [2, 2], [2, 2]])
    np.testing.assert_array_equal(new["v"], [3.0, 3.0, 3.0])  # unscaled: both hold it
    assert new["n"] == 7 and new["n"].dtype == np.int64  # max rule, never averaged
    assert "head" not in new  # local keys are not aggregated


def test_example_weighting():
    g = global_state()
    new = aggregate(
        g, [client("a", 1.0, 2.0, 10), client("b", 0.5, 4.0, 30)], SPEC, weighting="examples"
    )
    # held by both: (10*2 + 30*4) / 40 = 3.5 ; held by a alone: 2
    np.testing.assert_allclose(new["b"], [3.5, 3.5, 2.0, 2.0])
    np.testing.assert_allclose(new["v"], [3.5, 3.5, 3.5])


def test_three_clients_entries_held_by_one_some_none():
    g = global_state()
    ups = [client("a", 0.5, 1.0, 1), client("b", 0.5, 3.0, 1), client("c", 0.25, 8.0, 1)]
    new = aggregate(g, ups, SPEC)
    # row 0: a, b, c -> 4 ; row 1: a, b -> 2 ; rows 2,3: nobody -> keep 100
    np.testing.assert_array_equal(new["b"], [4.0, 2.0, 100.0, 100.0])
    np.testing.assert_array_equal(new["w"][2:], g["w"][2:])
    np.testing.assert_array_equal(new["w"][:2], [[4, 4], [2, 2]])


def test_fedavg_is_all_width_one_weighted_mean():
    rng = np.random.default_rng(0)
    g = global_state()
    ups = []
    for i, n in enumerate([3, 5, 11]):
        st = {k: rng.normal(size=g[k].shape).astype(np.float32) for k in ("w", "b", "v")}
        st["n"] = np.array(i, dtype=np.int64)
        ups.append(ClientUpdate(f"c{i}", st, n))
    new = aggregate(g, ups, SPEC, weighting="examples")
    for k in ("w", "b", "v"):
        want = sum(u.num_examples * u.state[k].astype(np.float64) for u in ups) / 19.0
        np.testing.assert_allclose(new[k], want, rtol=1e-6)


def test_fedrolex_window_wraps_and_aggregates_at_global_positions():
    ws = WidthSpec(0.5, "fedrolex", round_idx=7)  # 7 % 4 = 3 -> channels [3, 0]
    np.testing.assert_array_equal(ws.indices(4), [3, 0])
    g = global_state()
    sub = slice_state(g, SPEC, ws, keys=["w", "b"])
    np.testing.assert_array_equal(sub["w"], g["w"][[3, 0]])
    up = client("a", 0.5, 9.0, 1, mode="fedrolex", t=7)
    new = aggregate(g, [up], SPEC)
    np.testing.assert_array_equal(new["b"], [9.0, 100.0, 100.0, 9.0])


def test_fedrolex_round_past_channel_count():
    # round 9 on 4 channels at width 3/4: start 9 % 4 = 1 -> [1, 2, 3]; round 11 -> [3, 0, 1]
    np.testing.assert_array_equal(WidthSpec(0.75, "fedrolex", 9).indices(4), [1, 2, 3])
    np.testing.assert_array_equal(WidthSpec(0.75, "fedrolex", 11).indices(4), [3, 0, 1])
    assert WidthSpec(0.75, "fedrolex", 11).runs(4) == [(3, 4, 0), (0, 2, 1)]


def test_integer_rules_sum_and_keep():
    spec_sum = ModelSpec(
        groups={}, params=(ParamSpec("n", "counter", (), (), dtype="int64", int_rule="sum"),)
    )
    g = {"n": np.array(5, dtype=np.int64)}
    ups = [ClientUpdate(c, {"n": np.array(v, dtype=np.int64)}, 1) for c, v in [("a", 2), ("b", 3)]]
    assert aggregate(g, ups, spec_sum)["n"] == 5
    spec_keep = ModelSpec(
        groups={}, params=(ParamSpec("n", "counter", (), (), dtype="int64", int_rule="keep"),)
    )
    assert aggregate(g, ups, spec_keep)["n"] == 5 and aggregate(g, ups[:1], spec_sum)["n"] == 2


def _bad(kind: str) -> ClientUpdate:
    up = client("bad", 0.5, 1.0, 1)
    st = dict(up.state)
    if kind == "shape":
        st["w"] = np.zeros((4, 2), dtype=np.float32)  # width-1 shape from a width-1/2 client
    elif kind == "missing":
        del st["b"]
    elif kind == "extra":
        st["head"] = np.zeros((2, 2), dtype=np.float32)
    elif kind == "nan":
        st["v"] = np.array([1.0, np.nan, 0.0], dtype=np.float32)
    elif kind == "inf":
        st["b"] = np.array([np.inf, 0.0], dtype=np.float32)
    elif kind == "dtype":
        st["v"] = st["v"].astype(np.float64)
    return ClientUpdate("bad", st, 1, up.width)


@pytest.mark.parametrize(
    "kind,key,words",
    [
        ("shape", "w", "shape"),
        ("missing", "b", "missing"),
        ("extra", "head", "unexpected"),
        ("nan", "v", "non-finite"),
        ("inf", "b", "non-finite"),
        ("dtype", "v", "dtype"),
    ],
)
def test_bad_update_raises_typed_error_and_changes_nothing(kind, key, words):
    g = global_state()
    before = {k: v.copy() for k, v in g.items()}
    with pytest.raises(StateValidationError) as ei:
        aggregate(g, [client("ok", 1.0, 2.0, 1), _bad(kind)], SPEC)
    assert ei.value.client == "bad" and ei.value.key == key
    assert words in str(ei.value) and "'bad'" in str(ei.value)
    for k in before:
        np.testing.assert_array_equal(g[k], before[k])


def test_aggregator_rejects_bad_update_and_keeps_running_sum():
    g = global_state()
    agg = Aggregator(g, SPEC)
    agg.add(client("a", 1.0, 2.0, 1))
    with pytest.raises(StateValidationError):
        agg.add(_bad("nan"))
    agg.add(client("b", 1.0, 4.0, 1))
    np.testing.assert_array_equal(agg.result()["b"], [3.0, 3.0, 3.0, 3.0])
    assert agg.num_clients == 2


def test_example_weighting_rejects_nonpositive_count():
    with pytest.raises(StateValidationError, match="num_examples"):
        aggregate(global_state(), [client("z", 1.0, 1.0, 0)], SPEC, weighting="examples")


def test_no_updates_keeps_global():
    g = global_state()
    new = aggregate(g, [], SPEC)
    for k in g:
        np.testing.assert_array_equal(new[k], g[k])
        assert new[k] is not g[k]


# --- issue 16, defect 6: huge finite values; defect 8: absurd sample counts -------------------


def _snapshot(*states) -> list[tuple[str, tuple, bytes]]:
    return [(str(a.dtype), a.shape, a.tobytes()) for st in states for a in st.values()]


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_a_huge_finite_value_is_refused_naming_the_client(weighting):
    """3e38 is a finite float32; weighted by 10 examples (or added to another 3e38) it
    overflowed, and aggregate() only warned and returned Inf."""
    g = global_state()
    ok, big = client("ok", 1.0, 1.0, 10), client("big", 0.5, 1.0, 10)
    big.state["v"][:] = 3e38
    if weighting == "uniform":
        ok.state["v"][:] = 3e38  # within float32, but the sum of the two is not
        ok = ClientUpdate("ok", ok.state, 10, ok.width)
    before = _snapshot(g, ok.state, big.state)
    with pytest.raises(StateValidationError) as ei:
        aggregate(g, [ok, big] if weighting == "examples" else [big, ok], SPEC, weighting=weighting)
    assert ei.value.client == "big" and ei.value.key == "v"
    assert "|x| > 1.84e+19, the bound for float32" in str(ei.value)
    assert _snapshot(g, ok.state, big.state) == before


def test_values_at_the_bound_average_without_overflow():
    """Many clients at the largest allowed value: the mean is that value, finite."""
    from fmtl_lightning.validation import max_abs

    assert TOP <= max_abs(np.float32) < np.nextafter(np.float32(TOP), np.float32(np.inf))
    ups = [client(f"c{i}", 1.0 if i % 2 else 0.5, TOP, 2**50) for i in range(40)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = aggregate(global_state(), ups, SPEC, weighting="examples")
    for k in ("w", "b", "v"):
        np.testing.assert_allclose(new[k], TOP, rtol=1e-6)


ONE = ModelSpec(groups={"h": 4}, params=(ParamSpec("x", "backbone", (4,), ("h",)),))
TOP = float(np.nextafter(np.float32(1.8446744e19), np.float32(0)))  # a float32 <= the bound


def test_weights_are_rescaled_when_their_total_could_overflow_the_sum():
    """2100 clients of 2**53 examples at the largest allowed value: the plain weighted
    sum (1.9e19 * 1.8e19) overflowed float32, and aggregate() returned Inf with a warning."""
    g = {"x": np.zeros(4, np.float32)}
    ups = [
        ClientUpdate(f"c{i}", {"x": np.full(4 if i % 2 else 2, TOP, np.float32)}, 2**53,
                     WidthSpec(1.0 if i % 2 else 0.5))
        for i in range(2100)
    ]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = aggregate(g, ups, ONE, weighting="examples")
    np.testing.assert_allclose(new["x"], TOP, rtol=1e-4)  # 2100 float32 additions


def test_streaming_aggregator_refuses_a_weight_past_its_limit():
    agg = Aggregator({"x": np.zeros(4, np.float32)}, ONE, weighting="examples")
    assert agg.weight_limit == pytest.approx(2.0**63, rel=1e-6)  # sqrt(float32 max) / 2
    for i in range(1023):
        agg.add(ClientUpdate(f"c{i}", {"x": np.full(4, TOP, np.float32)}, 2**53))
    with pytest.raises(StateValidationError, match="client 'c1023'.*total weight"):
        agg.add(ClientUpdate("c1023", {"x": np.full(4, TOP, np.float32)}, 2**53))
    assert agg.num_clients == 1023
    np.testing.assert_allclose(agg.result()["x"], TOP, rtol=1e-5)


@pytest.mark.parametrize("n", [2**62, 2**53 + 1, 10**400, True, 0, -3, 2.5])
def test_example_weighting_refuses_absurd_counts(n):
    """2**62 examples erased every other client (and 10**400 raised OverflowError)."""
    with pytest.raises(StateValidationError, match=r"client 'z'.*num_examples.*2\*\*53"):
        aggregate(global_state(), [client("a", 1.0, 1.0, 10), client("z", 1.0, 1.0, n)], SPEC,
                  weighting="examples")  # fmt: skip


def test_example_weighting_accepts_the_largest_count():
    new = aggregate(global_state(), [client("a", 1.0, 1.0, 1), client("z", 1.0, 3.0, 2**53)],
                    SPEC, weighting="examples")  # fmt: skip
    np.testing.assert_allclose(new["v"], 3.0)
