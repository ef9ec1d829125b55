"""One seeded kill -9 moment of a real ``fmtl simulate`` (the full sweep: kill_sweep.py)."""

from __future__ import annotations

from tests.hostile.kill_sweep import sweep


def test_killed_at_random_moments_resumes_identically(tmp_path):
    res = sweep(1, seed=11, work=tmp_path)
    assert set(res) == {"identical"}, res
