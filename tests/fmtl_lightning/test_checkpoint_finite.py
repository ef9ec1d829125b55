"""The checkpoint writer never writes a global state a run could not resume from."""

from __future__ import annotations

import numpy as np
import pytest

from fmtl_lightning.checkpoint import CheckpointError, completed_rounds, read_round, write_round


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_global_state_is_refused_and_nothing_is_written(tmp_path, bad):
    good = {"a": np.ones(3, np.float32), "n": np.array(4, np.int64)}
    write_round(tmp_path, 1, good, {}, {"round": 1}, "round\n")
    g = {**good, "b": np.array([[0.0, bad]], np.float32)}
    with pytest.raises(CheckpointError, match=r"round 2: global key 'b' holds non-finite"):
        write_round(tmp_path, 2, g, {}, {"round": 2}, "round\n")
    assert completed_rounds(tmp_path) == [1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round_0001"]
    np.testing.assert_array_equal(read_round(tmp_path, 1)[0]["a"], good["a"])
