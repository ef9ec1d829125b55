"""Import a callable a config names by path (``model.factory``, ``data.factory``):
``"package.module:callable"``; errors are :class:`ConfigError` naming the field. What the
factories return is checked where they are called (``model_source.model_from_factory``,
``fed_data.federation_from_factory``)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from fmtl_lightning.config.schema import ConfigError

FACTORY_FORMAT = "'package.module:callable'"


def import_factory(path: str, field: str) -> Callable[..., Any]:
    """The callable ``path`` names; :class:`ConfigError` naming ``field`` otherwise."""
    from fmtl_lightning.tasks import FACTORY_RE

    if not isinstance(path, str) or not FACTORY_RE.fullmatch(path):
        raise ConfigError(f"{field}: {path!r} must be an import path {FACTORY_FORMAT}")
    mod_name, attr = path.split(":")
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{field}: {path!r} cannot be imported: {exc}") from exc
    if not callable(fn):
        raise ConfigError(f"{field}: {path!r} is not callable")
    return fn


def call_factory(fn: Callable[..., Any], path: str, field: str, *args: Any) -> Any:
    """``fn(*args)``, once its signature is known to take ``args`` (else :class:`ConfigError`
    naming ``field`` and what it must take)."""
    try:
        inspect.signature(fn).bind(*args)
    except TypeError as exc:
        takes = "no arguments" if not args else "the RunConfig as its one argument"
        raise ConfigError(f"{field}: {path!r} must take {takes} ({exc})") from exc
    except ValueError:  # no signature (a builtin): let the call decide
        pass
    return fn(*args)
