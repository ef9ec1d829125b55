"""The layout of a federation: which client holds which samples, tasks and backbone width.

Owns :class:`ClientSpec` (validated on construction) and :func:`federation_summary`, the
fixed-width table printed before a run so a person can see the non-IID split at a glance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fmtl_lightning.errors import FederationError
from fmtl_lightning.tasks import get_task


def _as_index_array(client_id: str, field: str, value: np.ndarray) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise FederationError(
            f"client {client_id!r}: {field} must be a 1-D integer array, got dtype "
            f"{array.dtype} shape {array.shape}"
        )
    array = array.astype(np.int64)
    array.flags.writeable = False
    return array


@dataclass(frozen=True, eq=False)
class ClientSpec:
    """One client: its tasks (all on ``domain``; a task without one, on the user's own
    data, fits any), backbone width in (0, 1], sample indices.

    ``train_idx``/``test_idx`` index the labels of ``domain``'s dataset and must not overlap.
    """

    client_id: str
    tasks: tuple[str, ...]
    width: float
    train_idx: np.ndarray  # (n_train,) int64
    test_idx: np.ndarray  # (n_test,) int64
    domain: str

    def __post_init__(self) -> None:
        if not isinstance(self.width, (int, float, np.floating)) or not 0 < self.width <= 1:
            raise FederationError(
                f"client {self.client_id!r}: width must lie in (0, 1], got {self.width!r}"
            )
        if not self.tasks:
            raise FederationError(f"client {self.client_id!r}: needs at least one task")
        object.__setattr__(self, "tasks", tuple(self.tasks))
        # a task without a domain (a user's own data) fits any; the others must all match
        domains = {name: get_task(name).domain for name in self.tasks}
        if set(domains.values()) - {None} - {self.domain}:
            raise FederationError(
                f"client {self.client_id!r}: all tasks must be on domain {self.domain!r}, "
                f"got tasks {domains}"
            )
        for field in ("train_idx", "test_idx"):
            value = _as_index_array(self.client_id, field, getattr(self, field))
            object.__setattr__(self, field, value)
        overlap = np.intersect1d(self.train_idx, self.test_idx)
        if overlap.size:
            raise FederationError(
                f"client {self.client_id!r}: {overlap.size} indices are in both train_idx and "
                f"test_idx, e.g. {overlap[:5].tolist()}"
            )


def _histogram(labels: np.ndarray, idx: np.ndarray) -> str:
    """Compact per-class counts of ``labels[idx]``, nonzero classes only: "0:12 3:40"."""
    classes, counts = np.unique(labels[idx], return_counts=True)
    return " ".join(f"{c}:{n}" for c, n in zip(classes.tolist(), counts.tolist(), strict=True))


def _check_indices(client: ClientSpec, labels: np.ndarray) -> None:
    for field in ("train_idx", "test_idx"):
        idx = getattr(client, field)
        if idx.size and (idx.min() < 0 or idx.max() >= len(labels)):
            raise FederationError(
                f"client {client.client_id!r}: {field} out of range for the {len(labels)} "
                f"labels of domain {client.domain!r} (min {idx.min()}, max {idx.max()})"
            )


def federation_summary(
    clients: Sequence[ClientSpec], labels_by_domain: Mapping[str, np.ndarray]
) -> str:
    """A fixed-width table, one row per client, then a totals line.

    Columns: client, domain, width, tasks, n_train, n_test, and the train split's label
    histogram as ``class:count`` pairs (classes with no samples left out).
    """
    header = ("client", "domain", "width", "tasks", "n_train", "n_test", "train labels")
    rows = []
    for client in clients:
        if client.domain not in labels_by_domain:
            raise FederationError(
                f"client {client.client_id!r}: no labels given for domain {client.domain!r}; "
                f"labels_by_domain has {sorted(labels_by_domain)}"
            )
        labels = np.asarray(labels_by_domain[client.domain])
        _check_indices(client, labels)
        rows.append(
            (
                client.client_id,
                client.domain,
                f"{client.width:g}",
                ",".join(client.tasks),
                str(client.train_idx.size),
                str(client.test_idx.size),
                _histogram(labels, client.train_idx),
            )
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    right = {2, 4, 5}  # numbers are right-aligned

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells[:-1], widths, strict=True))
        ]
        return "  ".join([*padded, cells[-1]]).rstrip()

    n_train = sum(c.train_idx.size for c in clients)
    n_test = sum(c.test_idx.size for c in clients)
    lines = [line(header), *(line(r) for r in rows)]
    rule = "-" * max(len(text) for text in lines)
    body = [lines[0], rule, *lines[1:], rule]
    body.append(f"{len(clients)} clients, {n_train} train samples, {n_test} test samples")
    return "\n".join(body)
