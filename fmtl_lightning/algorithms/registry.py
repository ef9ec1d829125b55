"""The one registry of client algorithms: ``algorithm.name`` -> its object.

Adding an algorithm is its file plus one :func:`register` call (here for the built-in
ones; anywhere before the config is parsed for others). The config validator's
choices and checks (which algorithms edge clients run, which have a shared head for
the label split) are read from the registered objects.
"""

from __future__ import annotations

from fmtl_lightning.algorithms.base import Algorithm
from fmtl_lightning.algorithms.ditto import Ditto
from fmtl_lightning.algorithms.fedavg import FedAvg
from fmtl_lightning.algorithms.fedavg_ft import FedAvgFT
from fmtl_lightning.algorithms.fedbabu import FedBABU
from fmtl_lightning.algorithms.fedper import FedPer
from fmtl_lightning.algorithms.fedrep import FedRep
from fmtl_lightning.algorithms.local import Local
from fmtl_lightning.errors import FMTLError


class AlgorithmError(FMTLError, ValueError):
    """An unknown algorithm name, or a registration that would clash."""


ALGORITHMS: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
    """Add ``algorithm`` under its ``name``; a name already taken is an error."""
    name = getattr(algorithm, "name", None)
    if not isinstance(algorithm, Algorithm) or not isinstance(name, str) or not name:
        raise AlgorithmError(f"{algorithm!r} is not an Algorithm with a name")
    if name in ALGORITHMS:
        raise AlgorithmError(f"algorithm {name!r} is already registered")
    ALGORITHMS[name] = algorithm
    return algorithm


def unregister(name: str) -> None:
    """Remove ``name`` (tests that register a throw-away algorithm)."""
    ALGORITHMS.pop(name, None)


def get_algorithm(name: str) -> Algorithm:
    """The registered algorithm called ``name``; the error lists the registered ones."""
    try:
        return ALGORITHMS[name]
    except (KeyError, TypeError):
        raise AlgorithmError(
            f"algorithm.name: {name!r} is not a registered algorithm "
            f"(registered: {sorted(ALGORITHMS)})"
        ) from None


for _alg in (Local(), FedAvg(), FedPer(), FedRep(), Ditto(), FedBABU(), FedAvgFT()):
    register(_alg)
