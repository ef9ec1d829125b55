"""The web edge client in headless Chromium equals the Python edge client.

The page (mobile_client/web) loads a bundle from its server, reads real digits as PNG
files, starts from the server's shared arrays (``global.safetensors``), trains N steps on
ONNX Runtime Web (WebAssembly, one thread), and offers the update: its weights equal
``EdgeClient.train``'s to 1e-5, its predictions agree, its update file has the Python
client's keys, dtypes, shapes, layout and metadata (base-model hash included), and the
server's reader accepts and aggregates it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from browser_helpers import TASKS, page_error, settle, write_images

from mobile_client.runtime import EdgeClient
from mobile_client.safetensors_np import load_file
from mobile_client.update import UpdateMeta, read_update, state_hash, write_update

N, BATCH, STEPS, LR, SEED = 24, 8, 4, 0.1, 3


def st_header(path: Path) -> dict:
    """The JSON header of a safetensors file, in file order."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n])


@pytest.fixture(scope="module")
def server_round(exported, tmp_path_factory):
    """What the server sends the device: its global shared arrays at the client's width
    (``global.safetensors``, as fmtl_lightning.edge_bridge writes it), plus the images."""
    from fmtl_lightning.checkpoint import completed_rounds, read_round
    from fmtl_lightning.roles import ModelSpec, WidthSpec
    from fmtl_lightning.slicing import slice_state

    run_dir, bundle = exported
    data = tmp_path_factory.mktemp("browser_data")
    px, ys = write_images(data, N)
    spec = ModelSpec.from_json((run_dir / "spec.json").read_text())
    last = completed_rounds(run_dir)[-1]
    g, _, _, _ = read_round(run_dir, last)
    ws = WidthSpec(0.5, "heterofl", last)
    sent = slice_state(g, spec, ws)
    # a different start than the bundle's weights: training must really start from it
    sent = {k: (v * np.float32(0.9) if v.dtype == np.float32 else v) for k, v in sent.items()}
    meta = UpdateMeta("server", last + 1, ws.width, 1, state_hash(sent), {})
    write_update(data / "global.safetensors", sent, meta)
    return {"data": data, "px": px, "ys": ys, "spec": spec, "global": g, "ws": ws,
            "sent": sent, "round": last + 1}  # fmt: skip


def open_page(page, srv, query: str) -> None:
    page.goto(srv.url + query)
    settle(page)


def train_in_page(page, head_only: bool = False) -> None:
    page.fill("#steps", str(STEPS))
    page.fill("#batch-size", str(BATCH))
    page.fill("#lr", str(LR))
    page.fill("#seed", str(SEED))
    page.set_checked("#head-only", head_only)
    page.click("#train")
    assert page_error(page) == ""
    assert "trained 4 step(s) on 24 image(s)" in page.text_content("#status")


def download(page, selector: str, path: Path) -> Path:
    with page.expect_download() as d:
        page.click(selector)
    d.value.save_as(path)
    return path


