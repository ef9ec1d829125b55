"""The browser row of :mod:`benchmarks.bench_edge`: the web edge client's training step in
headless Chromium (onnxruntime-web, WebAssembly, 1 thread), timed inside the page.

The module of ``mobile_client/web`` loads a bundle from :class:`mobile_client.web.serve.
EdgeWebServer`, takes one untimed warm-up step, then trains 1 epoch (32 steps at batch 32)
``1 + repeats`` times: the first epoch apart (V8 compiles the WebAssembly lazily and tiers
it up while it runs), then the best of the rest, in wall time and in the CPU time of the
browser's processes (``/proc``; on a shared machine the wall time counts other jobs too). Debian's Chromium, driven by Playwright
(its own browser downloads are not reachable here).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

STEPS = 32
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]  # fmt: skip

SETUP = """
async () => {
  const ort = await import("onnxruntime-web");
  ort.env.wasm.numThreads = 1;
  ort.env.wasm.wasmPaths = new URL("./ort/", location.href).href;
  const { openClient } = await import("./edge.js");
  const { readNpz } = await import("./arrays.js");
  const c = await openClient("bundle/", { ort });
  const raw = await (await fetch("data/data.npz")).arrayBuffer();
  const a = await readNpz(raw, ["x", "y__mnist__digit"], "data.npz");
  const y = { "mnist/digit": Array.from(a.y__mnist__digit.data, Number) };
  const per = a.x.shape.slice(1).reduce((p, q) => p * q, 1);
  const head = { ...a.x, shape: [32, ...a.x.shape.slice(1)], data: a.x.data.subarray(0, 32 * per) };
  await c.train(head, { "mnist/digit": y["mnist/digit"].slice(0, 32) }, { epochs: 1, batchSize: 32, lr: 0.05 });
  window.__bench = { c, x: a.x, y };
}
"""

EPOCH = """
async () => {
  const { c, x, y } = window.__bench;
  const t0 = performance.now();
  const r = await c.train(x, y, { epochs: 1, batchSize: 32, lr: 0.05, seed: 0 });
  if (r.metrics.steps !== 32) throw new Error(`${r.metrics.steps} steps`);
  return (performance.now() - t0) / 1000;
}
"""


def tree_cpu_s(root: int) -> float:
    """User + system CPU seconds of every live descendant of process ``root`` (the
    browser's processes: renderer, GPU, network; not ``root`` itself)."""
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, float]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        procs[int(d.name)] = (int(f[1]), (int(f[11]) + int(f[12])) / tick)
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        kids.setdefault(ppid, []).append(pid)
    total, todo = 0.0, list(kids.get(root, []))
    while todo:
        pid = todo.pop()
        total += procs[pid][1]
        todo += kids.get(pid, [])
    return total


def browser_train_s(browser: Any, bundle: Path, data: Path, repeats: int = 3) -> dict[str, float]:
    """Seconds per epoch (32 steps) after one warm-up step, on ``bundle`` in ``browser``
    (a Playwright browser): ``first`` (in-page wall time of the first epoch), ``best``
    (best in-page wall time of the ``repeats`` after it) and ``cpu`` (the least CPU time
    the browser's processes spent on one of those). ``data``: an ``.npz`` with ``x`` and
    ``y__mnist__digit``, served alone from its directory."""
    from mobile_client.web.serve import EdgeWebServer

    srv = EdgeWebServer(("127.0.0.1", 0), bundle, data.parent)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    walls, cpus = [], []
    try:
        ctx = browser.new_context()
        page = ctx.new_page()
        page.goto(srv.url)
        page.evaluate(SETUP)
        for _ in range(repeats + 1):
            c0 = tree_cpu_s(os.getpid())
            walls.append(page.evaluate(EPOCH))
            cpus.append(tree_cpu_s(os.getpid()) - c0)
        ctx.close()
    finally:
        srv.shutdown()
        srv.server_close()
    return {"first": walls[0], "best": min(walls[1:]), "cpu": min(cpus[1:])}


def unavailable() -> str | None:
    """Why the browser row cannot be measured here (None: it can)."""
    if not Path(CHROMIUM).is_file():
        return f"no {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed"
    web = Path(__file__).resolve().parent.parent / "mobile_client" / "web" / "node_modules"
    if not (web / "onnxruntime-web").is_dir():
        return "onnxruntime-web is not installed (make setup runs npm ci)"
    return None
