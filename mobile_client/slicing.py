"""Slicing the server's full-width state to a client's width on the device (numpy only).

A server checkpoint (``RUN/checkpoints/round_NNNN/global.safetensors``) holds the shared
keys at full width; a device trains at its own width. ``manifest.json``'s optional
``slicing`` record (written by ``fmtl export`` from the run's ModelSpec and slicing
mode) says how each shared key is cut::

    "slicing": {"mode": "heterofl" | "fedrolex",
                "groups": {GROUP: full channels},
                "segments": {GROUP: [[GROUP | null, n], ...]},   # concatenated groups
                "keys": {KEY: {"shape": [full shape], "axes": [GROUP | null, ...],
                               "blocks": [entries per channel, ...] | []}}}

The rule is the server engine's (``fmtl_lightning.slicing.slice_state``, which a test
compares with this module exactly): a group of C channels keeps ``ceil(r * C)`` of them
at width r (at least 1): the first ones (``heterofl``) or a window starting at
``round mod C`` that wraps around (``fedrolex``); a scaled dim keeps ``block`` entries
per kept channel; a concatenated group chains its segments' runs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mobile_client.errors import InputError, ManifestError

MODES = ("heterofl", "fedrolex")
Run = tuple[int, int, int]  # (global_start, global_stop, local_start)


def channels_at(full: int, width: float) -> int:
    """Channels a group of ``full`` keeps at ``width``: ceil(width * full), at least 1."""
    return max(1, math.ceil(round(width * full, 6)))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class KeySlicing:
    """One shared key at full width: its shape, each dim's group (or None) and block."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    blocks: tuple[int, ...] = ()

    def block(self, dim: int) -> int:
        return self.blocks[dim] if self.blocks else 1


