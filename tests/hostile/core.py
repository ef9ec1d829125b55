"""What every surface of the hostile sweep shares: outcomes, typed errors, file snapshots.

An input's outcome is one of :data:`OUTCOMES`:

* ``ok``: a valid input, accepted, with a sane result (finite, declared shapes);
* ``refused``: the project's typed error (a subclass of its error base), one line
  (for a CLI: exit status 2 and one ``...: error:`` line on stderr, no traceback);
* ``accepted_wrongly``: an invalid input accepted (non-finite or out-of-bound arrays,
  wrong shapes, claims out of range, a path outside where it belongs...);
* ``traceback``: any other exception (or, in a CLI, an error that is not typed);
* ``silently_wrong``: accepted, but the answer is wrong (NaN output, a changed input
  file, a partial output left behind, a result of the wrong type or shape);
* ``valid_refused``: a control input that is valid was refused (a sweep that refuses
  everything must not look perfect).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

OUTCOMES = ("ok", "refused", "accepted_wrongly", "traceback", "silently_wrong", "valid_refused")
BAD = OUTCOMES[2:]

MUST = True  # the mutation makes the input invalid: it must be refused
VALID = False  # a control: the input is still valid and must be accepted
EITHER = None  # may be valid or not: accepted ones are judged by the surface's oracle


@dataclass(frozen=True)
class Mut:
    """One kind of mutation: ``make`` builds the hostile input from a case context."""

    name: str
    make: Callable[..., Any]
    expect: bool | None = EITHER


@dataclass
class Case:
    surface: str
    mutation: str
    outcome: str
    detail: str = ""


class Refused(Exception):
    """Raised by a surface's runner to report a proper refusal it saw (message = detail)."""


def error_bases() -> tuple[type[BaseException], ...]:
    """The project's error base(s): one ``FMTLError`` once the hierarchy is unified; on
    older code also ``mobile_client.errors.MobileClientError``."""
    import fmtl_lightning.errors as fe
    import mobile_client.errors as me

    found = [fe.FMTLError] + [
        getattr(me, n) for n in ("FMTLError", "MobileClientError") if hasattr(me, n)
    ]
    return tuple(dict.fromkeys(found))


def one_line(text: str, limit: int = 240) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def judge_exception(exc: BaseException) -> tuple[str, str]:
    """``refused`` for a typed error with a message, else ``traceback``."""
    name = type(exc).__name__
    if isinstance(exc, error_bases()) and str(exc).strip():
        return "refused", f"{name}: {one_line(str(exc))}"
    return "traceback", f"{name} (not a typed error): {one_line(str(exc))}"


_NAMES = re.compile(r"'[^']+'|\"[^\"]+\"|--[a-z]|/\S+|\w+\.\w+|\w+\[\d+\]")


def names_something(message: str) -> bool:
    """Whether a refusal names what is wrong: a quoted key or field, an option, a path, a
    dotted or indexed field. (Reported by the sweep as a list, not counted as a failure.)"""
    text = re.sub(r"^(fmtl-edge: error: |\w+: )", "", message)
    return bool(_NAMES.search(text) or re.match(r"[\w.\[\]]+: ", text))  # "clients: ..."


def judge_accepted(
    expect: bool | None, problems: list[str], wrong: list[str], name: str = ""
) -> tuple[str, str]:
    """Outcome of an accepted input: ``problems`` make it invalid, ``wrong`` a bad answer."""
    if expect is MUST or problems:
        why = problems or [f"accepted, although {name or 'the mutation'} makes it invalid"]
        return "accepted_wrongly", "; ".join(why[:3])
    if wrong:
        return "silently_wrong", "; ".join(wrong[:3])
    return "ok", ""


def judge_refused(expect: bool | None, detail: str) -> tuple[str, str]:
    return ("valid_refused" if expect is VALID else "refused"), detail


# ----------------------------------------------------------------------------- arrays
def bound_of(dtype: np.dtype) -> float:
    """The project's magnitude bound for a float dtype: ``sqrt(finfo.max)`` (recomputed)."""
    return float(np.sqrt(np.float64(np.finfo(dtype).max)))


def array_problems(
    arrays: Mapping[str, Any], want: Mapping[str, tuple[tuple[int, ...], np.dtype]], what: str
) -> list[str]:
    """Key set, type, shape, dtype, finiteness and magnitude of ``arrays`` against ``want``."""
    out = []
    if set(arrays) != set(want):
        miss, extra = sorted(set(want) - set(arrays)), sorted(set(arrays) - set(want))
        out.append(f"{what}: keys differ (missing {miss[:3]}, extra {extra[:3]})")
    for k in sorted(set(arrays) & set(want)):
        a = arrays[k]
        shape, dtype = want[k]
        if type(a) is not np.ndarray:
            out.append(f"{what}: key {k!r} is a {type(a).__name__}, not an ndarray")
            continue
        if a.shape != tuple(shape) or a.dtype != dtype:
            out.append(
                f"{what}: key {k!r} is {a.dtype}{list(a.shape)}, declared {dtype}{list(shape)}"
            )
            continue
        if a.dtype.kind == "f" and a.size:
            with np.errstate(invalid="ignore", over="ignore"):
                if not np.isfinite(a).all():
                    out.append(f"{what}: key {k!r} has NaN/Inf")
                elif float(np.abs(a).max()) > bound_of(a.dtype):
                    out.append(
                        f"{what}: key {k!r} has |x| {float(np.abs(a).max()):.3g} past the bound"
                    )
    return out


def layout(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {k: (np.shape(v), np.asarray(v).dtype) for k, v in arrays.items()}


def same_arrays(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a.keys() == b.keys() and all(
        np.asarray(a[k]).dtype == np.asarray(b[k]).dtype and np.array_equal(a[k], b[k]) for k in a
    )


# ----------------------------------------------------------------------------- files
def tree_state(paths: Iterable[Path]) -> dict[str, str]:
    """sha256 of every regular file under (or at) ``paths``; dirs, links and absences noted."""
    out: dict[str, str] = {}
    for root in paths:
        todo = [root]
        while todo:
            p = todo.pop()
            if p.is_symlink():
                out[str(p)] = f"link:{os.readlink(p)}"
            elif p.is_dir():
                out[str(p)] = "dir"
                todo.extend(sorted(p.iterdir()))
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.exists():
                out[str(p)] = "special"
            else:
                out[str(p)] = "absent"
    return out


def changed(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
