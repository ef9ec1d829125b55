"""The project's typed errors: one base, :class:`FMTLError`, for every package.

``mobile_client`` is the ground floor, so the base lives here (stdlib only: importing
it needs neither numpy nor torch); ``fmtl_lightning.errors`` re-exports it and adds
the training-side errors. Every CLI (``fmtl``, ``fmtl export``, ``fmtl deploy``,
``fmtl-edge``) catches :class:`FMTLError` and prints :func:`error_line` (one line,
exit status 2); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class FMTLError(Exception):
    """Base class of every error raised on purpose by fmtl-lightning (all packages).

    Raised for what a user or a remote party can cause: a bad config, file, input,
    update or reply. The message names the key, field or file.
    """


class ManifestError(FMTLError, ValueError):
    """A manifest.json that is missing, malformed, of an unknown format version, that
    contradicts itself (a cross-reference to a missing key, client, width or head), or
    that names a file which is missing, whose sha256 differs or which does not load.
    The message names the field (dotted path) or the file."""


class SafetensorsError(FMTLError, ValueError):
    """A safetensors file with a malformed header, offsets or dtype (names file and key)."""


class UpdateError(FMTLError, ValueError):
    """A client update whose metadata, arrays or base hash are wrong (names field/key/file)."""


class InputError(FMTLError, ValueError):
    """Inputs or targets given to the edge runtime that are of the wrong shape, dtype or
    value, or an input file that cannot be read (names what is wrong, with what was
    expected and what was found)."""


def error_line(exc: BaseException) -> str:
    """``exc``'s message on one line (a CLI prints exactly one line per error)."""
    return " ".join(str(exc).split()) or type(exc).__name__
