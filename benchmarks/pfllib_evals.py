"""PFLlib's extra evaluations, done by :mod:`benchmarks.pfllib` through the simulation's API.

* **Ditto's global model.** PFLlib's Ditto server evaluates the global model and the
  personal models every round and appends both to one list (its best is the max over
  both). :func:`global_model_curve` returns an ``on_round`` callback that scores, after
  each round, every client's global copy (the aggregated shared state plus the client's
  global-copy heads, which our Ditto keeps local) next to the personal scores the
  simulation records.
* **FedBABU's end fine-tune.** PFLlib evaluates FedBABU every round with the heads still
  at their initialisation, then, once after the last round, fine-tunes each client's
  *whole* model (``clientBABU.fine_tune(which_module=['base', 'head'])``) for 10 epochs
  and evaluates again. :func:`finetuned_accuracy` runs that fine-tune (or a head-only
  one, our library's FedBABU evaluation) on evaluation-time copies.

Accuracy here is PFLlib's: correct predictions pooled over every client's test set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

TASK = "fashion/item"


def _correct(module: Any, c: Any) -> tuple[int, int]:
    """(correct predictions, test examples) of ``module`` on client ``c``'s test split."""
    import torch

    module.eval()
    with torch.no_grad():
        logits = module(c.x_test)[TASK]
    y = c.y_test[TASK]
    return int((logits.argmax(1) == y).sum()), int(y.shape[0])


def _global_copy(sim: Any, idx: int) -> dict[str, np.ndarray]:
    """Client ``idx``'s global copy: the aggregated state plus its own local arrays."""
    c = sim.fed.clients[idx]
    return {**sim.global_state, **sim.pool.stores[c.cid].local}


def pooled_accuracy(sim: Any, state_of: Callable[[int], Mapping[str, np.ndarray]]) -> float:
    """Correct predictions over all clients' test sets, each client scored with
    ``state_of(client index)`` (loaded into its module, no fine-tune)."""
    from fmtl_lightning.models import load_arrays

    hit = total = 0
    for idx, c in enumerate(sim.fed.clients):
        module = sim.pool.module_for(c, c.width)
        load_arrays(module.model, state_of(idx))
        h, n = _correct(module, c)
        hit, total = hit + h, total + n
    return hit / total


def global_model_curve(sim: Any, curve: list[list[float]]) -> Callable[[int], None]:
    """An ``on_round`` callback appending [round, pooled accuracy of the global copies]."""

    def on_round(round_no: int) -> None:
        curve.append([round_no, pooled_accuracy(sim, lambda i: _global_copy(sim, i))])

    return on_round


def finetuned_accuracy(sim: Any, epochs: int, *, whole_model: bool) -> float:
    """Pooled accuracy after each client fine-tunes, for ``epochs`` epochs on its training
    split, the model it is evaluated with (global body + its heads): the whole model
    (PFLlib's FedBABU) or the heads alone. Seeded as the ``finetune`` phase of the last
    round; runs on copies, so the simulation's states do not change."""
    from fmtl_lightning.algorithms.base import Phase, head_keys, load

    hit = total = 0
    for idx, c in enumerate(sim.fed.clients):
        ctx = sim.pool.fit_context(idx, c.width, sim.round_idx - 1)
        load(ctx, _global_copy(sim, idx))
        keys = None if whole_model else head_keys(ctx)
        ctx.run(Phase("finetune", keys, epochs=epochs))
        h, n = _correct(ctx.module, c)
        hit, total = hit + h, total + n
    return hit / total
