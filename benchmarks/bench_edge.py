"""Edge runtime vs a torch-based client: peak memory and time for predict and 1-epoch train.

Each measurement runs in a fresh Python process, so peak resident memory
(``ru_maxrss``) covers imports, model loading and the work itself:

* edge: ``mobile_client.EdgeClient`` (numpy + onnxruntime only) on an exported bundle;
* torch: ``fmtl_lightning`` (torch + lightning imported, as our Lightning client does)
  with the same weights, the same images and the same batches, plain SGD.

CNN (32, 64, 128) GroupNorm with a 10-class MNIST head, widths 1, 1/2, 1/4; predict
= 256 real MNIST test images at batch 32; train = 1 epoch over 1024 real MNIST
training images at batch 32 (32 steps). One thread on each side.

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
TASK = "mnist/digit"

# both measured scripts start with this: nothing imported yet but the stdlib
PRELUDE = r"""
import json, sys, time
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
t0 = time.perf_counter()
c = EdgeClient(bundle, threads=1)
if job == "predict":
    x = d["x_test"]
    c.predict("mnist/digit", x[:32])  # warm-up: session creation, first-run allocations
    t1 = time.perf_counter()
    for i in range(0, len(x), 32):
        c.predict("mnist/digit", x[i:i + 32])
else:
    c.train(d["x"][:32], {"mnist/digit": d["y"][:32]}, epochs=1, batch_size=32, lr=0.05)
    t1 = time.perf_counter()
    r = c.train(d["x"], {"mnist/digit": d["y"]}, epochs=1, batch_size=32, lr=0.05, seed=0)
t2 = time.perf_counter()
assert "torch" not in sys.modules
print(json.dumps({"load_s": t1 - t0, "work_s": t2 - t1,
                  "rss_mb": hwm()}))
"""
)

TORCH = (
    PRELUDE
    + r"""
import numpy as np
t0 = time.perf_counter()
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
t1 = time.perf_counter()
if job == "predict":
    m.eval()
    x = torch.from_numpy(d["x_test"])
    with torch.inference_mode():
        m(x[:32])  # warm-up
    t1 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x), 32):
            m(x[i:i + 32])
else:
    m.train()
    x, y = torch.from_numpy(d["x"]), torch.from_numpy(d["y"])
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    for idx in list(batch_order(len(x), 32, 1, None, 0))[:1]:  # warm-up step
        i = torch.from_numpy(idx)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x[i])["mnist/digit"], y[i]).backward()
        opt.step()
    t1 = time.perf_counter()
    for idx in batch_order(len(x), 32, 1, None, 0):
        i = torch.from_numpy(idx)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(x[i])["mnist/digit"], y[i])
        loss.backward()
        opt.step()
t2 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "work_s": t2 - t1,
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
    return {
        "work_s": min(r["work_s"] for r in runs),
        "load_s": min(r["load_s"] for r in runs),
        "rss_mb": max(r["rss_mb"] for r in runs),
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


def main() -> None:
    from fmtl_lightning.data import load_mnist
    from mobile_client.batching import label_key

    tmp = Path(tempfile.mkdtemp(prefix="fmtl-bench-edge-"))
    try:
        tr, te = load_mnist("train"), load_mnist("test")
        norm = lambda im: ((im.astype(np.float32) / 255 - tr.mean) / tr.std)[:, None]  # noqa: E731
        data = tmp / "data.npz"
        np.savez(
            data,
            x=norm(tr.images[:1024]),
            **{label_key(TASK): tr.labels[:1024].astype(np.int64)},
            x_test=norm(te.images[:256]),
        )
        rows = []
        for width in WIDTHS:
            bundle = cnn_bundle(tmp / f"w{width:g}", width, float(tr.mean), float(tr.std))
            row = {"width": width}
            for job in ("predict", "train"):
                row[f"edge_{job}"] = _best(EDGE, str(bundle), str(data), job)
                row[f"torch_{job}"] = _best(TORCH, str(bundle), str(data), job, str(width))
            rows.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    lines = [
        "| width | job | edge peak RSS (MB) | torch peak RSS (MB) | edge/torch memory (goal <= 0.33) | edge time (s) | torch time (s) | edge/torch time |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for job in ("predict", "train"):
            e, t = r[f"edge_{job}"], r[f"torch_{job}"]
            mem = e["rss_mb"] / t["rss_mb"]
            tim = e["work_s"] / t["work_s"]
            lines.append(
                f"| {r['width']:g} | {job} | {e['rss_mb']:.0f} | {t['rss_mb']:.0f} | "
                f"{mem:.2f} ({'yes' if mem <= 1 / 3 else 'no'}) | {e['work_s']:.3f} | "
                f"{t['work_s']:.3f} | {tim:.2f}x |"
            )
    md = (
        "## Edge runtime vs a torch client: peak memory and time\n\n"
        + "CNN (32, 64, 128) GroupNorm with a 10-class MNIST head. predict: 256 real MNIST "
        "test images at batch 32. train: 1 epoch over 1024 real MNIST training images at "
        "batch 32 (32 steps). Edge: `mobile_client.EdgeClient` (numpy + onnxruntime only); "
        "torch: `fmtl_lightning` with torch + lightning imported, the same weights, images "
        "and batches, plain SGD. One thread on each side (with 2 threads, torch's OpenMP pool slowed down 10-40x whenever another process was busy on this shared 2-core machine)."
        + "\n\nEach cell: a fresh process per measurement (best time / max RSS of 3; one untimed warm-up batch or step first). "
        "Peak RSS includes the interpreter and imports: onnxruntime + numpy on the edge, "
        "torch + lightning for the torch client. Time excludes imports and loading. "
        "'train' is one epoch of 32 SGD steps; the per-step ratio is the time ratio "
        "(goal for a step: <= 0.8x).\n\n" + "\n".join(lines) + "\n"
    )
    write_section("edge", md)
    print(md)


if __name__ == "__main__":
    main()
