"""Edge runtime vs a torch-based client vs the browser: peak memory, predict time, and the
training step against its physical floor, all from one run.

Each measurement runs in a fresh Python process, so peak resident memory (``VmHWM``)
covers imports, model loading and the work itself:

* edge: ``mobile_client.EdgeClient`` (numpy + onnxruntime only) on an exported bundle,
  training through I/O binding (its default) and, as ``plain``, feeding numpy every step;
* torch: ``fmtl_lightning`` (torch + lightning imported, as our Lightning client does)
  with the same weights, the same images and the same batches, plain SGD;
* browser: ``mobile_client/web`` on onnxruntime-web in headless Chromium
  (:mod:`benchmarks.browser_steps`), when Chromium, Playwright and ``npm ci`` are there.

CNN (32, 64, 128) GroupNorm with a 10-class MNIST head, widths 1, 1/2, 1/4; predict
= 256 real MNIST test images at batch 32, then 64 of them one by one (batch 1); train
= 1 epoch over 1024 real MNIST training images at batch 32 (32 steps). One thread
everywhere. The floor of a step is its convolutions' and linears' multiply-adds
(forward, weight gradient, input gradient except the first layer's) at one core's
measured peak: the best GFLOP/s of a large float32 matmul in numpy (BLAS) and in
onnxruntime (MLAS, weights constant so packed), 1 thread.

    python -m benchmarks.bench_edge
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import REPO_ROOT, write_section

WIDTHS = (1.0, 0.5, 0.25)
STEPS = 32  # one epoch of 1024 images at batch 32
TASK = "mnist/digit"

# both measured scripts start with this: nothing imported yet but the stdlib
PRELUDE = r"""
import json, sys, time
clock = time.process_time  # CPU time: what the work costs, not how busy the machine was
def hwm():  # peak RSS of this process image (VmHWM resets at exec; ru_maxrss does not)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

EDGE = (
    PRELUDE
    + r"""
import numpy as np
from mobile_client.inputs import read_client_data, read_npz
from mobile_client.runtime import EdgeClient
bundle, data, job = sys.argv[1:4]
x, ys = read_client_data(data, ["mnist/digit"])
d = {"x": x, "y": ys["mnist/digit"], "x_test": read_npz(data, ["x_test"])["x_test"]}
t0 = clock()
c = EdgeClient(bundle, threads=1, io_binding=job != "train_plain")
one_s = None
if job == "predict":
    x = d["x_test"]
    c.predict("mnist/digit", x[:32])  # warm-up: session creation, first-run allocations
    t1 = clock()
    for i in range(0, len(x), 32):
        c.predict("mnist/digit", x[i:i + 32])
    t2 = clock()
    for i in range(64):
        c.predict("mnist/digit", x[i:i + 1])
    one_s = (clock() - t2) / 64
    t1 += clock() - t2  # work_s: the batch-32 loop alone
else:
    c.train(d["x"][:32], {"mnist/digit": d["y"][:32]}, epochs=1, batch_size=32, lr=0.05)
    t1 = clock()
    r = c.train(d["x"], {"mnist/digit": d["y"]}, epochs=1, batch_size=32, lr=0.05, seed=0)
t2 = clock()
assert "torch" not in sys.modules
print(json.dumps({"load_s": t1 - t0, "work_s": t2 - t1, "one_s": one_s,
                  "rss_mb": hwm()}))
"""
)

