"""Turn a RunConfig into clients with real data: tasks, widths, own train/test tensors.

Deterministic for the config's seed: the same config always yields the same
clients, samples and splits (resume relies on this).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fmtl_lightning.config import ConfigError, RunConfig
from fmtl_lightning.data import load_dataset
from fmtl_lightning.federation import ClientSpec, federation_summary
from fmtl_lightning.partition import (
    partition_dirichlet,
    partition_iid,
    partition_shards,
    split_train_test,
    subsample,
)
from fmtl_lightning.tasks import get_task


@dataclass
class ClientData:
    """One client: identity, tasks, its max width, and its own train/test tensors."""

    spec: ClientSpec
    lam: float | None
    x_train: torch.Tensor  # (N, 1, H, W) float32, normalised
    y_train: dict[str, torch.Tensor]  # task -> (N,) int64 or (N, n) float32
    x_test: torch.Tensor
    y_test: dict[str, torch.Tensor]
    label_masks: dict[str, torch.Tensor]  # multiclass task -> (n,) bool: classes seen
    edge: bool = False  # trains through the edge runtime

    @property
    def cid(self) -> str:
        return self.spec.client_id

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.spec.tasks

    @property
    def width(self) -> float:
        return self.spec.width

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])


@dataclass
class Federation:
    clients: list[ClientData]
    image_size: int
    summary: str
    normalisation: dict[str, tuple[float, float]]  # domain -> (mean, std) on the 0..1 scale

    def task_outputs(self) -> dict[str, int]:
        """Every task any client holds -> its output size, in first-seen order."""
        out: dict[str, int] = {}
        for c in self.clients:
            for t in c.tasks:
                out.setdefault(t, get_task(t).num_outputs)
        return out


def _expand(
    cfg: RunConfig,
) -> Iterator[tuple[str, tuple[str, ...], float, float | None, str, bool]]:
    i = 0
    for g in cfg.clients:
        domain = get_task(g.tasks[0]).domain
        for _ in range(g.count):
            yield f"c{i:02d}", tuple(g.tasks), g.width, g.lam, domain, g.edge
            i += 1


def _partition(labels: np.ndarray, pool: np.ndarray, n: int, cfg: RunConfig, seed: int):
    p = cfg.data.partition
    if p.kind == "iid":
        return partition_iid(labels, n, seed, indices=pool)
    if p.kind == "dirichlet":
        return partition_dirichlet(labels, n, p.alpha, seed, min_size=4, indices=pool)
    return partition_shards(labels, n, p.classes_per_client, seed, indices=pool)


def _to_x(images: np.ndarray, mean: float, std: float) -> torch.Tensor:
    x = (images.astype(np.float32) / 255.0 - mean) / std
    return torch.from_numpy(x[:, None, :, :].copy())  # (N, 1, H, W)


def _targets(tasks: tuple[str, ...], labels: np.ndarray) -> dict[str, torch.Tensor]:
    return {t: torch.from_numpy(np.asarray(get_task(t).target(labels)).copy()) for t in tasks}


def build_federation(cfg: RunConfig) -> Federation:
    """Load each domain's train split once, partition it among that domain's clients."""
    members = list(_expand(cfg))
    by_domain: dict[str, list[int]] = {}
    for i, m in enumerate(members):
        by_domain.setdefault(m[4], []).append(i)
    clients: list[ClientData | None] = [None] * len(members)
    sizes = set()
    labels_by_domain = {}
    norms: dict[str, tuple[float, float]] = {}
    specs: list[ClientSpec | None] = [None] * len(members)
    for d_i, (domain, idxs) in enumerate(sorted(by_domain.items())):
        ds = load_dataset(domain, "train", cfg.data.data_dir)
        sizes.add(ds.images.shape[1])
        labels_by_domain[domain] = ds.labels
        norms[domain] = (float(ds.mean), float(ds.std))
        need = len(idxs) * cfg.data.samples_per_client
        if need > len(ds):
            raise ConfigError(
                f"data.samples_per_client: {len(idxs)} {domain} clients x "
                f"{cfg.data.samples_per_client} samples exceed the {len(ds)} available"
            )
        seed = cfg.seed * 1000 + d_i
        pool = subsample(ds.labels, need, seed)
        parts = _partition(ds.labels, pool, len(idxs), cfg, seed + 1)
        for j, (i, part) in enumerate(zip(idxs, parts, strict=True)):
            cid, tasks, width, lam, _, edge = members[i]
            if part.size < 4:
                raise ConfigError(f"clients: {cid} got {part.size} samples from the partition")
            tr, te = split_train_test(part, cfg.data.test_fraction, seed + 2 + j, labels=ds.labels)
            spec = ClientSpec(cid, tasks, width, tr, te, domain)
            specs[i] = spec
            y_tr = _targets(tasks, ds.labels[tr])
            masks = {
                t: torch.from_numpy(np.isin(np.arange(get_task(t).num_outputs), y_tr[t].numpy()))
                for t in tasks
                if get_task(t).kind == "multiclass"
            }
            clients[i] = ClientData(
                spec,
                lam,
                _to_x(ds.images[tr], ds.mean, ds.std),
                y_tr,
                _to_x(ds.images[te], ds.mean, ds.std),
                _targets(tasks, ds.labels[te]),
                masks,
                edge,
            )
    if len(sizes) > 1:
        raise ConfigError(f"clients: domains with different image sizes {sorted(sizes)}")
    done = [c for c in clients if c is not None]
    summary = federation_summary([s for s in specs if s is not None], labels_by_domain)
    return Federation(done, sizes.pop(), summary, norms)
