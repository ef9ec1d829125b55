"""Session fixture: exports cached once per test session (helpers live in export_helpers)."""

from __future__ import annotations

import pytest
from export_helpers import Exports


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Exports:
    return Exports(tmp_path_factory.mktemp("export"))
