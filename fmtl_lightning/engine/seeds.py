"""Every seeded stream of a run, named once: client sampling, width draws, batch orders.

All randomness of a federated run derives from ``(cfg.seed, round, [client,] stream)``,
never from global RNG state, so a resumed run replays the remaining rounds exactly and
every transport (in-process, Flower, an edge device) draws the same numbers.

Pure numpy: the Flower server and the edge runtime import this without torch.
"""

from __future__ import annotations

import numpy as np

SAMPLE_STREAM = 17  # which clients train in a round
WIDTH_STREAM = 29  # a client's width under width_assignment: dynamic
PHASES = {"global": 1, "personal": 2, "head": 3, "body": 4, "finetune": 5}  # batch orders


def sample_rng(seed: int, round_idx: int) -> np.random.Generator:
    """The generator of round ``round_idx``'s client sample."""
    return np.random.default_rng([seed, round_idx, SAMPLE_STREAM])


def width_rng(seed: int, round_idx: int, client_idx: int) -> np.random.Generator:
    """The generator of client ``client_idx``'s width draw in round ``round_idx``."""
    return np.random.default_rng([seed, round_idx, client_idx, WIDTH_STREAM])


def phase_seed(seed: int, round_idx: int, client_idx: int, phase: str) -> int:
    """A 63-bit batch-order seed unique to (run seed, round, client, phase)."""
    ss = np.random.SeedSequence([seed, round_idx, client_idx, PHASES[phase]])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