TORCH = (
    PRELUDE
    + r"""
import numpy as np
t0 = clock()
one_s = None
import torch, lightning  # what a Lightning client process imports
torch.set_num_threads(1)
from fmtl_lightning.models import BackboneConfig, MultiTaskModel, load_arrays
from mobile_client.batching import batch_order
from mobile_client.inputs import read_client_data, read_npz
bundle, data, job, width = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
x, ys = read_client_data(data, ["mnist/digit"])
d = {"x": x, "y": ys["mnist/digit"], "x_test": read_npz(data, ["x_test"])["x_test"]}
w = read_npz(f"{bundle}/weights_client.npz")
m = MultiTaskModel(BackboneConfig("cnn", hidden=(32, 64, 128), norm="group"), {"mnist/digit": 10}, width)
load_arrays(m, w)
t1 = clock()
if job == "predict":
    m.eval()
    x = torch.from_numpy(d["x_test"])
    with torch.inference_mode():
        m(x[:32])  # warm-up
    t1 = clock()
    with torch.inference_mode():
        for i in range(0, len(x), 32):
            m(x[i:i + 32])
    t2 = clock()
    with torch.inference_mode():
        for i in range(64):
            m(x[i:i + 1])
    one_s = (clock() - t2) / 64
    t1 += clock() - t2
else:
    m.train()
    x, y = torch.from_numpy(d["x"]), torch.from_numpy(d["y"])
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    for idx in list(batch_order(len(x), 32, 1, None, 0))[:1]:  # warm-up step
        i = torch.from_numpy(idx)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x[i])["mnist/digit"], y[i]).backward()
        opt.step()
    t1 = clock()
    for idx in batch_order(len(x), 32, 1, None, 0):
        i = torch.from_numpy(idx)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(x[i])["mnist/digit"], y[i])
        loss.backward()
        opt.step()
t2 = clock()
print(json.dumps({"load_s": t1 - t0, "work_s": t2 - t1, "one_s": one_s,
                  "rss_mb": hwm()}))
"""
)


