"""Property tests of ``aggregate``: random specs, widths (HeteroFL and FedRolex), states.

The expected answer is computed here, independently of the slicing module: each
client's array is embedded into a full-size float64 array at the channel indices
this file derives from the width rule (a prefix for HeteroFL, a window starting at
``round % C`` and wrapping for FedRolex, unless it spans the whole group), with a mask of the held positions; the
result is ``sum(w * x) / sum(w * mask)`` where held, else the global value.
Bad inputs either aggregate to that answer or raise StateValidationError, and
never change an input array.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fmtl_lightning.aggregation import ClientUpdate, aggregate
from fmtl_lightning.errors import StateValidationError
from fmtl_lightning.roles import ModelSpec, ParamSpec, WidthSpec

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WIDTHS = (1.0, 0.75, 0.5, 1 / 3, 0.25, 0.1)


def make_spec(a: int, b: int) -> ModelSpec:
    return ModelSpec(
        groups={"a": a, "b": b},
        params=(
            ParamSpec("conv", "backbone", (a, b, 2), ("a", "b", None)),
            ParamSpec("lin", "backbone", (b, 3), ("b", None)),
            ParamSpec("mid", "backbone", (a, 2, b), ("a", None, "b")),
            ParamSpec("bias", "backbone", (a,), ("a",)),
            ParamSpec("free", "backbone", (2,), (None,)),
            ParamSpec("scalar", "backbone", (), ()),
            ParamSpec("count", "counter", (), (), dtype="int64"),
            ParamSpec("head", "head", (4, b), (None, "b")),  # local: never aggregated
        ),
    )


def kept(full: int, ws: WidthSpec) -> list[int]:
    """Global channel indices a client at ``ws`` holds, in its own order (written here)."""
    k = max(1, math.ceil(round(ws.width * full, 6)))
    if ws.mode == "heterofl" or k == full:  # a window over the whole group is the group
        return list(range(k))
    return [(ws.round_idx + j) % full for j in range(k)]


def naive(spec: ModelSpec, g: dict, ups: list[ClientUpdate], weighting: str) -> dict:
    out = {}
    for key in spec.shared_keys():
        p = spec[key]
        if not p.is_float:
            vals = [int(u.state[key]) for u in ups]
            out[key] = max(vals) if vals else int(g[key])
            continue
        num = np.zeros(p.shape)
        den = np.zeros(p.shape)
        for u in ups:
            w = 1.0 if weighting == "uniform" else float(u.num_examples)
            idx = [
                list(range(n)) if ax is None else kept(spec.groups[ax], u.width)
                for n, ax in zip(p.shape, p.axes, strict=True)
            ]
            x = u.state[key].astype(np.float64)
            if p.shape:
                num[np.ix_(*idx)] += w * x
                den[np.ix_(*idx)] += w
            else:
                num += w * x
                den += w
        held = den > 0
        out[key] = np.where(held, num / np.where(held, den, 1.0), g[key].astype(np.float64))
    return out


ONE = st.just(1.0)


@st.composite
def rounds(draw, *, scale=ONE):
    a, b = draw(st.integers(1, 6)), draw(st.integers(1, 7))
    spec = make_spec(a, b)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mag = draw(scale)
    g = {
        k: np.array(rng.standard_normal(spec[k].shape) * mag, np.float32)
        for k in spec.shared_keys()
        if spec[k].is_float
    }
    g["count"] = np.array(rng.integers(0, 100), np.int64)
    ups = []
    for i in range(draw(st.integers(0, 5))):
        ws = WidthSpec(
            draw(st.sampled_from(WIDTHS)),
            draw(st.sampled_from(["heterofl", "fedrolex"])),
            draw(st.integers(0, 12)),
        )
        state = {
            k: np.array(rng.standard_normal(spec.shape_at(k, ws)) * mag, np.float32)
            for k in g
            if k != "count"
        }
        state["count"] = np.array(rng.integers(0, 100), np.int64)
        ups.append(ClientUpdate(f"c{i}", state, draw(st.integers(1, 1000)), ws))
    return spec, g, ups, draw(st.sampled_from(["uniform", "examples"]))


def check_equal(spec, g, ups, weighting, new) -> None:
    want = naive(spec, g, ups, weighting)
    assert set(new) == set(want)  # the local head is not aggregated
    for k, v in want.items():
        got = np.asarray(new[k])
        assert got.shape == spec[k].shape and got.dtype == np.dtype(spec[k].dtype), k
        if not spec[k].is_float:
            assert int(got) == v, k
            continue
        assert np.isfinite(got).all(), k
        scale = max([float(np.abs(g[k]).max(initial=0))]
                    + [float(np.abs(u.state[k]).max(initial=0)) for u in ups])  # fmt: skip
        np.testing.assert_allclose(got, v, rtol=1e-5, atol=1e-6 * scale, err_msg=k)


def snapshot(g, ups) -> list:
    arrays = list(g.values()) + [a for u in ups for a in u.state.values()]
    return [(type(a).__name__, getattr(a, "dtype", None), np.shape(a), np.asarray(a).tobytes())
            for a in arrays]  # fmt: skip


@SETTINGS
@given(rounds())
def test_aggregate_is_the_mean_over_holders(case):
    spec, g, ups, weighting = case
    before = snapshot(g, ups)
    new = aggregate(g, ups, spec, weighting=weighting)
    check_equal(spec, g, ups, weighting, new)
    assert snapshot(g, ups) == before


@SETTINGS
@given(rounds(scale=st.sampled_from([1e15, 1e18])))
def test_large_values_within_the_bound_never_overflow(case):
    spec, g, ups, weighting = case
    new = aggregate(g, ups, spec, weighting=weighting)
    check_equal(spec, g, ups, weighting, new)


CORRUPTIONS = (
    "nan", "inf", "huge", "big_count", "zero_count", "bool_count",
    "shape", "dtype", "missing", "extra", "list",
)  # fmt: skip


def corrupt(u: ClientUpdate, how: str, draw_pos: int) -> ClientUpdate:
    st_ = {k: v.copy() for k, v in u.state.items()}
    key = "conv"
    n = u.num_examples
    if how in ("nan", "inf", "huge"):
        flat = st_[key].reshape(-1)
        flat[draw_pos % flat.size] = {"nan": np.nan, "inf": -np.inf, "huge": 3e38}[how]
    elif how == "big_count":
        n = 2**62
    elif how == "zero_count":
        n = 0
    elif how == "bool_count":
        n = True
    elif how == "shape":
        st_[key] = np.zeros(st_[key].shape + (1,), np.float32)
    elif how == "dtype":
        st_[key] = st_[key].astype(np.float64)
    elif how == "missing":
        del st_[key]
    elif how == "extra":
        st_["head"] = np.zeros((4, 1), np.float32)
    elif how == "list":
        st_[key] = st_[key].tolist()
    return ClientUpdate(u.client_id, st_, n, u.width)


@SETTINGS
@given(rounds(), st.sampled_from(CORRUPTIONS), st.integers(0, 10**6), st.integers(0, 4))
def test_a_bad_update_aggregates_correctly_or_raises_and_changes_nothing(case, how, pos, which):
    spec, g, ups, weighting = case
    if not ups:
        return
    i = which % len(ups)
    ups = [*ups[:i], corrupt(ups[i], how, pos), *ups[i + 1 :]]
    before = snapshot(g, ups)
    try:
        new = aggregate(g, ups, spec, weighting=weighting)
    except StateValidationError as exc:
        assert exc.client == ups[i].client_id
    else:
        # only what cannot harm the mean passes: counts under uniform weighting, or a
        # huge value diluted below the bound by the other clients
        assert how in ("big_count", "zero_count", "bool_count", "huge")
        assert weighting == "uniform" or how == "huge"
        check_equal(spec, g, ups, weighting, new)
    assert snapshot(g, ups) == before


def test_a_huge_value_that_would_poison_the_average_is_refused():
    spec = make_spec(2, 2)
    g = {k: np.zeros(spec[k].shape, np.float32) for k in spec.shared_keys()}
    g["count"] = np.array(0, np.int64)
    state = {k: np.ones(spec[k].shape, np.float32) for k in g}
    state["count"] = np.array(1, np.int64)
    bad = {**state, "conv": np.full(spec["conv"].shape, 3e38, np.float32)}
    ups = [ClientUpdate("ok", state, 1), ClientUpdate("bad", bad, 1)]
    with pytest.raises(StateValidationError) as ei:
        aggregate(g, ups, spec)
    assert (ei.value.client, ei.value.key) == ("bad", "conv")
