"""Dim variables of the width-plan FX pass (:mod:`fmtl_lightning.width_plan`).

Every dim of every traced tensor is a variable of :class:`Dims` (a union-find). A class of
variables is a width-scaled channel group when a layer created it (a conv's or linear's
output) and nothing fixed it (inputs, heads' outputs, ``not_scaled`` modules, spatial
dims). Checks that depend on the final classes ("this dim must not scale") are deferred
to :meth:`Dims.check_deferred`.
"""

from __future__ import annotations

from typing import NamedTuple

from fmtl_lightning.errors import WidthPlanError


class Flat(NamedTuple):
    """A dim made of ``var``'s channels, each a contiguous run of ``block`` entries."""

    var: int
    block: int


class Cat(NamedTuple):
    """A dim made by ``torch.cat``: the channels of ``parts`` (vars) in order, ``sizes`` each."""

    parts: tuple[int, ...]
    sizes: tuple[int, ...]


Label = int | Flat | Cat


class Multi(tuple):  # type: ignore[type-arg]
    """The labels of a node that returns several tensors (one entry per output)."""


def vars_of(lab: Label) -> tuple[int, ...]:
    if isinstance(lab, Cat):
        return lab.parts
    return (lab.var,) if isinstance(lab, Flat) else (lab,)


class Dims:
    """Union-find over dim variables; a root carries fixed / source layer / full size."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.fixed: list[bool] = []
        self.source: list[str | None] = []
        self.size: list[int] = []
        self.deferred: list[tuple[int, str]] = []

    def new(self, size: int, *, fixed: bool = False, source: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.fixed.append(fixed)
        self.source.append(source)
        self.size.append(int(size))
        return len(self.parent) - 1

    def find(self, v: int) -> int:
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def union(self, a: int, b: int, where: str) -> None:
        ra, rb = sorted((self.find(a), self.find(b)))  # the older root stays: names by order
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise WidthPlanError(
                f"{where}: couples dims of {self.size[ra]} and {self.size[rb]} entries"
            )
        self.parent[rb] = ra
        self.fixed[ra] = self.fixed[ra] or self.fixed[rb]
        self.source[ra] = self.source[ra] or self.source[rb]

    def fix(self, v: int) -> None:
        self.fixed[self.find(v)] = True

    def scaled(self, v: int) -> bool:
        r = self.find(v)
        return not self.fixed[r] and self.source[r] is not None

    def require_fixed(self, lab: Label, message: str) -> None:
        self.deferred.extend((v, message) for v in vars_of(lab))

    def check_deferred(self) -> None:
        for v, message in self.deferred:
            if self.scaled(v):
                raise WidthPlanError(message)

    def groups(self) -> tuple[dict[str, int], dict[int, str]]:
        """``{group name: full size}`` and ``{root: group name}`` for every scaled class."""
        groups: dict[str, int] = {}
        names: dict[int, str] = {}
        for v in range(len(self.parent)):
            r = self.find(v)
            if r in names or not self.scaled(r):
                continue
            base = str(self.source[r])
            name, i = base, 1
            while name in groups:
                i += 1
                name = f"{base}#{i}"
            names[r], groups[name] = name, self.size[r]
        return groups, names


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def align(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of dims of two shapes with the same number of entries (a view's grouping)."""
    i = j = 0
    out: list[tuple[list[int], list[int]]] = []
    while i < len(a) or j < len(b):
        ins, outs, pi, pj = [], [], 1, 1
        if i < len(a):
            pi, i = a[i], i + 1
            ins.append(i - 1)
        if j < len(b):
            pj, j = b[j], j + 1
            outs.append(j - 1)
        while pi != pj:
            if pi < pj and i < len(a):
                pi, i = pi * a[i], i + 1
                ins.append(i - 1)
            elif j < len(b):
                pj, j = pj * b[j], j + 1
                outs.append(j - 1)
            else:
                break
        out.append((ins, outs))
    return out
