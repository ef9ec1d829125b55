"""Whatever the validator accepts runs end to end; whatever it refuses names the fields.

The factors are every config field that changes which code runs (``combos.FACTORS``).
Their full product has 61,440 members; the validator is asked about each of them, and
a pairwise covering set of the accepted ones (every pair of factor values that can
appear together appears in at least one run) is run through ``runner.run_combination``:
two rounds, kill after round 1 + resume == straight, export, ONNX Runtime predict ==
torch, one exported SGD step == torch.optim.SGD.
"""

from __future__ import annotations

import functools
import itertools
import re
from typing import Any

import pytest

from fmtl_lightning.config import ConfigError, parse_config
from tests.matrix.combos import FACTORS, all_pairs, config_of, covering_set
from tests.matrix.runner import run_combination

FIELD = re.compile(r"^(clients\[\d+\]\.\w+|[a-z_]+(\.[a-z_]+)+)(/[a-z_]+)*: ")


@functools.cache
def verdicts() -> dict[tuple, str | None]:
    """Every member of the full product -> None (accepted) or the validator's message."""
    out: dict[tuple, str | None] = {}
    for vals in itertools.product(*FACTORS.values()):
        combo = dict(zip(FACTORS, vals, strict=True))
        try:
            parse_config(config_of(combo))
            out[vals] = None
        except ConfigError as exc:
            out[vals] = str(exc)
    return out


def _accepts(combo: dict[str, Any]) -> bool:
    return verdicts()[tuple(combo.values())] is None


COMBOS = covering_set(FACTORS, _accepts)


def _id(c: dict[str, Any]) -> str:
    short = {True: "T", False: "F"}
    return "-".join(str(short.get(v, v)) for v in c.values())


def test_the_covering_set_holds_every_accepted_pair():
    accepted = [dict(zip(FACTORS, v, strict=True)) for v, m in verdicts().items() if m is None]
    assert all_pairs(COMBOS) == all_pairs(accepted)
    assert 20 <= len(COMBOS) <= 40, len(COMBOS)  # the runtime budget of make test


def test_every_refused_combination_names_the_fields():
    refused = {v: m for v, m in verdicts().items() if m is not None}
    assert refused, "the validator refuses nothing: the edge/label-split limits are gone?"
    for vals, msg in refused.items():
        assert FIELD.match(msg), (dict(zip(FACTORS, vals, strict=True)), msg)
        assert "\n" not in msg


@pytest.mark.parametrize("combo", COMBOS, ids=_id)
def test_accepted_combination_runs_end_to_end(combo, tmp_path):
    cfg = parse_config(config_of(combo))
    done = run_combination(cfg, tmp_path)
    assert done["predict"]  # every task of the exported client was compared
