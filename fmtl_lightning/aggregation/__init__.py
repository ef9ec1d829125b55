"""Aggregation of client states into a new global state: pure numpy, no I/O.

``aggregate(global_state, updates, spec)`` averages every entry over the clients
that hold it (HeteroFL), uniformly (as in the HeteroFL authors' code) or weighted
by sample count. Entries nobody holds keep their value. Plain FedAvg is the case
where every client is at width 1. The server's choice of rule (this mean, the label
split below, median, trimmed mean, norm-bounded mean) is :mod:`fmtl_lightning.aggregators`.

Memory stays bounded: one running weighted sum per entry (plus a per-element
weight array only for entries that some client held partially), never a stack
of K client copies. :class:`Aggregator` takes clients one at a time, so a server
can fold updates in as they arrive.

Speed: sums are folded in blocks of rows
(:data:`~fmtl_lightning.aggregation.streaming.BLOCK` elements) so that a block of the
running sum, and the scratch buffer for ``weight * x``, stay in cache while the
clients' arrays stream through once; no temporary arrays.

No finite input can make a sum overflow: values are bounded (``|x| <=
sqrt(finfo(dtype).max)``, :func:`~fmtl_lightning.validation.max_abs`), sample
counts too (:data:`MAX_EXAMPLES`), and when the total weight of a round could let
a sum of bounded values overflow, the weights are scaled to sum to 1 first (a
convex combination never exceeds its largest value). An input that takes an
average past the bound (or makes a sum overflow) raises :class:`StateValidationError`
naming the client; the new global state is always finite and within the bound.

This package's namespace is the public API; its modules own the parts:
:mod:`~fmtl_lightning.aggregation.update` (:class:`ClientUpdate`, weights, integer
entries), :mod:`~fmtl_lightning.aggregation.streaming` (:class:`Aggregator`,
:func:`aggregate`) and :mod:`~fmtl_lightning.aggregation.label_split`.
"""

from __future__ import annotations

from fmtl_lightning.aggregation.label_split import aggregate_label_split
from fmtl_lightning.aggregation.streaming import Aggregator, aggregate
from fmtl_lightning.aggregation.update import (
    MAX_EXAMPLES,
    ClientUpdate,
    Weighting,
    client_weight,
    fold_ints,
)

__all__ = [
    "MAX_EXAMPLES",
    "Aggregator",
    "ClientUpdate",
    "Weighting",
    "aggregate",
    "aggregate_label_split",
    "client_weight",
    "fold_ints",
]
