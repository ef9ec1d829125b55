"""HeteroFL's label split: :func:`aggregate`, with each output row of a classifier
averaged only over the clients that hold its label. Pure numpy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fmtl_lightning.aggregation.streaming import aggregate
from fmtl_lightning.aggregation.update import ClientUpdate, Weighting
from fmtl_lightning.errors import StateValidationError
from fmtl_lightning.roles import ModelSpec


def aggregate_label_split(
    global_state: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    spec: ModelSpec,
    row_masks: Mapping[str, Mapping[str, np.ndarray]],
    *,
    weighting: Weighting = "uniform",
) -> dict[str, np.ndarray]:
    """:func:`aggregate`, with HeteroFL's label split on output rows.

    ``row_masks[client_id][key]`` is a boolean vector over the rows (dim 0) of ``key``,
    e.g. a classifier's output classes: ``True`` where the client holds the label.
    Each such row is averaged only over the clients that hold it (HeteroFL's server,
    for clients trained with masked cross-entropy); a row no client holds keeps its
    global value. Clients or keys absent from ``row_masks`` hold every row. Every other
    entry is aggregated exactly as :func:`aggregate` does.
    """
    new = aggregate(global_state, updates, spec, weighting=weighting)
    ids = {u.client_id for u in updates}
    for cid in row_masks:
        if cid not in ids:
            raise StateValidationError("row mask for a client without an update", client=cid)
    row_keys = sorted({k for m in row_masks.values() for k in m})
    for key in row_keys:
        p = spec[key] if key in spec.keys else None
        if p is None or key not in new or not p.shape or p.axes[0] is not None:
            raise StateValidationError(
                "label split needs an aggregated entry whose rows are not width-scaled",
                key=key,
            )
        n_rows = p.shape[0]
        holds = np.ones((len(updates), n_rows), dtype=bool)
        for i, u in enumerate(updates):
            m = row_masks.get(u.client_id, {}).get(key)
            if m is None:
                continue
            m = np.asarray(m)
            if m.dtype != np.bool_ or m.shape != (n_rows,):
                raise StateValidationError(
                    f"row mask must be a bool vector of {n_rows} rows, got {m.dtype} {m.shape}",
                    client=u.client_id,
                    key=key,
                )
            holds[i] = m
        if holds.all():
            continue
        by_holders: dict[tuple[int, ...], list[int]] = {}
        for r in range(n_rows):
            by_holders.setdefault(tuple(np.flatnonzero(holds[:, r])), []).append(r)
        out = new[key]
        for holders, rows in by_holders.items():
            if not holders:
                out[rows] = global_state[key][rows]
            elif len(holders) < len(updates):
                sub = [
                    ClientUpdate(u.client_id, {key: u.state[key]}, u.num_examples, u.width)
                    for u in (updates[i] for i in holders)
                ]
                avg = aggregate(global_state, sub, spec, weighting=weighting, keys=[key])
                out[rows] = avg[key][rows]
    return new
