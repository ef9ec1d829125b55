"""Turn a RunConfig into clients with real data: tasks, widths, own train/test tensors.

Deterministic for the config's seed: the same config always yields the same
clients, samples and splits (resume relies on this). A client of a loaded dataset holds
its images as an index into the one shared image array of its dataset
(:class:`ImageRows`), normalised when read, so a federation's memory grows with its
clients by their indices and labels only, never by copies of their images.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np
import torch

from fmtl_lightning.config import ConfigError, RunConfig
from fmtl_lightning.data import ImageDataset, load_dataset
from fmtl_lightning.errors import FederationError
from fmtl_lightning.federation import ClientSpec, federation_summary
from fmtl_lightning.partition import (
    partition_dirichlet,
    partition_iid,
    partition_shards,
    split_train_test,
    subsample,
)
from fmtl_lightning.tasks import get_task, inputs_domain, task_domain


@dataclass(frozen=True, eq=False)
class ImageRows:
    """Rows ``idx`` of one shared uint8 image array ``images`` ``(M, H, W)`` (a dataset
    split, shared by every client), turned into the model's input only when read
    (:func:`images_to_tensor` with ``mean``/``std``): a client holds an index, not images."""

    images: np.ndarray  # (M, H, W) uint8, shared
    idx: np.ndarray  # (N,) int64
    mean: float
    std: float

    def __len__(self) -> int:
        return int(self.idx.shape[0])

    def tensor(self) -> torch.Tensor:
        """float32 ``(N, 1, H, W)``, normalised: a fresh tensor on every call."""
        return images_to_tensor(self.images[self.idx], self.mean, self.std)


class _Inputs:
    """A client's ``x_train``/``x_test``: set to a tensor or to :class:`ImageRows`, read
    as a tensor (rows are normalised on each read; nothing is cached per client).

    Installed by :class:`_HeldInputs`, a base class of :class:`ClientData`: ``dataclasses``
    reads a field's default with ``getattr(cls, name)``, which :meth:`__get__` refuses, so
    the fields have none, but a type checker would count a descriptor assigned in the
    dataclass body as a default. ClientData annotates them with what they read as
    (``Tensor``); mypy types a no-default field's ``__init__`` parameter by that annotation,
    not by :meth:`__set__` (python/mypy#14868), so storing :class:`ImageRows` takes a cast."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, cls: type | None = None) -> torch.Tensor:
        if obj is None:  # a dataclass field without a default
            raise AttributeError(self.name)
        v = obj.__dict__[self.name]
        return v.tensor() if isinstance(v, ImageRows) else v

    def __set__(self, obj: Any, value: torch.Tensor | ImageRows) -> None:
        obj.__dict__[self.name] = value


class _HeldInputs:
    """The :class:`_Inputs` descriptors of :class:`ClientData`'s ``x_train``/``x_test``."""

    x_train = _Inputs()
    x_test = _Inputs()


@dataclass
class ClientData(_HeldInputs):
    """One client: identity, tasks, its max width, and its own train/test inputs
    (tensors, or :class:`ImageRows` of a shared image array: read as tensors)."""

    spec: ClientSpec
    lam: float | None
    x_train: torch.Tensor  # (N, 1, H, W) float32, normalised; stored: see _Inputs
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
        return len(self.__dict__["x_train"])

    @property
    def num_test(self) -> int:
        return len(self.__dict__["x_test"])

    def inputs(self, split: str) -> torch.Tensor | ImageRows:
        """The stored form of ``x_train``/``x_test`` (``split``: "train"/"test"): a
        tensor, or the :class:`ImageRows` it is read from."""
        return self.__dict__[f"x_{split}"]

    def replace(self, **changes: Any) -> ClientData:
        """A copy with ``changes`` (:func:`dataclasses.replace`) that keeps inputs stored
        as :class:`ImageRows` as such (``dataclasses.replace`` would read them as tensors)."""
        keep: dict[str, Any] = {
            f"x_{s}": self.inputs(s) for s in ("train", "test") if f"x_{s}" not in changes
        }
        return replace(self, **keep, **changes)


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
        domain = task_domain(g.tasks[0])
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


def images_to_tensor(images: np.ndarray, mean: float, std: float) -> torch.Tensor:
    """uint8 images ``(N, H, W)`` -> the model's input: float32 ``(N, 1, H, W)``,
    ``(images / 255 - mean) / std`` (``mean``/``std`` of the train split, 0..1 scale)."""
    x = (images.astype(np.float32) / 255.0 - mean) / std
    return torch.from_numpy(x[:, None, :, :].copy())  # (N, 1, H, W)


def _targets(tasks: tuple[str, ...], labels: np.ndarray) -> dict[str, torch.Tensor]:
    return {t: torch.from_numpy(np.asarray(get_task(t).targets(labels)).copy()) for t in tasks}


def _client(
    spec: ClientSpec,
    lam: float | None,
    train: ImageDataset,
    test: ImageDataset,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    edge: bool = False,
) -> ClientData:
    """Client ``spec``'s tensors: ``train_idx`` of ``train``, ``test_idx`` of ``test``
    (both normalised with the train split's constants), and the label masks of its
    multiclass tasks (the classes its training samples hold)."""
    y_tr = _targets(spec.tasks, train.labels[train_idx])
    held = {t: get_task(t).label_mask(y_tr[t].numpy()) for t in spec.tasks}
    masks = {t: torch.from_numpy(m) for t, m in held.items() if m is not None}
    # stored as ImageRows, read as tensors (_Inputs: mypy types the parameters as Tensor)
    x_tr = cast(torch.Tensor, ImageRows(train.images, np.asarray(train_idx), train.mean, train.std))
    x_te = cast(torch.Tensor, ImageRows(test.images, np.asarray(test_idx), train.mean, train.std))
    return ClientData(
        spec,
        lam,
        x_tr,
        y_tr,
        x_te,
        _targets(spec.tasks, test.labels[test_idx]),
        masks,
        edge,
    )


def build_federation(cfg: RunConfig) -> Federation:
    """Load each domain's train split once, partition it among that domain's clients
    (``data.factory``: the federation that factory builds for ``cfg``)."""
    if cfg.data.factory is not None:
        return federation_from_factory(cfg.data.factory, cfg)
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
            clients[i] = _client(spec, lam, ds, ds, tr, te, edge)
    if len(sizes) > 1:
        raise ConfigError(f"clients: domains with different image sizes {sorted(sizes)}")
    done = [c for c in clients if c is not None]
    summary = federation_summary([s for s in specs if s is not None], labels_by_domain)
    return Federation(done, sizes.pop(), summary, norms)


def federation_from_parts(
    train: ImageDataset,
    test: ImageDataset,
    tasks: Sequence[str],
    widths: Sequence[float],
    train_parts: Sequence[np.ndarray],
    test_parts: Sequence[np.ndarray],
) -> Federation:
    """Clients of one dataset from explicit sample indices, tested on its test split.

    Client ``i`` (id ``c{i:02d}``, every task of ``tasks``, width ``widths[i]``) trains on
    ``train_parts[i]`` of ``train`` and is tested on ``test_parts[i]`` of ``test`` (the
    same dataset's test split): the protocol of HeteroFL, whose clients share out the
    dataset's test set, where :func:`build_federation` holds out part of each client's own
    samples. Partition with :mod:`fmtl_lightning.partition` (e.g.
    :func:`~fmtl_lightning.partition.partition_by_held_classes` for the test split).
    A :class:`FederationError` names the client and the part that does not fit.
    """
    n = len(widths)
    if n < 1 or len(train_parts) != n or len(test_parts) != n:
        raise FederationError(
            f"one width, train part and test part per client: got {n} widths, "
            f"{len(train_parts)} train parts, {len(test_parts)} test parts"
        )
    if train.name != test.name or train.split != "train" or test.split != "test":
        raise FederationError(
            f"train and test must be the train and test splits of one dataset, got "
            f"{train.name}/{train.split} and {test.name}/{test.split}"
        )
    if train.images.shape[1:] != test.images.shape[1:]:
        raise FederationError(
            f"{train.name}: train images {train.images.shape[1:]} and test images "
            f"{test.images.shape[1:]} differ in size"
        )
    tasks = tuple(tasks)
    domain = task_domain(tasks[0]) if tasks else train.name
    clients = []
    for i, (w, tr, te) in enumerate(zip(widths, train_parts, test_parts, strict=True)):
        spec = ClientSpec(f"c{i:02d}", tasks, float(w), tr, np.array([], dtype=np.int64), domain)
        te = np.asarray(te)
        for split, idx, ds in (("train", spec.train_idx, train), ("test", te, test)):
            if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
                raise FederationError(
                    f"client {spec.client_id!r}: the {split} part must be a 1-D integer array, "
                    f"got dtype {idx.dtype} shape {idx.shape}"
                )
            if idx.size and (idx.min() < 0 or idx.max() >= len(ds)):
                raise FederationError(
                    f"client {spec.client_id!r}: {split} indices out of range for the "
                    f"{len(ds)} images of {ds.name}/{ds.split} (min {idx.min()}, max {idx.max()})"
                )
        clients.append(_client(spec, None, train, test, spec.train_idx, te.astype(np.int64)))
    specs = [c.spec for c in clients]
    summary = federation_summary(specs, {domain: train.labels}) + (
        f"\ntested on {sum(c.num_test for c in clients)} images of the "
        f"{len(test)}-image {test.name} test split, shared out among the clients"
    )
    return Federation(
        clients,
        int(train.images.shape[1]),
        summary,
        {domain: (float(train.mean), float(train.std))},
    )


def federation_from_tensors(
    train: Sequence[tuple[torch.Tensor, Mapping[str, torch.Tensor]]],
    test: Sequence[tuple[torch.Tensor, Mapping[str, torch.Tensor]]],
    widths: Sequence[float],
    *,
    normalisation: tuple[float, float] = (0.0, 1.0),
) -> Federation:
    """A federation of a user's own data: client ``i`` (id ``c{i:02d}``, width
    ``widths[i]``) trains on ``train[i] = (x, {task: y})`` and is tested on ``test[i]``.

    ``x`` may have any per-sample shape the model takes (float32, already normalised:
    ``normalisation`` records the (mean, std) used, for export); the tasks are registered
    :class:`~fmtl_lightning.tasks.Task` names (built-in or :func:`register_task`), ``y``
    their targets (multiclass: int64 ``(N,)``; multilabel/regression: float32 ``(N, n)``).
    A :class:`FederationError` names the client and what does not fit.
    """
    n = len(widths)
    if n < 1 or len(train) != n or len(test) != n:
        raise FederationError(f"one width, train set and test set per client: got {n} widths, "
                              f"{len(train)} train and {len(test)} test sets")  # fmt: skip
    clients, domains = [], set()
    for i, ((x, ys), (xt, yts), w) in enumerate(zip(train, test, widths, strict=True)):
        cid = f"c{i:02d}"
        tasks = tuple(ys)
        if not tasks or set(yts) != set(tasks):
            raise FederationError(f"client {cid}: train tasks {list(tasks)} and test tasks "
                                  f"{list(yts)} must be the same, at least one")  # fmt: skip
        for split, xx, yy in (("train", x, ys), ("test", xt, yts)):
            if xx.dtype != torch.float32 or xx.shape[1:] != x.shape[1:]:
                raise FederationError(f"client {cid}: {split} x must be float32 of per-sample "
                                      f"shape {tuple(x.shape[1:])}, got {xx.dtype} "
                                      f"{tuple(xx.shape)}")  # fmt: skip
            for t, y in yy.items():
                if len(y) != len(xx):
                    raise FederationError(f"client {cid}: {split} targets of {t!r} have "
                                          f"{len(y)} rows, x has {len(xx)}")  # fmt: skip
        masks = {}
        for t in tasks:
            m = get_task(t).label_mask(ys[t].numpy())
            if m is not None:
                masks[t] = torch.from_numpy(m)
        domain = inputs_domain(tasks)
        domains.add(domain)
        spec = ClientSpec(cid, tasks, float(w), np.arange(len(x)),
                          np.arange(len(x), len(x) + len(xt)), domain)  # fmt: skip
        clients.append(ClientData(spec, None, x, dict(ys), xt, dict(yts), masks))
    summary = f"{n} clients of own data ({domain})"
    return Federation(
        clients,
        int(x.shape[-1]),
        summary,
        {domain: cast(tuple[float, float], tuple(map(float, normalisation)))},
    )


def federation_from_factory(path: str, cfg: RunConfig) -> Federation:
    """The federation ``data.factory`` (``"package.module:callable"`` taking the
    RunConfig) builds for ``cfg``, checked to hold the config's clients in order."""
    from fmtl_lightning.config.factory import call_factory, import_factory

    fed = call_factory(import_factory(path, "data.factory"), path, "data.factory", cfg)
    if not isinstance(fed, Federation):
        raise ConfigError(f"data.factory: {path!r} must return a Federation, "
                          f"got {type(fed).__name__}")  # fmt: skip
    groups = [g for g in cfg.clients for _ in range(g.count)]
    want = [(tuple(g.tasks), float(g.width)) for g in groups]
    got = [(c.tasks, float(c.width)) for c in fed.clients]
    if got != want:
        raise ConfigError(f"data.factory: {path!r} gave clients (tasks, width) {got[:4]}..., "
                          f"the config's clients are {want[:4]}...")  # fmt: skip
    # the config says which clients run on the edge runtime and their Ditto lambdas
    clients = [c.replace(edge=g.edge, lam=g.lam) for c, g in zip(fed.clients, groups, strict=True)]
    return replace(fed, clients=clients)
