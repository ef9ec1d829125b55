"""``fmtl export``: a real (tiny) run -> manifest + ONNX files that match the torch client models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export import run_export
from export.bundle import RunExportError
from export.run_export import export_model, export_run
from export.trainstep import task_loss
from fmtl_lightning.cli import main
from fmtl_lightning.data import load_dataset
from fmtl_lightning.errors import FMTLError
from fmtl_lightning.models import load_arrays
from fmtl_lightning.roles import WidthSpec
from mobile_client.errors import ManifestError
from mobile_client.manifest import MANIFEST_VERSION, load_manifest, verify_files

CFG = {
    "name": "tiny-export",
    "seed": 0,
    "data": {"samples_per_client": 40},
    "model": {"family": "mlp", "hidden": [16, 8], "norm": "none"},
    "clients": [
        {"count": 1, "tasks": ["digits/digit"], "width": 1.0},
        {"count": 1, "tasks": ["digits/parity", "digits/attrs"], "width": 0.5},
    ],
    "algorithm": {"name": "fedper"},
    "federation": {"rounds": 1},
    "compare_local": False,
}


def _run(cfg: dict, run_dir: Path) -> Path:
    from fmtl_lightning.simulation import run_config

    run_config(cfg, run_dir, progress=False)
    return run_dir


def _sim(run_dir: Path):
    from fmtl_lightning.checkpoint import completed_rounds
    from fmtl_lightning.config import load_config
    from fmtl_lightning.simulation import Simulation

    sim = Simulation(load_config(run_dir / "config.yaml"), run_dir, progress=False)
    last = completed_rounds(run_dir)[-1]
    sim.pool.restore(sim.engine.restore())
    return sim, last


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(CFG, tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="module")
def bundle(run_dir: Path) -> Path:
    out = run_dir.parent / "bundle"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def sim(run_dir: Path):
    return _sim(run_dir)


def _digits_x(n: int) -> np.ndarray:
    ds = load_dataset("digits", "test")
    img = np.asarray(ds.images[:n], dtype=np.float32)
    return ((img / 255.0 - ds.mean) / ds.std).reshape(n, 1, *img.shape[-2:]).astype(np.float32)


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _client_model(sim, cid: str):
    s, last = sim
    c = next(c for c in s.fed.clients if c.cid == cid)
    ws = WidthSpec(c.width, s.cfg.algorithm.slicing, max(last - 1, 0))
    model = s.pool.module_for(c, c.width).model
    load_arrays(model, s.client_state(c, ws))
    return c, model.eval()


# ----------------------------------------------------------------------------- the bundle
def test_manifest_and_files(bundle: Path) -> None:
    m = load_manifest(bundle)
    assert m.format_version == MANIFEST_VERSION
    assert m.algorithm == "fedper" and m.round == 1
    assert m.width_values() == [1.0, 0.5]
    assert m.normalisation.input_shape == (1, 8, 8) and m.normalisation.domain == "digits"
    assert {(h.client, h.task) for h in m.heads} == {
        ("c00", "digits/digit"),
        ("c01", "digits/parity"),
        ("c01", "digits/attrs"),
    }
    assert [w.feature_dim for w in m.widths] == [8, 4]
    for w in m.widths:
        assert (bundle / w.backbone.path).is_file()
        assert [t.name for t in w.backbone.inputs] == ["x"]
        assert w.backbone.inputs[0].shape == ("batch", 1, 8, 8)
        assert len(w.train_steps) == 1 and w.train_steps[0].file.lr_input == "lr"
    digit = next(h for h in m.heads if h.task == "digits/digit")
    assert digit.labels == tuple(str(i) for i in range(10)) or len(digit.labels) == 10
    assert digit.file.path == "head_c00_digits_digit.onnx"
    assert digit.head_step is not None and set(digit.head_step.weights.values()) == {
        "heads.digits__digit.weight",
        "heads.digits__digit.bias",
    }
    verify_files(bundle, m)
    assert not [p for p in bundle.parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("batch", [1, 3, 32])
def test_backbone_then_head_equals_torch(bundle: Path, sim, batch: int) -> None:
    m = load_manifest(bundle)
    x = _digits_x(batch)
    for c_entry in m.clients:
        c, model = _client_model(sim, c_entry.client)
        assert c_entry.backbone is None  # fedper: the shared backbone is the client's
        bb = _session(bundle / m.width(c.width).backbone.path)
        feats = bb.run(None, {"x": x})[0]
        with torch.no_grad():
            want = model(torch.from_numpy(x))
            np.testing.assert_allclose(
                feats, model.backbone(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6
            )
        for h in m.heads_of(c.cid):
            logits = _session(bundle / h.file.path).run(None, {"features": feats})[0]
            assert logits.shape == (batch, len(h.labels))
            np.testing.assert_allclose(logits, want[h.task].numpy(), rtol=1e-5, atol=1e-6)


def _targets(task: str, kind: str, n: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "multiclass":
        return rng.integers(0, n, size=batch).astype(np.int64)
    return rng.integers(0, 2, size=(batch, n)).astype(np.float32)


def test_train_step_equals_torch_sgd(bundle: Path, sim) -> None:
    m = load_manifest(bundle)
    rng = np.random.default_rng(0)
    x = _digits_x(16)
    lr = 0.05
    for c_entry in m.clients:
        c, model = _client_model(sim, c_entry.client)
        weights = dict(np.load(bundle / c_entry.weights.path, allow_pickle=False))
        sd = model.state_dict()
        assert set(weights) == set(sd)
        step = next(s for s in m.width(c.width).train_steps if c.cid in s.clients)
        f = step.file
        ys = {t: _targets(t, k, model.task_outputs[t], 16, rng) for t, k in f.task_kinds.items()}
        feed = {n: weights[k] for n, k in f.weights.items()}
        feed[f.x_input] = x
        feed.update({f.target_inputs[t]: y for t, y in ys.items()})
        feed[f.lr_input] = np.array(lr, dtype=np.float32)
        names = [o.name for o in f.outputs]
        res = dict(zip(names, _session(bundle / f.path).run(None, feed), strict=True))

        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        opt.zero_grad()
        out = model(torch.from_numpy(x))
        loss = sum(task_loss(f.task_kinds[t], out[t], torch.from_numpy(y)) for t, y in ys.items())
        loss.backward()
        opt.step()
        np.testing.assert_allclose(res[f.loss_output], loss.item(), rtol=1e-5, atol=1e-6)
        new_sd = model.state_dict()
        for name, key in f.weight_outputs.items():
            np.testing.assert_allclose(res[name], new_sd[key].numpy(), rtol=1e-5, atol=1e-6)


def test_head_step_equals_torch_sgd(bundle: Path, sim) -> None:
    m = load_manifest(bundle)
    rng = np.random.default_rng(1)
    lr = 0.1
    for h in m.heads:
        c, model = _client_model(sim, h.client)
        weights = dict(np.load(bundle / m.client(h.client).weights.path, allow_pickle=False))
        feats = rng.standard_normal((7, m.width(h.width).feature_dim)).astype(np.float32)
        s = h.head_step
        assert s is not None
        y = _targets(h.task, h.kind, len(h.labels), 7, rng)
        feed = {n: weights[k] for n, k in s.weights.items()}
        feed.update(
            {
                s.features_input: feats,
                s.target_inputs["task"]: y,
                s.lr_input: np.array(lr, dtype=np.float32),
            }
        )
        res = dict(
            zip([o.name for o in s.outputs], _session(bundle / s.path).run(None, feed), strict=True)
        )
        head = model.heads[h.task.replace("/", "__")]
        opt = torch.optim.SGD(head.parameters(), lr=lr)
        opt.zero_grad()
        task_loss(h.kind, head(torch.from_numpy(feats)), torch.from_numpy(y)).backward()
        opt.step()
        full = model.state_dict()
        for name, key in s.weight_outputs.items():
            np.testing.assert_allclose(res[name], full[key].numpy(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- errors
def _cli_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fmtl: error:") and err.count("\n") == 1
    return err


def test_unknown_width(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "o"
    err = _cli_error(capsys, ["export", str(run_dir), "--out", str(out), "--widths", "0.25"])
    assert "0.25" in err and "1, 0.5" in err
    assert not out.exists()


def test_not_a_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notarun").mkdir()
    err = _cli_error(capsys, ["export", str(tmp_path / "notarun"), "--out", str(tmp_path / "o")])
    assert "notarun" in err and "config.yaml" in err and "checkpoints" in err


def test_unknown_client(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = _cli_error(
        capsys, ["export", str(run_dir), "--out", str(tmp_path / "o"), "--clients", "c00,c99"]
    )
    assert "'c99'" in err and "c00, c01" in err


def test_existing_out_dir(run_dir: Path, bundle: Path, capsys: pytest.CaptureFixture) -> None:
    err = _cli_error(capsys, ["export", str(run_dir), "--out", str(bundle)])
    assert str(bundle) in err and "--overwrite" in err
    load_manifest(bundle)  # untouched


def test_errors_are_fmtl_errors() -> None:
    assert issubclass(RunExportError, FMTLError)


def test_model_without_heads(tmp_path: Path) -> None:
    from fmtl_lightning.models import BackboneConfig, MultiTaskModel

    model = MultiTaskModel(BackboneConfig("mlp", 1, 8, (8,), "none"), {}, 1.0)
    with pytest.raises(RunExportError, match="no head"):
        export_model(model, {}, tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- manifest checks
def test_corrupted_file_fails_verify(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    m = load_manifest(copy)
    target = copy / m.heads[0].file.path
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=m.heads[0].file.path):
        verify_files(copy, m)
    target.unlink()
    with pytest.raises(ManifestError, match="missing"):
        verify_files(copy, m)


def test_bad_manifest_fields(bundle: Path, tmp_path: Path) -> None:
    d = json.loads((bundle / "manifest.json").read_text())
    for mutate, pattern in [
        (lambda d: d.update(format_version=99), "'format_version'.*99"),
        (lambda d: d.pop("format_version"), "'format_version' is missing"),
        (lambda d: d.pop("widths"), "'widths' is missing"),
        (lambda d: d["widths"][0]["backbone"].pop("sha256"), r"'widths\[0\]\.backbone\.sha256'"),
        (lambda d: d["heads"][1].update(kind="ranking"), r"'heads\[1\]\.kind' .*'ranking'"),
    ]:
        bad = json.loads(json.dumps(d))
        mutate(bad)
        (tmp_path / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(ManifestError, match=pattern):
            load_manifest(tmp_path)


# ----------------------------------------------------------------------------- atomicity
def test_failed_export_leaves_nothing(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from export import graph_cache

    def flaky(*a, **kw):  # the first head, after the backbone and the train step
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(graph_cache, "export_head", flaky)
    out = tmp_path / "o"
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_run(run_dir, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_overwrite_and_filters(run_dir: Path, bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    export_run(run_dir, out, widths=[0.5], clients=["c01"], overwrite=True)
    m = load_manifest(out)
    assert m.width_values() == [0.5] and [c.client for c in m.clients] == ["c01"]
    assert not (out / "stale.txt").exists()
    verify_files(out, m)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    # same graphs as the full export (deterministic), hence same weights npz
    full = load_manifest(bundle)
    assert m.client("c01").weights.sha256 == full.client("c01").weights.sha256
    with pytest.raises(RunExportError, match="width 1, which is not among"):
        export_run(run_dir, tmp_path / "p", widths=[0.5], clients=["c00"])


# ----------------------------------------------------------------------------- other algorithms
@pytest.mark.parametrize("algorithm", ["fedavg", "ditto"])
def test_other_algorithms_match_torch(tmp_path: Path, algorithm: str) -> None:
    """FedAvg: one union head per client, tasks read their columns; Ditto: the client's
    personal backbone ships as its own file."""
    cfg = {**CFG, "algorithm": {"name": algorithm}}
    rd = _run(cfg, tmp_path / "run")
    out = export_run(rd, tmp_path / "out", clients=["c01"])
    m = load_manifest(out)
    verify_files(out, m)
    assert m.algorithm == algorithm and [c.client for c in m.clients] == ["c01"]
    s = _sim(rd)
    c, model = _client_model(s, "c01")
    x = _digits_x(5)
    with torch.no_grad():
        want = model(torch.from_numpy(x))
    entry = m.client("c01")
    bb = entry.backbone if entry.backbone is not None else m.width(c.width).backbone
    assert (entry.backbone is not None) == (algorithm == "ditto")
    feats = _session(out / bb.path).run(None, {"x": x})[0]
    for h in m.heads_of("c01"):
        logits = _session(out / h.file.path).run(None, {"features": feats})[0]
        if algorithm == "fedavg":
            assert h.columns is not None and h.file.path == "head_c01_union.onnx"
            start, end = s[0].engine.plan.layout.union_slices[h.task]
            assert h.columns == (start, end) and end - start == len(h.labels)
            np.testing.assert_allclose(
                logits[:, start:end], want["union"][:, start:end].numpy(), rtol=1e-5, atol=1e-6
            )
        else:
            assert h.columns is None
            np.testing.assert_allclose(logits, want[h.task].numpy(), rtol=1e-5, atol=1e-6)


def _props(path: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def test_export_model_api(tmp_path: Path) -> None:
    import warnings

    from fmtl_lightning.models import BackboneConfig, MultiTaskModel
    from fmtl_lightning.tasks import get_task

    torch.manual_seed(0)
    model = MultiTaskModel(BackboneConfig("mlp", 1, 8, (8,), "none"), {"digits/digit": 10}, 0.5)
    with pytest.warns(run_export.MissingNormalisationWarning, match="fallback mean 0, std 1"):
        out = export_model(model, {"digits/digit": "multiclass"}, tmp_path / "o", client="me")
    m = load_manifest(out)
    verify_files(out, m)
    assert [h.task for h in m.heads] == ["digits/digit"] and m.widths[0].width == 0.5
    assert (m.normalisation.mean, m.normalisation.std) == (0.0, 1.0)
    x = _digits_x(3)
    feats = _session(out / m.widths[0].backbone.path).run(None, {"x": x})[0]
    logits = _session(out / m.heads[0].file.path).run(None, {"features": feats})[0]
    with torch.no_grad():
        np.testing.assert_allclose(
            logits, model(torch.from_numpy(x))["digits/digit"].numpy(), rtol=1e-5, atol=1e-6
        )
    props = _props(out / m.widths[0].backbone.path)
    assert props["fmtl.client"] == "me" and props["fmtl.width"] == "0.5"
    norm = json.loads(props["fmtl.normalisation"])[""]
    assert (norm["mean"], norm["std"], norm["input_shape"]) == (0.0, 1.0, [1, 8, 8])
    # a Task value (its output names become the labels) and a normalisation: no warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out2 = export_model(
            model,
            {"digits/digit": get_task("digits/digit")},
            tmp_path / "o2",
            normalisation={"mean": 0.2, "std": 0.3, "input_shape": [1, 8, 8]},
        )
    assert not [w for w in caught if w.category is run_export.MissingNormalisationWarning]
    m2 = load_manifest(out2)
    assert m2.heads[0].labels == get_task("digits/digit").output_names
    norm = json.loads(_props(out2 / m2.heads[0].file.path)["fmtl.normalisation"])[""]
    assert (norm["mean"], norm["std"]) == (0.2, 0.3)


def test_own_loss_tasks_are_refused_at_export(tmp_path: Path) -> None:
    from fmtl_lightning.models import BackboneConfig, MultiTaskModel
    from fmtl_lightning.tasks import Task

    model = MultiTaskModel(BackboneConfig("mlp", 1, 8, (8,), "none"), {"t": 3})
    own = Task("t", 3, "multiclass", loss=lambda z, y: z.sum())
    norm = {"mean": 0.0, "std": 1.0, "input_shape": [1, 8, 8]}
    with pytest.raises(RunExportError, match="task 't' has its own loss"):
        export_model(model, {"t": own}, tmp_path / "o", normalisation=norm)
    assert not (tmp_path / "o").exists()


def test_every_onnx_file_describes_itself(bundle: Path) -> None:
    """Each .onnx carries metadata_props that agree with its manifest entry."""
    m = load_manifest(bundle)
    norm = {c.client: c.normalisation for c in m.clients}
    seen = {}  # path -> (graph kind, width, tasks, client or None)
    for w in m.widths:
        users = [c.client for c in m.clients if c.width == w.width]
        tasks = list(dict.fromkeys(t for c in m.clients if c.width == w.width for t in c.tasks))
        seen[w.backbone.path] = ("backbone", w.width, tasks, None, users)
        for st in w.train_steps:
            seen[st.file.path] = ("train_step", w.width, list(st.tasks), None, list(st.clients))
    for h in m.heads:
        seen[h.file.path] = ("head", h.width, [h.task], h.client, [h.client])
        assert h.head_step is not None
        seen[h.head_step.path] = ("head_step", h.width, [h.task], h.client, [h.client])
    files = sorted(p.name for p in bundle.glob("*.onnx"))
    assert files == sorted(seen) and len(files) == 2 + 2 + 3 + 3
    for path, (kind, width, tasks, client, users) in seen.items():
        props = _props(bundle / path)
        assert props["fmtl.format_version"] == str(MANIFEST_VERSION), path
        assert props["fmtl.graph"] == kind and props["fmtl.model_family"] == "mlp", path
        assert float(props["fmtl.width"]) == width and json.loads(props["fmtl.tasks"]) == tasks
        kinds = json.loads(props["fmtl.task_kinds"])
        assert kinds == {t: next(h.kind for h in m.heads if h.task == t) for t in tasks}
        assert props.get("fmtl.client") == client, path
        want = {norm[u].domain: (norm[u].mean, norm[u].std) for u in users}
        got = {d: (v["mean"], v["std"]) for d, v in json.loads(props["fmtl.normalisation"]).items()}
        assert got == want and want == {"digits": (m.normalisation.mean, m.normalisation.std)}


def test_manifest_module_needs_no_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'onnx', 'fmtl_lightning', 'lightning'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import mobile_client.manifest, mobile_client.errors\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
