"""Client algorithms as objects: one file each, one registry.

* :mod:`.base`: :class:`Algorithm` (what it sends, its local phases, how a client is
  evaluated), :class:`Phase`, the contexts passed to it and the shared steps;
* one file per algorithm: ``local``, ``fedavg``, ``fedper``, ``fedrep``, ``ditto``,
  ``fedbabu``, ``fedavg_ft``;
* :mod:`.registry`: ``ALGORITHMS`` / :func:`get_algorithm` / :func:`register`.

``get_algorithm(name).evaluates_personal`` says whether a client is evaluated (and
exported) with its personal model or with the global shared state + its local state.
Importing this package needs no torch.
"""

from fmtl_lightning.algorithms.base import (
    UNION_HEAD,
    Algorithm,
    ClientResult,
    ClientRound,
    FitContext,
    Phase,
    load_for_eval,
)
from fmtl_lightning.algorithms.registry import (
    ALGORITHMS,
    AlgorithmError,
    get_algorithm,
    register,
    unregister,
)

__all__ = [
    "ALGORITHMS",
    "UNION_HEAD",
    "Algorithm",
    "AlgorithmError",
    "ClientResult",
    "ClientRound",
    "FitContext",
    "Phase",
    "get_algorithm",
    "load_for_eval",
    "register",
    "unregister",
]