def _run(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _best(code: str, *args: str, repeats: int = 3) -> dict:
    runs = [_run(code, *args) for _ in range(repeats)]
    ones = [r["one_s"] for r in runs if r.get("one_s") is not None]
    return {
        "work_s": min(r["work_s"] for r in runs),
        "load_s": min(r["load_s"] for r in runs),
        "rss_mb": max(r["rss_mb"] for r in runs),
        "one_s": min(ones) if ones else None,
    }


def cnn_bundle(out: Path, width: float, mean: float, std: float) -> Path:
    """The MNIST CNN (32, 64, 128) at ``width`` (seed 0), exported to ``out``."""
    import torch

    from export.run_export import export_model
    from fmtl_lightning.models import BackboneConfig, MultiTaskModel

    torch.manual_seed(0)
    model = MultiTaskModel(
        BackboneConfig("cnn", hidden=(32, 64, 128), norm="group"), {TASK: 10}, width
    )
    norm = {"mean": mean, "std": std, "input_shape": [1, 28, 28], "domain": "mnist"}
    export_model(model, {TASK: "multiclass"}, out, client="client", normalisation=norm)
    return out


PEAK = r"""
import json, time
import numpy as np
import onnx, onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
n = 1024
a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
def best(f, reps=20):
    f()
    ts = []
    for _ in range(reps):
        t = time.thread_time(); f(); ts.append(time.thread_time() - t)  # CPU time
    return 2 * n**3 / min(ts) / 1e9
g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                      [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
                      [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
                      [numpy_helper.from_array(b, "b")])
o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1
s = ort.InferenceSession(helper.make_model(g).SerializeToString(), o,
                         providers=["CPUExecutionProvider"])
print(json.dumps({"numpy": best(lambda: a @ b), "mlas": best(lambda: s.run(None, {"a": a}))}))
"""


def peak_gflops() -> dict[str, float]:
    """One core's float32 matmul GFLOP/s (1024^3): numpy's BLAS and onnxruntime's MLAS,
    in a fresh process with every thread pool at 1."""
    one = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    env = {**os.environ, **one}
    out = subprocess.run([sys.executable, "-c", PEAK], capture_output=True, text=True,
                         env=env, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_gflop(width: float, batch: int = 32) -> float:
    """GFLOP of one training step of the benchmark's model at ``width``: 2 x the
    multiply-adds of every Conv2d and Linear forward, weight gradient and input gradient
    (none for the first layer, whose input is the data); norms, ReLUs and pools not
    counted."""
    import torch
    from torch import nn

    from fmtl_lightning.models import BackboneConfig, MultiTaskModel

    m = MultiTaskModel(BackboneConfig("cnn", hidden=(32, 64, 128), norm="group"), {TASK: 10}, width)
    macs: list[int] = []

    def hook(mod: nn.Module, _inp: object, out: torch.Tensor) -> None:
        w = mod.weight  # type: ignore[union-attr]
        macs.append(out.numel() * (w[0].numel()))  # out elements x (Cin/groups * kh * kw)

    hs = [mod.register_forward_hook(hook) for mod in m.modules()
          if isinstance(mod, nn.Conv2d | nn.Linear)]  # fmt: skip
    with torch.no_grad():
        m(torch.zeros(batch, 1, 28, 28))
    for h in hs:
        h.remove()
    return 2 * (3 * sum(macs) - macs[0]) / 1e9


def browser_rows(widths: dict[float, Path], data: Path) -> dict[float, dict[str, float]] | str:
    """width -> :func:`~benchmarks.browser_steps.browser_train_s` of its bundle, or why
    there is no browser row."""
    from benchmarks.browser_steps import CHROMIUM, CHROMIUM_ARGS, browser_train_s, unavailable

    why = unavailable()
    if why:
        return why
    from playwright.sync_api import sync_playwright

    out = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for w, bundle in widths.items():
            out[w] = browser_train_s(browser, bundle, data)
        browser.close()
    return out


def main() -> None:
    from fmtl_lightning.data import load_mnist
    from mobile_client.batching import label_key

    loads = [" / ".join(f"{x:.2f}" for x in os.getloadavg())]
    tmp = Path(tempfile.mkdtemp(prefix="fmtl-bench-edge-"))
    try:
        tr, te = load_mnist("train"), load_mnist("test")
        norm = lambda im: ((im.astype(np.float32) / 255 - tr.mean) / tr.std)[:, None]  # noqa: E731
        data = tmp / "data" / "data.npz"  # its directory alone is served to the browser
        data.parent.mkdir()
        np.savez(
            data,
            x=norm(tr.images[:1024]),
            **{label_key(TASK): tr.labels[:1024].astype(np.int64)},
            x_test=norm(te.images[:256]),
        )
        peak = peak_gflops()
        rows, bundles = [], {}
        for width in WIDTHS:
            bundle = cnn_bundle(tmp / f"w{width:g}", width, float(tr.mean), float(tr.std))
            bundles[width] = bundle
            row: dict = {"width": width, "gflop": step_gflop(width)}
            for job in ("predict", "train"):
                row[f"edge_{job}"] = _best(EDGE, str(bundle), str(data), job)
                row[f"torch_{job}"] = _best(TORCH, str(bundle), str(data), job, str(width))
            row["edge_plain"] = _best(EDGE, str(bundle), str(data), "train_plain")
            rows.append(row)
        browser = browser_rows(bundles, data)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    md = report(rows, peak, browser, loads)
    write_section("edge", md)
    print(md)


def report(rows: list[dict], peak: dict[str, float], browser: dict | str, loads: list[str]) -> str:
    """BENCHMARKS.md's edge section from the measurements of :func:`main` (``loads``: the
    load average at the start)."""
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    gflops = max(peak.values())
    mem = [
        "| width | job | edge peak RSS (MB) | torch peak RSS (MB) | edge/torch memory (goal <= 0.33) | edge CPU time (s) | torch CPU time (s) | edge/torch time |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for job in ("predict", "train"):
            e, t = r[f"edge_{job}"], r[f"torch_{job}"]
            m, tim = e["rss_mb"] / t["rss_mb"], e["work_s"] / t["work_s"]
            mem.append(
                f"| {r['width']:g} | {job} | {e['rss_mb']:.0f} | {t['rss_mb']:.0f} | "
                f"{m:.2f} ({'yes' if m <= 1 / 3 else 'no'}) | {e['work_s']:.3f} | "
                f"{t['work_s']:.3f} | {tim:.2f}x |"
            )
    w1 = next(r for r in rows if r["width"] == 1.0)
    one = ["| width | edge batch-1 predict (ms) | of width 1 (goal <= 0.25 at 1/4) | torch batch-1 predict (ms) | of width 1 |",
           "|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        e, t = r["edge_predict"]["one_s"], r["torch_predict"]["one_s"]
        e1, t1 = w1["edge_predict"]["one_s"], w1["torch_predict"]["one_s"]
        one.append(
            f"| {r['width']:g} | {e * 1e3:.3f} | {e / e1:.2f} | {t * 1e3:.3f} | {t / t1:.2f} |"
        )
    has_b = isinstance(browser, dict)
    steps = [
        "| width | step GFLOP | floor (ms) | torch (ms, x floor) | Python ORT, I/O binding (ms, x floor) "
        "| ORT/torch (goal <= 0.8) | Python ORT, numpy feeds (ms) | browser WASM (ms, x floor) "
        "| browser/torch | steps/s torch / ORT / browser |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        floor = r["gflop"] / gflops * 1e3
        t = r["torch_train"]["work_s"] / STEPS * 1e3
        o = r["edge_train"]["work_s"] / STEPS * 1e3
        pl = r["edge_plain"]["work_s"] / STEPS * 1e3
        if has_b:
            b = browser[r["width"]]["cpu"] / STEPS * 1e3
            bcell, bt, bs = f"{b:.1f} ({b / floor:.1f}x)", f"{b / t:.2f}x", f"{1e3 / b:.1f}"
        else:
            bcell, bt, bs = "n/a", "n/a", "n/a"
        steps.append(
            f"| {r['width']:g} | {r['gflop']:.3f} | {floor:.1f} | {t:.1f} ({t / floor:.1f}x) | "
            f"{o:.1f} ({o / floor:.1f}x) | {o / t:.2f}x ({'yes' if o / t <= 0.8 else 'no'}) | "
            f"{pl:.1f} | {bcell} | {bt} | {1e3 / t:.1f} / {1e3 / o:.1f} / {bs} |"
        )
    bnote = (
        "Browser: `mobile_client/web` on onnxruntime-web (WebAssembly, 1 thread) in headless "
        "Debian Chromium: the least CPU time of 3 epochs after a first one (V8 "
        "compiles the WebAssembly lazily and tiers it up during the first; first-epoch "
        "steps/s: "
        + ", ".join(f"width {w:g} {STEPS / v['first']:.1f}" for w, v in browser.items())
        + "; steps/s in the page's wall time, best epoch: "
        + ", ".join(f"width {w:g} {STEPS / v['best']:.1f}" for w, v in browser.items())
        + ")."
        if has_b
        else f"Browser: not measured ({browser})."
    )
    return (
        "## Edge runtime vs a torch client vs the browser: memory, predict, the training step\n\n"
        "CNN (32, 64, 128) GroupNorm with a 10-class MNIST head. predict: 256 real MNIST test "
        "images at batch 32, then 64 at batch 1. train: 1 epoch over 1024 real MNIST training "
        "images at batch 32 (32 steps). Edge: `mobile_client.EdgeClient` (numpy + onnxruntime "
        "only), training through I/O binding (state in onnxruntime-owned buffers); torch: "
        "`fmtl_lightning` with torch + lightning imported, the same weights, images and "
        "batches, plain SGD. One thread everywhere. Each Python cell: a fresh process per "
        "measurement (best time / max RSS of 3; one untimed warm-up batch or step first). "
        "Peak RSS includes the interpreter and imports. **Times are CPU time** (the process's "
        "`time.process_time()`, the browser's processes' from `/proc`), excluding imports and "
        "loading: this 2-core machine was shared with other jobs (1/5/15-min load average "
        f"{loads[0]} at the start of the run, {load} at the end), which inflates wall time "
        "by whatever else runs but CPU time far less. All from one run.\n\n"
        "**The training step against its floor.** Floor = the step's multiply-adds (every "
        "Conv2d and Linear: forward, weight gradient, input gradient except the first "
        "layer's; norms, ReLUs and pools not counted) at one core's measured float32 matmul "
        f"peak, {gflops:.1f} GFLOP/s (1024^3 matmul, 1 thread, CPU time: numpy/BLAS "
        f"{peak['numpy']:.1f}, onnxruntime/MLAS {peak['mlas']:.1f}; the better one). "
        + bnote
        + "\n\n"
        + "\n".join(steps)
        + "\n\n**Memory and time per job.**\n\n"
        + "\n".join(mem)
        + "\n\n**Inference at batch 1** (mean over 64 single images, after the batch-32 "
        "loop):\n\n" + "\n".join(one) + "\n"
    )


if __name__ == "__main__":
    main()
