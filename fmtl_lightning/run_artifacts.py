"""Read a run directory's artifacts: config, roles, checkpoint, normalisation. No data, no loop.

A run directory written by ``fmtl simulate`` holds everything a consumer of the
finished run (``fmtl export``, a report, a benchmark) needs::

    RUN/config.yaml          the RunConfig (clients, widths, tasks follow from it)
    RUN/spec.json            the ModelSpec (parameter roles)
    RUN/normalisation.json   per-domain input normalisation and the image size
    RUN/checkpoints/round_NNNN/   global + per-client arrays (fmtl_lightning.checkpoint)

:class:`RunArtifacts` reads them without building a simulation or loading a dataset.
What a client deploys at a width (:func:`deployed_state`: its personal model, or the
global state plus its local arrays) is written once here, and the simulation uses the
same function. Static batch-norm statistics are computed by the simulation after every
aggregation, so a round's checkpoint already holds the statistics of its weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fmtl_lightning.errors import FMTLError
from fmtl_lightning.roles import ModelSpec, WidthSpec
from fmtl_lightning.slicing import slice_state
from mobile_client.fileio import atomic_write_text

if TYPE_CHECKING:
    from fmtl_lightning.config import RunConfig
    from fmtl_lightning.engine.plan import ModelLayout, PlannedClient
    from fmtl_lightning.models import BackboneConfig, MultiTaskModel

NORMALISATION_FILE = "normalisation.json"


class RunArtifactsError(FMTLError, ValueError):
    """A run directory lacks an artifact, or one is malformed (the message names the file)."""


def evaluates_personal(algorithm: str) -> bool:
    """Whether ``algorithm`` evaluates (and deploys) a personal model (Ditto, local)."""
    from fmtl_lightning.algorithms import get_algorithm

    return get_algorithm(algorithm).evaluates_personal


@dataclass
class ClientStore:
    """What a client keeps between rounds, at full width (global coordinates)."""

    local: dict[str, np.ndarray] = field(default_factory=dict)
    personal: dict[str, np.ndarray] = field(default_factory=dict)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The checkpoint form: ``local/<key>`` and ``personal/<key>`` entries."""
        d = {f"local/{k}": v for k, v in self.local.items()}
        d.update({f"personal/{k}": v for k, v in self.personal.items()})
        return d

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> ClientStore:
        """Inverse of :meth:`to_arrays`."""
        return cls(
            {k[6:]: v for k, v in arrays.items() if k.startswith("local/")},
            {k[9:]: v for k, v in arrays.items() if k.startswith("personal/")},
        )


def deployed_state(
    spec: ModelSpec,
    algorithm: str,
    global_state: Mapping[str, np.ndarray],
    local: Mapping[str, np.ndarray],
    personal: Mapping[str, np.ndarray],
    ws: WidthSpec,
) -> dict[str, np.ndarray]:
    """The arrays a client evaluates and deploys at ``ws``: its personal model (algorithms
    that evaluate one), else the global shared state plus its local arrays."""
    if evaluates_personal(algorithm):
        return slice_state(personal, spec, ws)
    return {**slice_state(global_state, spec, ws), **slice_state(local, spec, ws)}


# ---------------------------------------------------------------------- normalisation
def write_normalisation(
    run_dir: Path, normalisation: Mapping[str, tuple[float, float]], image_size: int
) -> Path:
    """Write ``RUN/normalisation.json`` atomically: per domain (mean, std) on the 0..1 scale."""
    doc = {
        "image_size": int(image_size),
        "domains": {d: {"mean": float(m), "std": float(s)} for d, (m, s) in normalisation.items()},
    }
    return atomic_write_text(run_dir / NORMALISATION_FILE, json.dumps(doc, indent=1) + "\n")


def read_normalisation(run_dir: Path) -> tuple[int, dict[str, tuple[float, float]]]:
    """(image size, {domain: (mean, std)}) from ``RUN/normalisation.json``."""
    path = run_dir / NORMALISATION_FILE
    if not path.is_file():
        raise RunArtifactsError(
            f"{path} is missing: the run directory was written before runs recorded their "
            "input normalisation; re-run `fmtl simulate` (or resume it) to write it"
        )
    try:
        doc = json.loads(path.read_text())
        size = doc["image_size"]
        norms = {}
        for d, v in doc["domains"].items():
            mean, std = float(v["mean"]), float(v["std"])
            if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
                raise ValueError(f"domain {d!r}: mean {mean}, std {std}")
            norms[str(d)] = (mean, std)
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"image_size {size!r}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RunArtifactsError(f"{path} is malformed: {exc!r}") from exc
    return size, norms


