"""Parameter roles and width rules: the one declaration everything else reads.

A model declares, once, for every state-dict key:

* its *kind* (``backbone``, ``norm``, ``norm_stat``, ``static_stat``, ``head``,
  ``counter``): what the tensor is, independent of any algorithm. ``static_stat``
  marks static batch-norm statistics (HeteroFL's sBN): computed by a statistics pass
  after aggregation (:mod:`fmtl_lightning.static_bn`), never trained, never sent, so
  no policy shares them;
* its *axes*: for each dim, the name of the channel group it indexes (scaled by
  width) or ``None`` (never scaled);
* its full-width shape and dtype;
* optionally its *blocks*: a scaled dim of size ``group * block`` holds each channel of
  its group as a contiguous run of ``block`` entries (a linear layer over a flattened
  ``(C, H, W)`` map: block ``H*W``), so a width keeps whole runs.

A :class:`RolePolicy` maps kinds to roles (``shared``: aggregated by the server;
``local``: stays on the client). FedPer, FedBN and FedAvg are three policies over
the same declaration; nothing matches on layer names.

Pure numpy/stdlib: the server side can use this without torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from fmtl_lightning.errors import SpecError, WidthError

Role = Literal["shared", "local"]
Kind = Literal["backbone", "norm", "norm_stat", "static_stat", "head", "counter"]
SliceMode = Literal["heterofl", "fedrolex"]
IntRule = Literal["max", "sum", "keep"]
Segment = tuple[str | None, int]  # (group, or None for channels that never scale; full size)

KINDS: tuple[str, ...] = ("backbone", "norm", "norm_stat", "static_stat", "head", "counter")
SPEC_FORMAT_VERSION = 1


def check_width(width: float, *, what: str = "width") -> float:
    """Return ``width`` as float if it is in (0, 1], else raise :class:`WidthError`."""
    w = float(width)
    if not (0.0 < w <= 1.0) or math.isnan(w):
        raise WidthError(f"{what} must be in (0, 1], got {width!r}")
    return w


def channels_at(full: int, width: float) -> int:
    """Channels a group keeps at ``width``: ceil(width * full), at least 1 (HeteroFL)."""
    w = check_width(width)
    # round() guards against 0.1 * 30 = 3.0000000000000004 -> 4
    return max(1, math.ceil(round(w * full, 6)))


@dataclass(frozen=True)
class WidthSpec:
    """How a client's sub-model was cut from the global one.

    ``heterofl`` keeps the first ``ceil(r*C)`` channels of every group;
    ``fedrolex`` keeps a window of that size starting at ``round_idx mod C``,
    wrapping around, so the window rolls by one channel per round.
    """

    width: float = 1.0
    mode: SliceMode = "heterofl"
    round_idx: int = 0

    def __post_init__(self) -> None:
        check_width(self.width)
        if self.mode not in ("heterofl", "fedrolex"):
            raise WidthError(f"slice mode must be 'heterofl' or 'fedrolex', got {self.mode!r}")
        if self.round_idx < 0:
            raise WidthError(f"round_idx must be >= 0, got {self.round_idx}")

    def indices(self, full: int) -> np.ndarray:
        """Global channel indices kept for a group of ``full`` channels, in sub-model order."""
        k = channels_at(full, self.width)
        if self.mode == "heterofl" or k == full:
            return np.arange(k, dtype=np.int64)
        return (self.round_idx + np.arange(k, dtype=np.int64)) % full

    def runs(self, full: int) -> list[tuple[int, int, int]]:
        """Kept indices as contiguous runs ``(global_start, global_stop, local_start)``.

        A prefix is one run; a wrapped rolling window is two. Runs let slicing and
        aggregation use views instead of fancy-index copies.
        """
        k = channels_at(full, self.width)
        if self.mode == "heterofl" or k == full:
            return [(0, k, 0)]
        start = self.round_idx % full
        if start + k <= full:
            return [(start, start + k, 0)]
        first = full - start
        return [(start, full, 0), (0, k - first, first)]


@dataclass(frozen=True)
class ParamSpec:
    """Declaration of one state-dict entry at full width."""

    key: str
    kind: Kind
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    dtype: str = "float32"
    int_rule: IntRule = "max"
    blocks: tuple[int, ...] = ()  # () = every block 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SpecError(
                f"key {self.key!r}: unknown kind {self.kind!r}, expected one of {KINDS}"
            )
        if len(self.axes) != len(self.shape):
            raise SpecError(
                f"key {self.key!r}: {len(self.axes)} axes declared for shape {self.shape}"
            )
        if np.dtype(self.dtype).kind in "iu" and any(a is not None for a in self.axes):
            raise SpecError(f"key {self.key!r}: integer entries cannot be width-scaled")
        if self.blocks and (
            len(self.blocks) != len(self.shape)
            or any(int(b) < 1 for b in self.blocks)
            or any(b != 1 and a is None for b, a in zip(self.blocks, self.axes, strict=True))
        ):
            raise SpecError(
                f"key {self.key!r}: blocks {self.blocks} must be >= 1, one per dim, "
                f"and 1 on unscaled dims (axes {self.axes})"
            )

    def block(self, dim: int) -> int:
        """Entries per channel along ``dim`` (1 unless the dim is a flattened channel map)."""
        return int(self.blocks[dim]) if self.blocks else 1

    @property
    def is_float(self) -> bool:
        return np.dtype(self.dtype).kind == "f"


@dataclass(frozen=True)
class RolePolicy:
    """Which kinds are shared (aggregated); every other kind stays local."""

    name: str
    shared_kinds: frozenset[str]

    def role(self, kind: str) -> Role:
        return "shared" if kind in self.shared_kinds else "local"


POLICIES: dict[str, RolePolicy] = {
    # hard parameter sharing: backbone (incl. its norms) travels, heads stay home
    "fedper": RolePolicy("fedper", frozenset({"backbone", "norm", "norm_stat", "counter"})),
    # FedBN: norm affine parameters and statistics stay local too
    "fedbn": RolePolicy("fedbn", frozenset({"backbone"})),
    # one global model: everything trained is shared, including the (union) head
    "fedavg": RolePolicy("fedavg", frozenset(KINDS) - {"static_stat"}),
    # nothing leaves the client
    "local": RolePolicy("local", frozenset()),
}


@dataclass(frozen=True)
class ModelSpec:
    """All parameter declarations of a model plus the full size of each channel group.

    ``segments`` declares *concatenated* groups (the channels after ``torch.cat``): an
    entry ``{"cat(a,b)": (("a", 4), ("b", 4))}`` says that group's channels are group
    ``a``'s followed by ``b``'s; at a width it keeps each segment's slice, in order.
    """

    groups: Mapping[str, int]
    params: tuple[ParamSpec, ...]
    policy: RolePolicy = field(default_factory=lambda: POLICIES["fedper"])
    segments: Mapping[str, tuple[Segment, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, segs in self.segments.items():
            bad = [
                (g, n)
                for g, n in segs
                if n < 1 or (g is not None and (self.groups.get(g) != n or g in self.segments))
            ]
            if name not in self.groups or bad or sum(n for _, n in segs) != self.groups[name]:
                raise SpecError(
                    f"concatenated group {name!r}: segments {segs} must be plain declared "
                    f"groups (or None) with their full sizes, summing to groups[{name!r}]"
                )
        seen: set[str] = set()
        for p in self.params:
            if p.key in seen:
                raise SpecError(f"key {p.key!r} declared twice")
            seen.add(p.key)
            for dim, axis in enumerate(p.axes):
                if axis is None:
                    continue
                if axis not in self.groups:
                    raise SpecError(f"key {p.key!r}: axis {axis!r} is not a declared group")
                if self.groups[axis] * p.block(dim) != p.shape[dim]:
                    raise SpecError(
                        f"key {p.key!r}: dim {dim} has size {p.shape[dim]} but group "
                        f"{axis!r} has {self.groups[axis]} channels x block {p.block(dim)}"
                    )

    # ----------------------------------------------------------------- lookup
    def __getitem__(self, key: str) -> ParamSpec:
        for p in self.params:
            if p.key == key:
                return p
        raise KeyError(key)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(p.key for p in self.params)

    def role(self, key: str) -> Role:
        return self.policy.role(self[key].kind)

    def shared_keys(self) -> tuple[str, ...]:
        return tuple(p.key for p in self.params if self.policy.role(p.kind) == "shared")

    def local_keys(self) -> tuple[str, ...]:
        return tuple(p.key for p in self.params if self.policy.role(p.kind) == "local")

    def keys_of_kind(self, *kinds: str) -> tuple[str, ...]:
        return tuple(p.key for p in self.params if p.kind in kinds)

    def with_policy(self, policy: RolePolicy | str) -> ModelSpec:
        pol = POLICIES[policy] if isinstance(policy, str) else policy
        return replace(self, policy=pol)

    def restrict(self, keys: Iterable[str]) -> ModelSpec:
        """A spec holding only ``keys`` (e.g. the backbone alone)."""
        wanted = set(keys)
        return replace(self, params=tuple(p for p in self.params if p.key in wanted))

    # ----------------------------------------------------------------- widths
    def channels(self, axis: str, width: WidthSpec | float) -> int:
        """Channels of a group at ``width`` (a concatenated group: the sum of its segments')."""
        w = width.width if isinstance(width, WidthSpec) else check_width(width)
        segs = self.segments.get(axis)
        if segs is None:
            return channels_at(self.groups[axis], w)
        return sum(n if g is None else channels_at(n, w) for g, n in segs)

    def runs(self, axis: str, width: WidthSpec) -> list[tuple[int, int, int]]:
        """:meth:`WidthSpec.runs` of a group; a concatenated group chains its segments' runs."""
        segs = self.segments.get(axis)
        if segs is None:
            return width.runs(self.groups[axis])
        out: list[tuple[int, int, int]] = []
        g_off = l_off = 0
        for g, n in segs:
            part = [(0, n, 0)] if g is None else width.runs(n)
            out += [(g_off + a, g_off + b, l_off + c) for a, b, c in part]
            g_off += n
            l_off += n if g is None else channels_at(n, width.width)
        return out

    def shape_at(self, key: str, width: WidthSpec | float) -> tuple[int, ...]:
        w = width.width if isinstance(width, WidthSpec) else check_width(width)
        p = self[key]
        return tuple(
            n if axis is None else self.channels(axis, w) * p.block(dim)
            for dim, (n, axis) in enumerate(zip(p.shape, p.axes, strict=True))
        )

    def num_elements(self, keys: Iterable[str], width: WidthSpec | float = 1.0) -> int:
        return sum(int(np.prod(self.shape_at(k, width), dtype=np.int64)) for k in keys)

    # ----------------------------------------------------------------- serialisation
    def to_json(self) -> str:
        return json.dumps(
            {
                "format_version": SPEC_FORMAT_VERSION,
                "groups": dict(self.groups),
                **(
                    {"segments": {k: [list(s) for s in v] for k, v in self.segments.items()}}
                    if self.segments
                    else {}
                ),
                "policy": {
                    "name": self.policy.name,
                    "shared_kinds": sorted(self.policy.shared_kinds),
                },
                "params": [
                    {
                        "key": p.key,
                        "kind": p.kind,
                        "shape": list(p.shape),
                        "axes": list(p.axes),
                        "dtype": p.dtype,
                        "int_rule": p.int_rule,
                        **({"blocks": list(p.blocks)} if p.blocks else {}),
                    }
                    for p in self.params
                ],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        try:
            d = json.loads(text)
            if d.get("format_version") != SPEC_FORMAT_VERSION:
                raise SpecError(
                    f"spec format_version {d.get('format_version')!r} is not {SPEC_FORMAT_VERSION}"
                )
            pol = d["policy"]
            params = tuple(
                ParamSpec(
                    key=str(p["key"]),
                    kind=p["kind"],
                    shape=tuple(int(n) for n in p["shape"]),
                    axes=tuple(p["axes"]),
                    dtype=str(p["dtype"]),
                    int_rule=p["int_rule"],
                    blocks=tuple(int(b) for b in p.get("blocks", ())),
                )
                for p in d["params"]
            )
            return cls(
                groups={str(k): int(v) for k, v in d["groups"].items()},
                params=params,
                policy=RolePolicy(str(pol["name"]), frozenset(pol["shared_kinds"])),
                segments={
                    str(k): tuple((None if g is None else str(g), int(n)) for g, n in v)
                    for k, v in d.get("segments", {}).items()
                },
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, SpecError):
                raise
            raise SpecError(f"malformed model spec: {exc!r}") from exc
