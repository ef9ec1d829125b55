"""Aggregation throughput: ``fmtl_lightning.aggregation.aggregate`` vs a Flower-style mean.

For each backbone (HeteroFL CNN, ~1.6M and ~9.7M float32 shared parameters) and
each client count K, three cases are timed:

* all clients at width 1 (plain FedAvg);
* an even mix of widths 1, 1/2, 1/4, 1/8, 1/16, HeteroFL prefix slices;
* the same mix as FedRolex rolling windows (round index chosen so windows wrap).

The baseline is Flower's ``aggregate`` (example-weighted mean over positional
lists), run inline over the K clients' *full-width* arrays in the same process.
Ours is timed with example weighting (comparable to the baseline) and uniform
weighting; our time includes validation of every update (keys, shapes, dtypes,
finiteness). Times are the best of ``REPEATS`` rounds; in each round the
baseline and every case of ours run once, in turn, so that load from other
processes hits all of them alike.

Client states are random float32 arrays made once, before timing. To bound
memory, each width has a pool of at most ``POOL_BYTES`` (512 MiB) of distinct
states, and the clients of that width cycle through it: 86 full-width states at
1.6M parameters, 13 at 9.7M (so K=100 at width 1 holds 0.5 GB of client data
instead of 3.9 GB). A state is read again only after 13 others, which does not
fit the 32 MB L3 cache except for the smallest entries (about 5% of the bytes),
so reuse barely makes reads cheaper.

Run: ``python -m benchmarks.bench_aggregation`` (about 2-3 minutes).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial, reduce

import numpy as np

from benchmarks.common import best_of_interleaved, write_section
from fmtl_lightning.aggregation import ClientUpdate, aggregate
from fmtl_lightning.roles import ModelSpec, SliceMode, WidthSpec

POOL_BYTES = 512 * 2**20  # distinct client states per width, at most this many bytes
REPEATS = 5
KS = (10, 100)
MIX = (1.0, 1 / 2, 1 / 4, 1 / 8, 1 / 16)
FEDROLEX_ROUND = 60  # windows wrap around in several channel groups
MODELS = {
    "HeteroFL CNN (64,128,256,512)": (64, 128, 256, 512),
    "HeteroFL CNN (160,320,640,1280)": (160, 320, 640, 1280),
}
GOAL = {"width 1": 1.0, "mixed, HeteroFL": 2.0, "mixed, FedRolex": 2.0}


def backbone_spec(hidden: tuple[int, ...]) -> ModelSpec:
    """Spec of the shared keys of a HeteroFL CNN (static BN, as in HeteroFL)."""
    from fmtl_lightning.models import BackboneConfig, model_spec  # torch: only to build the spec

    spec = model_spec(
        BackboneConfig("cnn", hidden=hidden, norm="static_batch"), {"mnist/digit": 10}
    )
    return spec.restrict(spec.shared_keys())


def flower_aggregate(results: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """Flower's ``flwr.server.strategy.aggregate.aggregate``, verbatim in substance."""
    num_examples_total = sum(num_examples for (_, num_examples) in results)
    weighted_weights = [
        [layer * num_examples for layer in weights] for weights, num_examples in results
    ]
    return [
        reduce(np.add, layer_updates) / num_examples_total
        for layer_updates in zip(*weighted_weights, strict=True)
    ]


@dataclass
class Row:
    model: str
    params: int
    k: int
    case: str
    data_bytes: int
    base_bytes: int
    t_base: float
    t_examples: float
    t_uniform: float

    def markdown(self) -> str:
        goal = GOAL[self.case]
        r_ex, r_un = self.t_examples / self.t_base, self.t_uniform / self.t_base
        ok = "yes" if r_ex <= goal and r_un <= goal else "**no**"
        gbs = [self.base_bytes / self.t_base, self.data_bytes / self.t_examples]
        gbs.append(self.data_bytes / self.t_uniform)
        return (
            f"| {self.model} | {self.params / 1e6:.2f}M | {self.k} | {self.case} "
            f"| {self.data_bytes / 1e6:,.0f} "
            f"| {self.t_base * 1e3:,.0f} ({gbs[0] / 1e9:.1f}) "
            f"| {self.t_examples * 1e3:,.0f} ({gbs[1] / 1e9:.1f}) | {r_ex:.2f}x "
            f"| {self.t_uniform * 1e3:,.0f} ({gbs[2] / 1e9:.1f}) | {r_un:.2f}x "
            f"| <= {goal:g}x: {ok} |"
        )


HEADER = (
    "| backbone | shared params | K | client widths | client data MB "
    "| Flower mean ms (GB/s) | ours, examples ms (GB/s) | vs Flower "
    "| ours, uniform ms (GB/s) | vs Flower | goal |\n"
    "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"
)


