"""Session fixture: the tiny MLP run + bundle, exported once for every edge test file."""

from __future__ import annotations

from pathlib import Path

import pytest
from edge_helpers import MLP_CFG, run_and_export


@pytest.fixture(scope="session")
def mlp_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(run_dir, bundle)`` of :data:`edge_helpers.MLP_CFG` (treat both as read-only)."""
    return run_and_export(MLP_CFG, tmp_path_factory.mktemp("edge"))
