"""Training in a web page: the web edge client's step in headless Chromium next to the
Python edge client and torch, on the same machine in one run.

The model, data and batches of :mod:`benchmarks.bench_edge`: CNN (32, 64, 128) GroupNorm
with a 10-class MNIST head at widths 1, 1/2, 1/4; 1 epoch over 1024 real MNIST training
images at batch 32 (32 SGD steps), after one untimed warm-up step. Browser: the module of
``mobile_client/web`` on onnxruntime-web (WebAssembly, 1 thread) in Debian's Chromium
(headless, driven by Playwright), timed inside the page: the first epoch, then the best
of 3 more (V8 compiles the WebAssembly lazily and tiers it up during the first);
Python edge: ``mobile_client.EdgeClient`` (onnxruntime, 1 thread); torch: plain SGD with
torch + lightning imported (1 thread): bench_edge's scripts, best of 3 fresh processes.

    python -m benchmarks.bench_browser
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np

from benchmarks.bench_edge import EDGE, TASK, TORCH, WIDTHS, _best, cnn_bundle
from benchmarks.common import write_section

STEPS = 32
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]  # fmt: skip

IN_PAGE = """
async (repeats) => {
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
  const epochs = [];
  for (let i = 0; i <= repeats; i++) {
    const t0 = performance.now();
    const r = await c.train(a.x, y, { epochs: 1, batchSize: 32, lr: 0.05, seed: 0 });
    if (r.metrics.steps !== 32) throw new Error(`${r.metrics.steps} steps`);
    epochs.push((performance.now() - t0) / 1000);
  }
  return epochs;
}
"""


def browser_train_s(browser, bundle: Path, data: Path, repeats: int = 3) -> tuple[float, float]:
    """``(first, best)``: in-page seconds of the first epoch (32 steps) after one warm-up
    step (V8 still compiling the WebAssembly lazily and tiering it up) and the best of
    the ``repeats`` epochs after it, on ``bundle`` in ``browser``."""
    from mobile_client.web.serve import EdgeWebServer

    srv = EdgeWebServer(("127.0.0.1", 0), bundle, data.parent)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        ctx = browser.new_context()
        page = ctx.new_page()
        page.goto(srv.url)
        epochs = page.evaluate(IN_PAGE, repeats)
        ctx.close()
    finally:
        srv.shutdown()
        srv.server_close()
    return epochs[0], min(epochs[1:])


def main() -> None:
    from playwright.sync_api import sync_playwright

    from fmtl_lightning.data import load_mnist
    from mobile_client.batching import label_key

    tmp = Path(tempfile.mkdtemp(prefix="fmtl-bench-browser-"))
    rows = []
    try:
        tr = load_mnist("train")
        x = ((tr.images[:1024].astype(np.float32) / 255 - tr.mean) / tr.std)[:, None]
        data = tmp / "data" / "data.npz"
        data.parent.mkdir()
        y = tr.labels[:1024].astype(np.int64)
        np.savez(data, x=x, **{label_key(TASK): y}, x_test=x[:32])  # type: ignore[arg-type]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            for width in WIDTHS:
                bundle = cnn_bundle(tmp / f"w{width:g}", width, float(tr.mean), float(tr.std))
                rows.append({
                    "width": width,
                    "torch": _best(TORCH, str(bundle), str(data), "train", str(width))["work_s"],
                    "ort": _best(EDGE, str(bundle), str(data), "train")["work_s"],
                })  # fmt: skip
                rows[-1]["browser_first"], rows[-1]["browser"] = browser_train_s(
                    browser, bundle, data
                )
            browser.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    lines = [
        "| width | torch (steps/s) | Python ORT (steps/s) | browser, WASM 1 thread (steps/s) "
        "| browser/torch time | browser/Python ORT time | browser, first epoch (steps/s) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sps = {k: STEPS / r[k] for k in ("torch", "ort", "browser")}
        lines.append(
            f"| {r['width']:g} | {sps['torch']:.1f} | {sps['ort']:.1f} | {sps['browser']:.1f} | "
            f"{r['browser'] / r['torch']:.2f}x | {r['browser'] / r['ort']:.2f}x | "
            f"{STEPS / r['browser_first']:.1f} |"
        )
    md = (
        "## Training in a web page: steps per second\n\n"
        "bench_edge's CNN (32, 64, 128) GroupNorm MNIST model, 1 epoch of 32 SGD steps at "
        "batch 32 after one untimed warm-up step. Browser: `mobile_client/web` on "
        "onnxruntime-web (WebAssembly, 1 thread) in headless Debian Chromium, timed in the "
        "page: the best of 3 epochs after a first one, shown apart (V8 compiles the "
        "WebAssembly lazily and tiers it up while the first epoch runs); Python ORT: "
        "`mobile_client.EdgeClient` (onnxruntime, 1 thread) and torch (plain SGD, 1 thread): "
        "bench_edge's scripts, best of 3 fresh processes. Same machine, one run.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    write_section("browser", md)
    print(md)


if __name__ == "__main__":
    main()
