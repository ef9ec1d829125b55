"""A small seeded hostile sweep per surface (the full one: ``python -m tests.hostile.sweep``).

Every hostile input is refused with the project's typed error or works, and nothing is
accepted wrongly, crashes or is silently wrong (see :mod:`tests.hostile.core`).
"""

from __future__ import annotations

import pytest

from tests.hostile.core import BAD, OUTCOMES
from tests.hostile.sweep import grouped, run_surface

SEED = 16


def _check(cases) -> None:
    bad = [c for c in cases if c.outcome in BAD]
    report = "\n".join(
        f"{o} x{len(g)}: {g[0].mutation}: {g[0].detail}" for (_, o, _), g in grouped(bad).items()
    )
    assert not bad, f"{len(bad)} of {len(cases)} hostile inputs went wrong:\n{report}"
    seen = {o for o in OUTCOMES if any(c.outcome == o for c in cases)}
    assert {"ok", "refused"} <= seen  # both paths exercised: valid controls and refusals


@pytest.mark.parametrize("surface,n", [("updates", 60), ("replies", 40), ("configs", 40)])
def test_hostile_inputs_are_refused_or_work(surface, n, tmp_path):
    # configs: one accepted mutated config is also run for a round (accepted == runs)
    cases = run_surface(surface, n, SEED, tmp_path, log=lambda s: None, runs=1, run_timeout=20)
    _check(cases)
    if surface == "configs":
        assert [c.outcome for c in cases if c.mutation.startswith("run 1 round")] == ["ok"]


def test_hostile_edge_inputs_and_bundles_are_refused_or_work(tmp_path):
    cases = run_surface("edge", 40, SEED, tmp_path, log=lambda s: None, tasks=("digits/digit",))
    _check(cases)
