"""The robustness benchmark's attack wrapper: corrupted updates against hand-computed
values, and the attacking clients chosen deterministically."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.attacks import Attacked, choose_attackers
from fmtl_lightning.aggregation import ClientUpdate
from fmtl_lightning.aggregators import Median, NormBounded
from fmtl_lightning.roles import ModelSpec, ParamSpec, WidthSpec

SPEC = ModelSpec(
    groups={"h": 4},
    params=(
        ParamSpec("w", "backbone", (4,), ("h",)),
        ParamSpec("n", "counter", (), (), dtype="int64"),
    ),
)


class Recorder:
    """An inner rule that keeps what it was given and returns the global state."""

    name = "recorder"
    weighted = True
    needs_label_masks = False

    def __init__(self) -> None:
        self.calls: list[list[ClientUpdate]] = []

    def __call__(self, global_state, updates, spec, *, weighting="uniform", row_masks=None):
        self.calls.append(list(updates))
        return dict(global_state)


def glob(*w: float) -> dict[str, np.ndarray]:
    return {"w": np.array(w, np.float32), "n": np.array(7, np.int64)}


def upd(cid: str, *w: float, width: float = 1.0) -> ClientUpdate:
    state = {"w": np.array(w, np.float32), "n": np.array(3, np.int64)}
    return ClientUpdate(cid, state, 10, WidthSpec(width))


def sent(rec: Recorder, call: int = -1) -> dict[str, dict[str, np.ndarray]]:
    return {u.client_id: dict(u.state) for u in rec.calls[call]}


def test_choose_attackers_is_a_seeded_fifth_of_the_sorted_ids():
    ids = [f"c{i:02d}" for i in range(10)]
    got = choose_attackers(ids, 0.2, seed=5)
    expect = np.random.default_rng(5).choice(10, size=2, replace=False)
    assert got == frozenset(f"c{int(i):02d}" for i in expect) and len(got) == 2
    assert choose_attackers(list(reversed(ids)), 0.2, seed=5) == got  # order-independent
    assert choose_attackers(ids, 0.2, seed=5) == got  # deterministic
    assert len({choose_attackers(ids, 0.2, s) for s in range(6)}) > 1  # the seed matters
    assert choose_attackers(ids, 0.0, 5) == frozenset()
    assert len(choose_attackers(ids[:3], 0.2, 0)) == 1  # round(0.6) = 1
    with pytest.raises(ValueError, match="fraction"):
        choose_attackers(ids, 1.5, 0)


def test_sign_flip_reverses_and_scales_the_delta_of_attackers_only():
    rec = Recorder()
    rule = Attacked(rec, "sign_flip", frozenset({"b"}))
    honest = upd("a", 2, 2, 2, 2)
    rule(glob(1, 2, 3, 4), [honest, upd("b", 2, 0, 3, 4.5)], SPEC)
    out = sent(rec)
    assert rec.calls[0][0] is honest  # honest updates are passed as they are
    # g - 10 (x - g): 1 - 10*1, 2 - 10*(-2), 3 - 0, 4 - 10*0.5
    np.testing.assert_array_equal(out["b"]["w"], np.array([-9, 22, 3, -1], np.float32))
    assert out["b"]["w"].dtype == np.float32
    assert int(out["b"]["n"]) == 3  # integer entries are never corrupted
    # the honest delta norm is recorded: ||(1, 0, -1, -2)|| = sqrt(6)
    assert rule.honest_norms == [[pytest.approx(np.sqrt(6.0))]]


def test_sign_flip_on_a_half_width_slice_uses_the_global_prefix():
    rec = Recorder()
    Attacked(rec, "sign_flip", frozenset({"b"}), scale=2.0)(
        glob(1, 2, 3, 4), [upd("b", 0, 0, width=0.5)], SPEC
    )
    np.testing.assert_array_equal(sent(rec)["b"]["w"], [3, 6])  # g[:2] - 2 * (0 - g[:2])


def test_noise_adds_seeded_gaussian_draws_per_round_and_client():
    rec = Recorder()
    rule = Attacked(rec, "noise", frozenset({"b", "c"}), sigma=0.5, seed=11)
    ups = [upd("a", 1, 1, 1, 1), upd("b", 1, 2, 3, 4), upd("c", 0, 0, 0, 0)]
    rule(glob(0, 0, 0, 0), ups, SPEC)
    rule(glob(0, 0, 0, 0), ups, SPEC)
    for call in (0, 1):
        out = sent(rec, call)
        np.testing.assert_array_equal(out["a"]["w"], [1, 1, 1, 1])
        for no, (cid, x) in enumerate((("b", [1, 2, 3, 4]), ("c", [0, 0, 0, 0]))):
            draw = np.random.default_rng([11, call, no]).normal(0.0, 0.5, size=4)
            np.testing.assert_array_equal(out[cid]["w"], (np.array(x) + draw).astype(np.float32))
    assert not np.array_equal(sent(rec, 0)["b"]["w"], sent(rec, 1)["b"]["w"])  # fresh draws


def test_stale_replays_the_first_global_state_sliced_to_the_width():
    rec = Recorder()
    rule = Attacked(rec, "stale", frozenset({"b", "c"}))
    ups = [upd("a", 5, 5, 5, 5), upd("b", 6, 6, 6, 6), upd("c", 7, 7, width=0.5)]
    rule(glob(1, 2, 3, 4), ups, SPEC)
    rule(glob(9, 9, 9, 9), ups, SPEC)  # a later round: still the round-0 model
    for call in (0, 1):
        out = sent(rec, call)
        np.testing.assert_array_equal(out["a"]["w"], [5, 5, 5, 5])
        np.testing.assert_array_equal(out["b"]["w"], [1, 2, 3, 4])
        np.testing.assert_array_equal(out["c"]["w"], [1, 2])
    assert rule.rounds == 2


def test_none_passes_everything_and_the_wrapper_looks_like_its_inner_rule():
    rec = Recorder()
    rule = Attacked(rec, "none", frozenset({"b"}))
    ups = [upd("a", 1, 1, 1, 1), upd("b", 2, 2, 2, 2)]
    rule(glob(1, 1, 1, 1), ups, SPEC)
    np.testing.assert_array_equal(sent(rec)["b"]["w"], [2, 2, 2, 2])
    assert rule.honest_norms == [[0.0]]  # only the honest client "a"
    wrapped = Attacked(Median(), "none", frozenset())
    assert (wrapped.name, wrapped.weighted, wrapped.needs_label_masks) == ("median", False, False)
    assert Attacked(NormBounded(1.0), "none", frozenset()).weighted is True
    with pytest.raises(ValueError, match="attack"):
        Attacked(rec, "flip", frozenset())  # type: ignore[arg-type]