def make_pool(spec: ModelSpec, width: WidthSpec, rng: np.random.Generator) -> list[dict]:
    """Distinct random states at ``width``: max(KS) of them, or fewer to stay in POOL_BYTES."""
    keys = spec.keys
    size = 4 * spec.num_elements(keys, width)
    count = max(1, min(max(KS), POOL_BYTES // size))
    return [
        {k: rng.standard_normal(spec.shape_at(k, width), dtype=np.float32) for k in keys}
        for _ in range(count)
    ]


def state_bytes(state: Mapping[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in state.values())


pool_sizes: dict[str, int] = {}  # distinct full-width states per backbone, for the report


def bench_model(name: str, hidden: tuple[int, ...], rng: np.random.Generator) -> list[Row]:
    spec = backbone_spec(hidden)
    keys = spec.keys
    params = spec.num_elements(keys)
    global_state = {k: rng.standard_normal(spec[k].shape, dtype=np.float32) for k in keys}
    pools = {w: make_pool(spec, WidthSpec(w), rng) for w in MIX}
    pool_sizes[name] = len(pools[1.0])
    rows: list[Row] = []
    for k in KS:
        counts = [int(n) for n in rng.integers(100, 1000, size=k)]
        full = [pools[1.0][i % len(pools[1.0])] for i in range(k)]
        base_in = [([s[key] for key in keys], n) for s, n in zip(full, counts, strict=True)]
        base_bytes = sum(state_bytes(s) for s in full)
        cases = {
            "width 1": [
                ClientUpdate(f"c{i}", full[i], counts[i], WidthSpec(1.0)) for i in range(k)
            ],
        }
        mixes: tuple[tuple[str, SliceMode, int], ...] = (
            ("mixed, HeteroFL", "heterofl", 0),
            ("mixed, FedRolex", "fedrolex", FEDROLEX_ROUND),
        )
        for case, mode, rnd in mixes:
            ups = []
            for i in range(k):
                w = MIX[i % len(MIX)]
                ups.append(
                    ClientUpdate(
                        f"c{i}",
                        pools[w][(i // len(MIX)) % len(pools[w])],
                        counts[i],
                        WidthSpec(w, mode, rnd),
                    )
                )
            cases[case] = ups
        check = aggregate(global_state, cases["width 1"], spec, weighting="examples")
        want = flower_aggregate(base_in)
        for key, ref in zip(keys, want, strict=True):
            np.testing.assert_allclose(check[key], ref, rtol=1e-4, atol=1e-5)
        del check, want
        fns: dict[str, Callable[[], object]] = {"flower": partial(flower_aggregate, base_in)}
        for case, ups in cases.items():
            for weighting in ("examples", "uniform"):
                fns[f"{case}/{weighting}"] = partial(
                    aggregate, global_state, ups, spec, weighting=weighting
                )
        t = best_of_interleaved(fns, REPEATS)
        for case, ups in cases.items():
            data = sum(state_bytes(u.state) for u in ups)
            row = Row(
                name, params, k, case, data, base_bytes, t["flower"],
                t[f"{case}/examples"], t[f"{case}/uniform"],
            )  # fmt: skip
            print(row.markdown(), flush=True)
            rows.append(row)
    return rows


def report(rows: Sequence[Row], elapsed: float) -> str:
    lines = [
        "## Aggregation",
        "",
        "`aggregate(global, updates, spec, weighting=...)` over the shared keys of a HeteroFL "
        "CNN (`BackboneConfig('cnn', hidden=..., norm='static_batch')`, 16 float32 entries), "
        "against Flower's `aggregate` (example-weighted `reduce(np.add, ...) / total` over "
        "positional lists) run inline on the K clients' full-width arrays in the same process. "
        f"Times are the best of {REPEATS} rounds (each round runs Flower and every row once, "
        "in turn); GB/s = bytes of client arrays read / time (for Flower, the "
        "full-width arrays). Our times include validating every update (key set, shapes, "
        "dtypes, finiteness) and the global state. 'vs Flower' = our time / Flower's time "
        "(lower is better). Mixed = clients cycle through widths 1, 1/2, 1/4, 1/8, 1/16; "
        f"FedRolex rows use round index {FEDROLEX_ROUND}, so windows wrap. Client states are "
        "random, made before timing; to bound memory the clients of one width cycle through "
        f"at most {POOL_BYTES >> 20} MiB of distinct states (full-width states: "
        + ", ".join(f"{n} for {m}" for m, n in pool_sizes.items())
        + "; a state is re-read only after that many others, which for all but the smallest "
        "entries exceeds the 32 MiB L3 cache).",
        "",
        HEADER,
        *(r.markdown() for r in rows),
        "",
        f"Total benchmark time: {elapsed:.0f} s.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only, keep BENCHMARKS.md")
    args = parser.parse_args([] if argv is None else list(argv))
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    rows: list[Row] = []
    print(HEADER, flush=True)
    for name, hidden in MODELS.items():
        rows += bench_model(name, hidden, rng)
    text = report(rows, time.perf_counter() - t0)
    if not args.no_write:
        print(f"wrote {write_section('aggregation', text)}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
