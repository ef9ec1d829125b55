"""Run configuration: frozen dataclasses read from YAML, checked before any training.

Every field has a default and a documented meaning (see README "Config fields").
Unknown keys are errors (a typo never silently drops a setting), and every
error names the field, e.g. ``clients[2].width``.

This package's namespace is the public API; its modules own the parts:

* :mod:`~fmtl_lightning.config.schema`: the dataclasses and :class:`ConfigError`;
* :mod:`~fmtl_lightning.config.parse`: YAML / mappings -> :class:`RunConfig`
  (:func:`load_config`, :func:`parse_config`) and back (:func:`config_to_dict`);
* :mod:`~fmtl_lightning.config.checks`: :func:`validate_config` and its bounds.
"""

from __future__ import annotations

from fmtl_lightning.config.checks import validate_config
from fmtl_lightning.config.parse import config_to_dict, load_config, parse_config
from fmtl_lightning.config.schema import (
    AlgorithmConfig,
    CheckpointConfig,
    ClientGroup,
    ConfigError,
    DataConfig,
    FederationConfig,
    ModelConfig,
    OptimizerConfig,
    PartitionConfig,
    RunConfig,
)

__all__ = [
    "AlgorithmConfig",
    "CheckpointConfig",
    "ClientGroup",
    "ConfigError",
    "DataConfig",
    "FederationConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PartitionConfig",
    "RunConfig",
    "config_to_dict",
    "load_config",
    "parse_config",
    "validate_config",
]
