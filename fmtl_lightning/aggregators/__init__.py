"""Server-side aggregators: one registry, keyed by the name ``algorithm.aggregator`` uses.

=================  ==========================  ====================================
name               parameters                  rule
=================  ==========================  ====================================
``mean``           none                        mean over holders (uniform/examples)
``label_split``    none                        mean; head rows over their label holders
``median``         none                        coordinate-wise median over holders
``trimmed_mean``   ``beta`` (0.2), in [0, .5)  drop floor(beta*n) from each end, mean
``norm_bounded``   ``clip_norm`` (required)    clip each client's delta, then mean
=================  ==========================  ====================================

Each is a frozen dataclass (its fields are its parameters) satisfying
:class:`~fmtl_lightning.aggregators.base.AggregationRule`; the module of each says its
rule. The config parser and validator derive everything from :data:`AGGREGATORS`
(names, parameters, ``weighted``, ``needs_label_masks``), and so do the transports
(the in-process simulation, the Flower strategy). Adding an aggregator is one new
module plus one line in :data:`AGGREGATORS`.

Pure numpy: importing this package never imports torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fmtl_lightning.aggregators.base import AggregationRule, AggregatorParamError, RowMasks
from fmtl_lightning.aggregators.mean import LabelSplit, Mean
from fmtl_lightning.aggregators.median import Median, aggregate_median
from fmtl_lightning.aggregators.norm_bounded import NormBounded, aggregate_norm_bounded
from fmtl_lightning.aggregators.trimmed_mean import TrimmedMean, aggregate_trimmed_mean

AGGREGATORS: dict[str, type[Any]] = {
    cls.name: cls for cls in (Mean, LabelSplit, Median, TrimmedMean, NormBounded)
}


def build_aggregator(value: str | Mapping[str, Any]) -> AggregationRule:
    """A registered aggregator from its config form: a name, or a mapping of ``name`` and
    that aggregator's parameters. Raises :class:`AggregatorParamError` naming the field
    (``name`` or the parameter; empty when the value is neither form)."""
    raw = {"name": value} if isinstance(value, str) else value
    if not isinstance(raw, Mapping):
        raise AggregatorParamError(
            "", f"expected an aggregator name or a mapping with 'name', got {value!r}"
        )
    params = dict(raw)
    if "name" not in params:
        raise AggregatorParamError("name", f"required (registered: {sorted(AGGREGATORS)})")
    name = params.pop("name")
    cls = AGGREGATORS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise AggregatorParamError(
            "name", f"unknown aggregator {name!r} (registered: {sorted(AGGREGATORS)})"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for p in sorted(params, key=str):
        if not isinstance(p, str) or p not in fields:
            raise AggregatorParamError(str(p), f"not a parameter of the {name} aggregator "
                                       f"(its parameters: {sorted(fields)})")  # fmt: skip
    for f in fields.values():
        if f.name not in params and f.default is dataclasses.MISSING:
            raise AggregatorParamError(f.name, f"required by the {name} aggregator")
    rule: AggregationRule = cls(**params)
    return rule


def is_aggregator(obj: object) -> bool:
    """True for an instance of a registered aggregator."""
    name = getattr(type(obj), "name", None)
    return isinstance(name, str) and AGGREGATORS.get(name) is type(obj)


__all__ = [
    "AGGREGATORS",
    "AggregationRule",
    "AggregatorParamError",
    "LabelSplit",
    "Mean",
    "Median",
    "NormBounded",
    "RowMasks",
    "TrimmedMean",
    "aggregate_median",
    "aggregate_norm_bounded",
    "aggregate_trimmed_mean",
    "build_aggregator",
    "is_aggregator",
]
