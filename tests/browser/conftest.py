"""Fixtures of the browser tests: the system Chromium under Playwright, a tiny exported
bundle, the page's server, and a few real digits written as PNG files.

Needs Debian's ``chromium`` (``/usr/bin/chromium``; Playwright's own browser downloads are
not used), the ``playwright`` package (the ``dev`` extra) and ``npm ci`` in
``mobile_client/web`` (all three are done by ``make setup``). When one is missing the tests
fail under ``CI=true`` with what to run, and are skipped with that reason elsewhere.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser_helpers import CFG, CHROMIUM, CHROMIUM_ARGS, missing

from mobile_client.web.serve import ORT_DIST, EdgeWebServer
from tests.mobile_client.edge_helpers import run_and_export


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before any fixture of a browser test is built (the bundle takes a while): is
    everything the browser needs installed?"""
    if "page" not in getattr(item, "fixturenames", ()):
        return
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing("the Python package playwright (pip install -e '.[dev]')")
    if not os.access(CHROMIUM, os.X_OK):
        missing(f"Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    if not (ORT_DIST / "ort.wasm.min.mjs").is_file():
        missing(f"onnxruntime-web in {ORT_DIST} (cd mobile_client/web && npm ci)")


@pytest.fixture(scope="module")
def browser():  # -> playwright.sync_api.Browser
    """One headless system Chromium per test module."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(run_dir, bundle)``: a one-round tiny CNN (batch norm: an int64 0-d counter
    travels) of one client with a multiclass and a multilabel task, exported."""
    return run_and_export(CFG, tmp_path_factory.mktemp("browser"))


@pytest.fixture
def serve():
    """``serve(bundle, data=None) -> EdgeWebServer`` on a free port of 127.0.0.1."""
    servers: list[EdgeWebServer] = []

    def start(bundle: Path, data: Path | None = None, updates: Path | None = None):
        srv = EdgeWebServer(("127.0.0.1", 0), bundle, data, updates)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture
def page(browser) -> Iterator:  # -> playwright.sync_api.Page
    ctx = browser.new_context(accept_downloads=True)
    pg = ctx.new_page()
    pg.set_default_timeout(30_000)
    yield pg
    ctx.close()


def copy_bundle(bundle: Path, dst: Path) -> Path:
    shutil.copytree(bundle, dst)
    return dst