# ---------------------------------------------------------------------- the reader
class RunArtifacts:
    """One completed round of a run directory (default: the last), read from disk.

    ``config``, ``spec``, ``round`` (the round read; ``last_round`` the newest), ``global_state``,
    ``client_states`` (cid -> :class:`ClientStore`), ``clients`` (id, tasks, width from the
    config), ``layout`` (heads, FedAvg's union columns), ``image_size``, ``backbone``.
    """

    def __init__(self, run_dir: str | Path, round_idx: int | None = None) -> None:
        from fmtl_lightning.checkpoint import completed_rounds, read_round
        from fmtl_lightning.config import load_config
        from fmtl_lightning.engine.plan import backbone_config, model_layout, planned_clients
        from fmtl_lightning.validation import validate_state

        self.run_dir = Path(run_dir)
        for name in ("config.yaml", "spec.json"):
            if not (self.run_dir / name).is_file():
                raise RunArtifactsError(f"{self.run_dir / name} is missing: not a run directory")
        self.config: RunConfig = load_config(self.run_dir / "config.yaml")
        self.spec = ModelSpec.from_json((self.run_dir / "spec.json").read_text())
        rounds = completed_rounds(self.run_dir)
        if not rounds:
            raise RunArtifactsError(f"{self.run_dir / 'checkpoints'}: no completed round")
        self.last_round = rounds[-1]
        self.round = self.last_round if round_idx is None else round_idx
        self.image_size, self.normalisation = read_normalisation(self.run_dir)
        self.clients: list[PlannedClient] = planned_clients(self.config)
        self.layout: ModelLayout = model_layout(self.config)
        self.backbone: BackboneConfig = backbone_config(self.config, self.image_size)
        g, files, _, _ = read_round(self.run_dir, self.round)
        validate_state(g, self.spec, 1.0, self.spec.shared_keys(), client="<checkpoint>")
        self.global_state: dict[str, np.ndarray] = g
        self.client_states = {
            c.client_id: ClientStore.from_arrays(files.get(c.client_id, {})) for c in self.clients
        }

    @property
    def algorithm(self) -> str:
        return self.config.algorithm.name

    def client(self, cid: str) -> PlannedClient:
        for c in self.clients:
            if c.client_id == cid:
                return c
        raise RunArtifactsError(f"client {cid!r} is not in the run {self.run_dir}")

    def domain(self, cid: str) -> str:
        """Client ``cid``'s input domain (its normalisation's key): the built-in dataset
        its tasks name, else the user's own data (``data.factory``)."""
        from fmtl_lightning.tasks import inputs_domain

        return inputs_domain(self.client(cid).tasks)

    def shared_state(self, ws: WidthSpec) -> dict[str, np.ndarray]:
        """The global shared arrays at ``ws``."""
        return slice_state(self.global_state, self.spec, ws)

    def client_state(self, cid: str, ws: WidthSpec) -> dict[str, np.ndarray]:
        """What client ``cid`` deploys at ``ws`` (:func:`deployed_state`)."""
        st = self.client_states[self.client(cid).client_id]
        return deployed_state(
            self.spec, self.algorithm, self.global_state, st.local, st.personal, ws
        )

    def client_tasks(self, cid: str) -> dict[str, int]:
        """The heads of a client's model: its own tasks (FedAvg: the one union head)."""
        return self.layout.client_tasks(self.client(cid).tasks)

    def model(self, cid: str, width: float) -> MultiTaskModel:
        """A fresh :class:`MultiTaskModel` of client ``cid``'s structure at ``width``."""
        from fmtl_lightning.models import MultiTaskModel

        return MultiTaskModel(self.backbone, self.client_tasks(cid), width)

    def eval_width(self, cid: str) -> WidthSpec:
        """The WidthSpec client ``cid`` was evaluated with after the round read."""
        return self.width_spec(self.client(cid).width)

    def width_spec(self, width: float) -> WidthSpec:
        """``width`` with the run's slicing and the read round's rolling-window offset."""
        return WidthSpec(width, self.config.algorithm.slicing, max(self.round - 1, 0))
