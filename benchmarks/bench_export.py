"""ONNX export: export time, file sizes, inference latency and train-step time vs torch.

The CNN (32, 64, 128) with GroupNorm and one 10-class MNIST head, at widths 1, 1/2
and 1/4. Inference is backbone -> head on real MNIST test images, onnxruntime
(1 intra-op, 1 inter-op thread) vs torch eager (1 thread, ``inference_mode``, eval),
interleaved call by call, median after warm-up. The train step is the exported SGD
step graph vs ``torch.optim.SGD`` forward + backward + step on the same batch of 32.

    python -m benchmarks.bench_export
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import write_section
from export import export_backbone, export_head, export_train_step
from export.trainstep import task_loss
from fmtl_lightning.data import load_mnist
from fmtl_lightning.models import BackboneConfig, MultiTaskModel, head_name

TASK = "mnist/digit"
WIDTHS = (1.0, 0.5, 0.25)
INFER_CALLS = {1: 50, 32: 20}
STEP_CALLS = 20
WARMUP = 5
LR = 0.05


def ort_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def interleaved_median(fns: dict[str, object], calls: int) -> dict[str, float]:
    """Median wall time (ms) of each function, called in turn ``calls`` times after warm-up."""
    for _ in range(WARMUP):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(calls):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def kb(path: Path) -> float:
    return path.stat().st_size / 1024


def bench_width(width: float, x_all: np.ndarray, y_all: np.ndarray, tmp: Path) -> dict:
    torch.manual_seed(0)
    model = MultiTaskModel(
        BackboneConfig("cnn", hidden=(32, 64, 128), norm="group"), {TASK: 10}, width
    )
    model.eval()
    head = model.heads[head_name(TASK)]
    ex = torch.from_numpy(x_all[:2])
    paths = {k: tmp / f"w{width}_{k}.onnx" for k in ("backbone", "head", "step")}
    t0 = time.perf_counter()
    export_backbone(model.backbone, paths["backbone"], ex)
    export_head(head, paths["head"], model.backbone.feature_dim)
    info = export_train_step(model, {TASK: "multiclass"}, paths["step"], ex)
    export_s = time.perf_counter() - t0
    model.eval()
    row = {
        "width": width,
        "export_s": export_s,
        "kb": {k: kb(p) for k, p in paths.items()},
    }

    # --- inference: backbone -> head
    bb, hd = ort_session(paths["backbone"]), ort_session(paths["head"])
    torch.set_num_threads(1)
    row["infer"] = {}
    for batch, calls in INFER_CALLS.items():
        xb = np.ascontiguousarray(x_all[:batch])
        xt = torch.from_numpy(xb)

        def ort_infer(xb=xb):
            feats = bb.run(["features"], {"x": xb})[0]
            return hd.run(["logits"], {"features": feats})[0]

        def torch_infer(xt=xt):
            with torch.inference_mode():
                return model(xt)[TASK]

        with torch.inference_mode():
            want = model(xt)[TASK].numpy()
        got = ort_infer()
        err = float(np.abs(got - want).max() / np.abs(want).max())
        med = interleaved_median({"ort": ort_infer, "torch": torch_infer}, calls)
        row["infer"][batch] = {**med, "err": err}

    # --- train step, batch 32
    xb = np.ascontiguousarray(x_all[:32])
    yb = np.ascontiguousarray(y_all[:32])
    sess = ort_session(paths["step"])
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    feeds = {n: state[k] for n, k in {**info.param_inputs, **info.buffer_inputs}.items()}
    feeds[info.x_input] = xb
    feeds[info.target_inputs[TASK]] = yb
    feeds[info.lr_input] = np.asarray(LR, dtype=np.float32)
    out_names = [o.name for o in sess.get_outputs()]

    def ort_step():
        # the same starting state each call: a fixed-cost step, as the torch side
        return sess.run(out_names, feeds)

    tmodel = MultiTaskModel(
        BackboneConfig("cnn", hidden=(32, 64, 128), norm="group"), {TASK: 10}, width
    )
    tmodel.load_state_dict(model.state_dict())
    tmodel.train()
    opt = torch.optim.SGD(tmodel.parameters(), lr=LR)
    xt, yt = torch.from_numpy(xb), torch.from_numpy(yb)

    def torch_step():
        opt.zero_grad(set_to_none=True)
        loss = task_loss("multiclass", tmodel(xt)[TASK], yt)
        loss.backward()
        opt.step()

    row["step"] = interleaved_median({"ort": ort_step, "torch": torch_step}, STEP_CALLS)
    return row


def yn(ok: bool) -> str:
    return "yes" if ok else "**no**"


def main() -> None:
    torch.set_num_threads(1)
    ds = load_mnist("test")
    x_all = ((ds.images[:64].astype(np.float32) / 255 - ds.mean) / ds.std)[:, None]
    x_all = np.ascontiguousarray(x_all, dtype=np.float32)
    y_all = np.ascontiguousarray(ds.labels[:64].astype(np.int64))
    with tempfile.TemporaryDirectory(prefix="fmtl-bench-export-") as d:
        rows = [bench_width(w, x_all, y_all, Path(d)) for w in WIDTHS]

    w1 = rows[0]
    lines = [
        "## ONNX export: export cost, inference and train-step latency vs torch eager",
        "",
        "CNN (32, 64, 128) with GroupNorm, one 10-class head (`mnist/digit`), random init, "
        "opset 18. Both runtimes on 1 thread (onnxruntime intra/inter-op 1; "
        "`torch.set_num_threads(1)`), calls interleaved, median after "
        f"{WARMUP} warm-up calls each. Inference is backbone -> head on real MNIST test "
        "images (normalised); the torch side is eager in eval mode under `inference_mode`. "
        "The train step is the exported SGD step graph vs `torch.optim.SGD` "
        "(zero_grad + forward + backward + step) on the same batch of 32.",
        "",
        "### Export cost",
        "",
        "| width | export time (s, backbone + head + step) | backbone (KB) | head (KB) | "
        "train step (KB) |",
        "|---:|---:|---:|---:|---:|",
    ]
    notes = [
        "",
        "The train-step graph takes parameters and buffers as inputs (`p_*`, `b_*`), so its "
        "size is the graph alone and barely changes with width; backbone and head embed "
        "their weights.",
    ]
    for r in rows:
        k = r["kb"]
        lines.append(
            f"| {r['width']:g} | {r['export_s']:.2f} | {k['backbone']:.0f} | {k['head']:.1f} | "
            f"{k['step']:.0f} |"
        )
    lines += notes
    lines += [
        "",
        "### Inference latency, backbone -> head "
        f"(median of {INFER_CALLS[1]} calls at batch 1, {INFER_CALLS[32]} at batch 32)",
        "",
        "| width | batch | onnxruntime (ms) | torch eager (ms) | ORT / torch | "
        "ORT <= torch? | ORT vs width 1 | width 1/4 <= 1/4 of width 1? | max rel. error |",
        "|---:|---:|---:|---:|---:|:---:|---:|:---:|---:|",
    ]
    infer_ok, quarter_ok = [], []
    for r in rows:
        for batch, m in r["infer"].items():
            ratio = m["ort"] / m["torch"]
            rel = m["ort"] / w1["infer"][batch]["ort"]
            infer_ok.append(ratio <= 1.0)
            q = "-"
            if r["width"] == 0.25:
                quarter_ok.append(rel <= 0.25)
                q = yn(rel <= 0.25)
            lines.append(
                f"| {r['width']:g} | {batch} | {m['ort']:.3f} | {m['torch']:.3f} | "
                f"{ratio:.2f}x | {yn(ratio <= 1.0)} | {rel:.2f} | {q} | {m['err']:.1e} |"
            )
    lines += [
        "",
        f"### Train step, batch 32 (median of {STEP_CALLS})",
        "",
        "| width | ORT step graph (ms) | torch SGD step (ms) | ORT / torch | ORT <= torch? |",
        "|---:|---:|---:|---:|:---:|",
    ]
    step_ok = []
    for r in rows:
        s = r["step"]
        ratio = s["ort"] / s["torch"]
        step_ok.append(ratio <= 1.0)
        lines.append(
            f"| {r['width']:g} | {s['ort']:.2f} | {s['torch']:.2f} | {ratio:.2f}x | "
            f"{yn(ratio <= 1.0)} |"
        )
    lines += [
        "",
        "The step graph's weights are inputs, so onnxruntime cannot pre-pack them for its "
        "NCHWc convolutions and runs generic kernels; `export/decompositions.py` "
        "(convolutions: `export/conv_decompositions.py`) writes the backward for them "
        "(tiling max pools as window-tap maxima with first-maximum masks "
        "instead of MaxPool indices + ScatterElements, ReLU backward as a mask multiply "
        "instead of `Where`, conv weight gradients and deep forward convs as im2col GEMMs "
        "over the whole batch). Before that change the step was 1.45-1.79x torch.",
    ]
    lines += [
        "",
        "Goals from the issue: onnxruntime at or below torch eager on every row — "
        f"inference {sum(infer_ok)}/{len(infer_ok)} rows, train step "
        f"{sum(step_ok)}/{len(step_ok)} rows "
        f"({'met' if all(infer_ok + step_ok) else '**not met**'}); width 1/4 inference at no "
        f"more than 1/4 of width-1 latency (onnxruntime): {sum(quarter_ok)}/{len(quarter_ok)} "
        f"batch sizes ({'met' if all(quarter_ok) else '**not met**'}).",
    ]
    md = "\n".join(lines) + "\n"
    write_section("export", md)
    print(md)


if __name__ == "__main__":
    main()
