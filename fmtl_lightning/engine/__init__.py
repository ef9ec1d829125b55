"""The server engine: the server logic of a federated run, written once for every transport.

* :mod:`~fmtl_lightning.engine.plan` - the run as the server sees it (clients, roles,
  initial model), from the config alone or from a loaded federation
* :mod:`~fmtl_lightning.engine.seeds` - every seeded stream (sampling, widths, batches)
* :mod:`~fmtl_lightning.engine.core` - :class:`ServerEngine`: sampling, the width plan,
  slices, reply validation, aggregation, the state update, checkpoints and resume
* :mod:`~fmtl_lightning.engine.metrics` - metric rows, ``metrics.csv``, the run summary

Transports are thin adapters over it: :class:`~fmtl_lightning.simulation.Simulation`
(in-process) and :class:`~fmtl_lightning.deploy.strategy.FMTLStrategy` with the
ServerApp (a Flower SuperLink, or Flower's simulation engine). Pure numpy at import.
"""

from fmtl_lightning.engine.core import Assignment, ReplyRejected, ServerEngine
from fmtl_lightning.engine.plan import PlannedClient, ServerPlan, server_plan

__all__ = [
    "Assignment",
    "PlannedClient",
    "ReplyRejected",
    "ServerEngine",
    "ServerPlan",
    "server_plan",
]
