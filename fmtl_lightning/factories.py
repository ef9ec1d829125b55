"""Import a user's factory named in a config: ``"package.module:callable"``.

``model.factory`` names a callable returning a
:class:`~fmtl_lightning.model_source.FederatedModel` (any :class:`ModelSource`);
``data.factory`` one taking the :class:`~fmtl_lightning.config.RunConfig` and returning a
:class:`~fmtl_lightning.fed_data.Federation` (e.g. from
:func:`~fmtl_lightning.fed_data.federation_from_tensors`). A config names code to run, so
it is as trusted as a Python script. Errors are :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from fmtl_lightning.config import ConfigError

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


def _call(fn: Callable[..., Any], path: str, field: str, *args: Any) -> Any:
    try:
        inspect.signature(fn).bind(*args)
    except TypeError as exc:
        takes = "no arguments" if not args else "the RunConfig as its one argument"
        raise ConfigError(f"{field}: {path!r} must take {takes} ({exc})") from exc
    except ValueError:  # no signature (a builtin): let the call decide
        pass
    return fn(*args)


def model_from_factory(path: str) -> Any:
    """The model ``model.factory`` builds (checked to be a model source)."""
    made = _call(import_factory(path, "model.factory"), path, "model.factory")
    if not (callable(getattr(made, "build", None)) and callable(getattr(made, "spec", None))):
        raise ConfigError(f"model.factory: {path!r} must return a FederatedModel "
                          f"(build/spec), got {type(made).__name__}")  # fmt: skip
    return made


def federation_from_factory(path: str, cfg: Any) -> Any:
    """The federation ``data.factory`` builds for ``cfg`` (checked against its clients)."""
    from fmtl_lightning.fed_data import Federation

    fed = _call(import_factory(path, "data.factory"), path, "data.factory", cfg)
    if not isinstance(fed, Federation):
        raise ConfigError(f"data.factory: {path!r} must return a Federation, "
                          f"got {type(fed).__name__}")  # fmt: skip
    want = [(tuple(g.tasks), float(g.width)) for g in cfg.clients for _ in range(g.count)]
    got = [(c.tasks, float(c.width)) for c in fed.clients]
    if got != want:
        raise ConfigError(f"data.factory: {path!r} gave clients (tasks, width) {got[:4]}..., "
                          f"the config's clients are {want[:4]}...")  # fmt: skip
    return fed
