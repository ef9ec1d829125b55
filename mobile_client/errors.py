"""Typed errors of the edge runtime (stdlib only: no numpy/torch needed to import them)."""

from __future__ import annotations


class MobileClientError(Exception):
    """Base class of every error raised on purpose by :mod:`mobile_client`."""


class ManifestError(MobileClientError, ValueError):
    """A manifest.json that is missing, malformed, of an unknown format version, or
    that names a file which is missing or whose sha256 differs. The message names
    the field (dotted path) or the file."""


class SafetensorsError(MobileClientError, ValueError):
    """A safetensors file with a malformed header, offsets or dtype (names file and key)."""


class UpdateError(MobileClientError, ValueError):
    """A client update whose metadata, arrays or base hash are wrong (names field/key/file)."""


class InputError(MobileClientError, ValueError):
    """Inputs or targets given to the edge runtime that are of the wrong shape, dtype or
    value (names what is wrong, with what was expected and what was found)."""
