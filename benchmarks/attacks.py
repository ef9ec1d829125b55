"""Attacks for the robustness benchmark: a wrapper around any aggregator.

:class:`Attacked` composes with a rule (``Attacked(Median(), "sign_flip", attackers)``)
and corrupts the updates of a fixed set of clients before calling the inner rule; the
round loop is not touched (``Simulation(cfg, run_dir, aggregator=Attacked(...))``).
The attacking clients train honestly; only what they send is replaced. For a client's
shared float entry ``x`` (its slice at its width) and the global state ``g`` it received:

* ``sign_flip``: ``g - scale * (x - g)`` (the honest delta reversed and scaled, x10);
* ``noise``: ``x + N(0, sigma)`` per element, drawn from ``(seed, round, client)``;
* ``stale``: the global state of the first call (round 0: the model every client
  first received), sliced to the client's width: a client replaying an old model.
* ``none``: no corruption (the reference; still records the honest delta norms).

Integer entries are sent as they are. Each call records the L2 delta norms of the
honest clients (``honest_norms``, one list per round), which the benchmark uses to
choose ``norm_bounded``'s ``clip_norm``. A benchmark tool, not a library feature.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fmtl_lightning.aggregation import ClientUpdate, Weighting
from fmtl_lightning.aggregators import AggregationRule, RowMasks
from fmtl_lightning.aggregators.norm_bounded import delta_norm
from fmtl_lightning.roles import ModelSpec
from fmtl_lightning.slicing import slice_array

Attack = Literal["none", "sign_flip", "noise", "stale"]
ATTACKS: tuple[Attack, ...] = ("none", "sign_flip", "noise", "stale")


def choose_attackers(client_ids: Sequence[str], fraction: float, seed: int) -> frozenset[str]:
    """``round(fraction * n)`` clients (at least one when ``fraction > 0``), drawn without
    replacement from the sorted ids by ``numpy.random.default_rng(seed)``."""
    ids = sorted(client_ids)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    k = 0 if fraction == 0 else max(1, round(fraction * len(ids)))
    picked = np.random.default_rng(seed).choice(len(ids), size=k, replace=False)
    return frozenset(ids[int(i)] for i in picked)


@dataclass
class Attacked:
    """``inner`` after replacing the updates of ``attackers`` by the ``attack``."""

    inner: AggregationRule
    attack: Attack
    attackers: frozenset[str]
    scale: float = 10.0  # sign_flip: the reversed delta's factor
    sigma: float = 1.0  # noise: standard deviation per element
    seed: int = 0  # noise: the draws come from (seed, round, client)
    rounds: int = field(default=0, init=False)  # calls so far
    stale: dict[str, np.ndarray] | None = field(default=None, init=False)
    honest_norms: list[list[float]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.attack not in ATTACKS:
            raise ValueError(f"attack must be one of {ATTACKS}, got {self.attack!r}")

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def weighted(self) -> bool:
        return self.inner.weighted

    @property
    def needs_label_masks(self) -> bool:
        return self.inner.needs_label_masks

    def corrupt(
        self, global_state: Mapping[str, np.ndarray], u: ClientUpdate, spec: ModelSpec
    ) -> ClientUpdate:
        """What attacking client ``u`` sends instead of its honest update."""
        assert self.stale is not None
        client_no = sorted(self.attackers).index(u.client_id)
        rng = np.random.default_rng([self.seed, self.rounds, client_no])
        out: dict[str, np.ndarray] = {}
        for k, x in u.state.items():
            if not spec[k].is_float or self.attack == "none":
                out[k] = x
            elif self.attack == "sign_flip":
                g = slice_array(spec, k, global_state[k], u.width)
                out[k] = (g - self.scale * (x - g)).astype(x.dtype)
            elif self.attack == "noise":
                out[k] = (x + rng.normal(0.0, self.sigma, size=x.shape)).astype(x.dtype)
            else:  # stale
                out[k] = slice_array(spec, k, self.stale[k], u.width)
        return ClientUpdate(u.client_id, out, u.num_examples, u.width)

    def __call__(
        self,
        global_state: Mapping[str, np.ndarray],
        updates: Sequence[ClientUpdate],
        spec: ModelSpec,
        *,
        weighting: Weighting = "uniform",
        row_masks: RowMasks | None = None,
    ) -> dict[str, np.ndarray]:
        if self.stale is None:
            self.stale = {k: np.array(v, copy=True) for k, v in global_state.items()}
        fkeys = [k for k in spec.shared_keys() if spec[k].is_float]
        self.honest_norms.append(
            [delta_norm(global_state, u, spec, fkeys) for u in updates
             if u.client_id not in self.attackers]
        )  # fmt: skip
        sent = [
            self.corrupt(global_state, u, spec) if u.client_id in self.attackers else u
            for u in updates
        ]
        self.rounds += 1
        return self.inner(global_state, sent, spec, weighting=weighting, row_masks=row_masks)