@pytest.mark.parametrize("head_only", [False, True], ids=["full", "head_only"])
def test_browser_training_equals_the_python_edge_client(
    exported, server_round, serve, page, tmp_path, head_only: bool
) -> None:
    _, bundle = exported
    r = server_round
    srv = serve(bundle, r["data"], tmp_path / "updates")
    start = "" if head_only else "&start=data/global.safetensors"
    open_page(page, srv, f"?bundle=bundle/&data=data/data.json{start}")
    assert page_error(page) == ""
    train_in_page(page, head_only)
    up = download(page, "#download-update", tmp_path / "browser.safetensors")
    local = download(page, "#download-local", tmp_path / "browser.local.safetensors")

    # the Python edge client, same images, batches and start (what `fmtl-edge train` does)
    ec = EdgeClient(bundle)
    start_from = None if head_only else r["sent"]
    res = ec.train(r["px"], r["ys"], batch_size=BATCH, steps=STEPS, lr=LR, seed=SEED,
                   head_only=head_only, start_from=start_from)  # fmt: skip
    rnd = ec.manifest.round if head_only else r["round"]
    py_up = tmp_path / "python.safetensors"
    write_update(py_up, res.shared,
                 UpdateMeta(ec.client_id, rnd, ec.entry.width, res.num_examples,
                            res.base_hash, res.metrics))  # fmt: skip

    shared, meta = read_update(up, expected_base_hash=res.base_hash)
    kept, local_meta = load_file(local)
    assert local_meta == {"client_id": "c00", "kind": "local"}
    assert set(shared) == set(ec.shared_keys) and not set(kept) & set(shared)
    got = {**shared, **kept}
    assert set(got) == set(res.state)
    moved = 0
    for k, want in res.state.items():
        assert got[k].dtype == want.dtype and got[k].shape == want.shape, k
        if want.dtype == np.int64:
            assert np.array_equal(got[k], want), k  # the batch-norm counters
        else:
            np.testing.assert_allclose(got[k], want, rtol=0, atol=1e-5, err_msg=k)
        moved += not np.array_equal(want, ec.base_state()[k])
    assert moved > 0  # training changed the weights

    # the same file: header keys, dtypes, shapes and layout; metadata field by field
    py_meta = read_update(py_up)[1]
    assert meta.base_hash == py_meta.base_hash == res.base_hash
    assert (meta.client_id, meta.round, meta.width, meta.num_examples) == (
        py_meta.client_id, py_meta.round, py_meta.width, py_meta.num_examples)  # fmt: skip
    assert meta.metrics.keys() == py_meta.metrics.keys() and meta.metrics["steps"] == STEPS
    for m in ("loss", "last_loss"):
        assert meta.metrics[m] == pytest.approx(py_meta.metrics[m], abs=1e-5)
    hb, hp = st_header(up), st_header(py_up)
    assert hb.keys() == hp.keys() and list(hb) == list(hp)  # same layout, same order
    for k in hp:
        if k != "__metadata__":
            assert hb[k] == hp[k], k
    assert hb["__metadata__"].keys() == hp["__metadata__"].keys()


def test_browser_predictions_agree_with_the_python_edge_client(
    exported, server_round, serve, page, tmp_path
) -> None:
    _, bundle = exported
    srv = serve(bundle, server_round["data"])
    open_page(page, srv, "?bundle=bundle/&data=data/data.json")
    page.click("#predict")
    assert page_error(page) == ""
    got = page.evaluate("() => window.fmtlPage.predictions")
    ec = EdgeClient(bundle)
    for t in TASKS:
        want = ec.predict(t, server_round["px"])
        have = np.asarray(got[t], dtype=np.float32).reshape(want.shape)
        np.testing.assert_allclose(have, want, rtol=0, atol=1e-5, err_msg=t)
        if ec.head(t).kind == "multiclass":
            assert np.array_equal(have.argmax(1), want.argmax(1))
    cells = page.locator("#examples td.predicted").all_text_contents()
    labels = ec.head("digits/digit").labels
    first = labels[int(ec.predict("digits/digit", server_round["px"][:1]).argmax())]
    assert len(cells) == N and cells[0].startswith(f"digits/digit: {first};")


def test_the_posted_update_is_accepted_and_aggregated(
    exported, server_round, serve, page, tmp_path
) -> None:
    """POST /update: the server's reader (receive_update: format, base hash, key set,
    shapes at the width, finite values) accepts it and FedAvg aggregates it."""
    from fmtl_lightning.aggregation import ClientUpdate, aggregate
    from fmtl_lightning.edge_bridge import receive_update

    _, bundle = exported
    r = server_round
    srv = serve(bundle, r["data"], tmp_path / "updates")
    open_page(page, srv, "?bundle=bundle/&data=data/data.json&start=data/global.safetensors")
    train_in_page(page)
    page.click("#post")
    assert page_error(page) == ""
    assert "the server accepted the update (24 examples)" in page.text_content("#status")
    assert len(srv.received) == 1
    spec, ws = r["spec"], r["ws"]
    keys = spec.shared_keys()
    shared, meta = receive_update(srv.received[0], spec, ws, keys, state_hash(r["sent"]), "c00")
    assert meta.round == r["round"] and meta.num_examples == N
    new = aggregate(r["global"], [ClientUpdate("c00", shared, N, ws)], spec)

    ec = EdgeClient(bundle)
    res = ec.train(r["px"], r["ys"], batch_size=BATCH, steps=STEPS, lr=LR, seed=SEED,
                   start_from=r["sent"])  # fmt: skip
    want = aggregate(r["global"], [ClientUpdate("c00", res.shared, N, ws)], spec)
    assert set(new) == set(want)
    changed = 0
    for k in want:
        np.testing.assert_allclose(new[k], want[k], rtol=0, atol=1e-5, err_msg=k)
        changed += not np.array_equal(new[k], r["global"][k])
    assert changed > 0
