"""Real image datasets, offline: cached MNIST / Fashion-MNIST and scikit-learn digits.

Loading lives in :mod:`.datasets`; fetching into the cache in :mod:`.fetch`
(``python -m fmtl_lightning.data.fetch --all``), imported lazily here so that running
it with ``-m`` does not import it twice. PFLlib's federations (merged train+test, their
Dirichlet and pathological splits, draw for draw) are in :mod:`.pfllib`.
"""

from __future__ import annotations

from typing import Any

from fmtl_lightning.data.datasets import (
    DATA_DIR_ENV,
    DATASET_NAMES,
    ImageDataset,
    default_data_dir,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    resolve_data_dir,
)

__all__ = [
    "DATASET_NAMES",
    "DATA_DIR_ENV",
    "ImageDataset",
    "default_data_dir",
    "fetch_datasets",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "resolve_data_dir",
]


def __getattr__(name: str) -> Any:
    if name == "fetch_datasets":
        from fmtl_lightning.data.fetch import fetch_datasets

        return fetch_datasets
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
