"""Parameter roles, width rules and their serialisation."""

from __future__ import annotations

import numpy as np
import pytest

from fmtl_lightning.errors import SpecError, WidthError
from fmtl_lightning.roles import ModelSpec, ParamSpec, WidthSpec, channels_at


@pytest.mark.parametrize(
    "full,width,want",
    [(32, 1.0, 32), (32, 0.5, 16), (32, 1 / 16, 2), (10, 0.25, 3), (30, 0.1, 3), (3, 1 / 16, 1)],
)
def test_channels_at_is_ceil_and_at_least_one(full, width, want):
    assert channels_at(full, width) == want


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan")])
def test_width_outside_unit_interval_is_rejected(bad):
    with pytest.raises(WidthError, match="width"):
        WidthSpec(bad)


def test_spec_rejects_axis_size_mismatch_and_unknown_group():
    with pytest.raises(SpecError, match="group 'h' has 4"):
        ModelSpec(groups={"h": 4}, params=(ParamSpec("w", "backbone", (5,), ("h",)),))
    with pytest.raises(SpecError, match="not a declared group"):
        ModelSpec(groups={}, params=(ParamSpec("w", "backbone", (5,), ("h",)),))
    with pytest.raises(SpecError, match="integer"):
        ParamSpec("n", "counter", (4,), ("h",), dtype="int64")


def test_policies_split_shared_and_local_by_kind():
    spec = ModelSpec(
        groups={"h": 2},
        params=(
            ParamSpec("conv", "backbone", (2,), ("h",)),
            ParamSpec("bn.w", "norm", (2,), ("h",)),
            ParamSpec("bn.rm", "norm_stat", (2,), ("h",)),
            ParamSpec("head", "head", (3, 2), (None, "h")),
        ),
    )
    assert spec.with_policy("fedper").shared_keys() == ("conv", "bn.w", "bn.rm")
    assert spec.with_policy("fedbn").shared_keys() == ("conv",)
    assert spec.with_policy("fedbn").local_keys() == ("bn.w", "bn.rm", "head")
    assert spec.with_policy("fedavg").local_keys() == ()
    assert spec.with_policy("local").shared_keys() == ()
    back = ModelSpec.from_json(spec.with_policy("fedbn").to_json())
    assert back == spec.with_policy("fedbn")


def test_spec_json_rejects_unknown_version():
    spec = ModelSpec(groups={}, params=(ParamSpec("v", "backbone", (3,), (None,)),))
    text = spec.to_json().replace('"format_version": 1', '"format_version": 99')
    with pytest.raises(SpecError, match="format_version"):
        ModelSpec.from_json(text)
    with pytest.raises(SpecError, match="malformed"):
        ModelSpec.from_json('{"format_version": 1}')


def test_runs_cover_exactly_the_indices():
    for t in range(0, 20):
        for r in (0.25, 0.5, 0.75, 1.0):
            ws = WidthSpec(r, "fedrolex", t)
            covered = np.concatenate([np.arange(a, b) for a, b, _ in ws.runs(8)])
            np.testing.assert_array_equal(covered, ws.indices(8))
