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

from typing import Any

from fmtl_lightning.aggregators.base import AggregationRule, AggregatorParamError, RowMasks
from fmtl_lightning.aggregators.mean import LabelSplit, Mean
from fmtl_lightning.aggregators.median import Median, aggregate_median
from fmtl_lightning.aggregators.norm_bounded import NormBounded, aggregate_norm_bounded
from fmtl_lightning.aggregators.trimmed_mean import TrimmedMean, aggregate_trimmed_mean

AGGREGATORS: dict[str, type[Any]] = {
    cls.name: cls for cls in (Mean, LabelSplit, Median, TrimmedMean, NormBounded)
}


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
    "is_aggregator",
]