@dataclass(frozen=True)
class Slicing:
    """The ``slicing`` record of a manifest (see the module docstring)."""

    mode: str
    groups: dict[str, int]
    keys: dict[str, KeySlicing]
    segments: dict[str, tuple[tuple[str | None, int], ...]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, where: str = "slicing") -> Slicing:
        if not isinstance(d, dict):
            raise ManifestError(f"manifest field {where!r} must be an object")
        mode = d.get("mode")
        if mode not in MODES:
            raise ManifestError(
                f"manifest field '{where}.mode' must be one of {MODES}, got {mode!r}"
            )
        groups = d.get("groups")
        if not isinstance(groups, dict) or not all(
            isinstance(k, str) and _is_int(v) and v > 0 for k, v in groups.items()
        ):
            raise ManifestError(f"manifest field '{where}.groups' must map names to ints > 0")
        segments: dict[str, tuple[tuple[str | None, int], ...]] = {}
        for g, segs in (d.get("segments") or {}).items():
            ok = isinstance(segs, list) and all(
                isinstance(s, list) and len(s) == 2 and (s[0] is None or isinstance(s[0], str))
                and _is_int(s[1]) and s[1] > 0 for s in segs
            )  # fmt: skip
            if not ok or g not in groups or sum(s[1] for s in segs) != groups[g]:
                raise ManifestError(f"manifest field '{where}.segments.{g}' must list [group | "
                                    f"null, n] pairs summing to groups.{g}")  # fmt: skip
            segments[g] = tuple((s[0], s[1]) for s in segs)
        keys_d = d.get("keys")
        if not isinstance(keys_d, dict):
            raise ManifestError(f"manifest field '{where}.keys' must be an object")
        keys = {k: _key_slicing(v, groups, f"{where}.keys.{k}") for k, v in keys_d.items()}
        s = cls(mode, dict(groups), keys, segments)
        for k, ks in keys.items():
            for dim, (n, axis) in enumerate(zip(ks.shape, ks.axes, strict=True)):
                if axis is not None and n != s.channels(axis, 1.0) * ks.block(dim):
                    raise ManifestError(
                        f"manifest field '{where}.keys.{k}.shape[{dim}]' is {n}, but group "
                        f"{axis!r} x block {ks.block(dim)} is {s.channels(axis, 1.0) * ks.block(dim)}"
                    )
        return s

    # ------------------------------------------------------------------ the rule
    def channels(self, axis: str, width: float) -> int:
        segs = self.segments.get(axis)
        if segs is None:
            return channels_at(self.groups[axis], width)
        return sum(n if g is None else channels_at(n, width) for g, n in segs)

    def _group_runs(self, full: int, width: float, round_idx: int) -> list[Run]:
        k = channels_at(full, width)
        if self.mode == "heterofl" or k == full:
            return [(0, k, 0)]
        start = round_idx % full
        if start + k <= full:
            return [(start, start + k, 0)]
        return [(start, full, 0), (0, k - (full - start), full - start)]

    def runs(self, axis: str, width: float, round_idx: int) -> list[Run]:
        segs = self.segments.get(axis)
        if segs is None:
            return self._group_runs(self.groups[axis], width, round_idx)
        out: list[Run] = []
        g_off = l_off = 0
        for g, n in segs:
            part = [(0, n, 0)] if g is None else self._group_runs(n, width, round_idx)
            out += [(g_off + a, g_off + b, l_off + c) for a, b, c in part]
            g_off += n
            l_off += n if g is None else channels_at(n, width)
        return out

    def shape_at(self, key: str, width: float) -> tuple[int, ...]:
        ks = self.keys[key]
        return tuple(n if axis is None else self.channels(axis, width) * ks.block(dim)
                     for dim, (n, axis) in enumerate(zip(ks.shape, ks.axes, strict=True)))  # fmt: skip

    def slice_array(self, key: str, full: np.ndarray, width: float, round_idx: int) -> np.ndarray:
        """The sub-array of ``key`` a client at ``width`` trains in round ``round_idx``."""
        ks = self.keys[key]
        per_axis = []
        for dim, (n, axis) in enumerate(zip(ks.shape, ks.axes, strict=True)):
            if axis is None:
                per_axis.append([(slice(0, n), slice(0, n))])
            else:
                b = ks.block(dim)
                per_axis.append([(slice(g0 * b, g1 * b), slice(l0 * b, (l0 + g1 - g0) * b))
                                 for g0, g1, l0 in self.runs(axis, width, round_idx)])  # fmt: skip
        out = np.empty(self.shape_at(key, width), dtype=full.dtype)
        for combo in itertools.product(*per_axis):
            out[tuple(c[1] for c in combo)] = full[tuple(c[0] for c in combo)]
        return out

    def slice_state(
        self, state: Mapping[str, np.ndarray], width: float, round_idx: int, where: str
    ) -> dict[str, np.ndarray]:
        """``state`` with every full-width key cut to ``width``; a key already at
        ``width`` is kept, any other shape is an :class:`InputError` naming the key."""
        out = {}
        for k, v in state.items():
            ks = self.keys.get(k)
            if ks is None or v.shape == self.shape_at(k, width):
                out[k] = v
            elif v.shape == ks.shape:
                out[k] = self.slice_array(k, v, width, round_idx)
            else:
                raise InputError(f"{where}: key {k!r} has shape {v.shape}; expected the "
                                 f"server's full width {ks.shape} or width {width:g}'s "
                                 f"{self.shape_at(k, width)}")  # fmt: skip
        return out


def _key_slicing(d: Any, groups: Mapping[str, int], where: str) -> KeySlicing:
    if not isinstance(d, dict):
        raise ManifestError(f"manifest field {where!r} must be an object")
    shape, axes, blocks = d.get("shape"), d.get("axes"), d.get("blocks") or []
    if not (isinstance(shape, list) and all(_is_int(n) and n >= 0 for n in shape)):
        raise ManifestError(f"manifest field '{where}.shape' must be a list of ints >= 0")
    if not (isinstance(axes, list) and len(axes) == len(shape)
            and all(a is None or a in groups for a in axes)):  # fmt: skip
        raise ManifestError(f"manifest field '{where}.axes' must give each dim a group of "
                            "'groups' or null")  # fmt: skip
    if not (isinstance(blocks, list) and (not blocks or len(blocks) == len(shape))
            and all(_is_int(b) and b > 0 for b in blocks)):  # fmt: skip
        raise ManifestError(f"manifest field '{where}.blocks' must be [] or one int > 0 per dim")
    return KeySlicing(tuple(shape), tuple(axes), tuple(blocks))
