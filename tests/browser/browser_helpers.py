"""Helpers of the browser tests: the system Chromium's path and flags, the missing-install
policy, real digits written as PNG files, and waiting on the page."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.mobile_client.edge_helpers import CNN_CFG, digits

CHROMIUM = Path(os.environ.get("FMTL_CHROMIUM", "/usr/bin/chromium"))
# as the machine's notes start it: no sandbox (root), no background connections
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TASKS = ("digits/digit", "digits/attrs")
CFG = {**CNN_CFG, "clients": [{"count": 1, "tasks": list(TASKS), "width": 0.5}]}


def missing(what: str) -> None:
    """Fail under CI (a missing install step must not pass unseen), skip elsewhere."""
    msg = f"browser tests need {what} (`make setup` installs it)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def write_images(root: Path, n: int, split: str = "train") -> tuple[np.ndarray, dict]:
    """``n`` real digits as 8-bit grayscale PNGs + ``data.json`` (their labels) in
    ``root``; returns the pixels ``(n, 8, 8)`` uint8 and the targets."""
    from PIL import Image

    px, _, ys = digits(n, TASKS, split)
    root.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(n):
        Image.fromarray(px[i], mode="L").save(root / f"img{i}.png")
        labels = {
            "digits/digit": int(ys["digits/digit"][i]),
            "digits/attrs": ys["digits/attrs"][i].astype(int).tolist(),
        }
        images.append({"file": f"img{i}.png", "labels": labels})
    (root / "data.json").write_text(json.dumps({"images": images}))
    return px, ys


def settle(pg) -> None:
    """Wait until the page is idle (its last action finished or failed)."""
    pg.wait_for_function("() => window.fmtlPage && window.fmtlPage.ready && !window.fmtlPage.busy")


def page_error(pg) -> str:
    """The text of the page's error box ('' when none), once the page is idle."""
    settle(pg)
    return (pg.text_content("#error") or "").strip()
