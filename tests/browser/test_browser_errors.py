"""Bad bundles, images, labels and start files: a clear error in the page, never a silent
failure. Each case shows one message in ``#error`` naming the field, file or image, and
the page offers no update."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from browser_helpers import page_error, settle, write_images

from mobile_client.safetensors_np import load_file, save_file


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _edit_manifest(b: Path, fn: Callable[[dict], None]) -> None:
    d = json.loads((b / "manifest.json").read_text())
    fn(d)
    (b / "manifest.json").write_text(json.dumps(d))


def _replace_file(b: Path, name: str, data: bytes, fix_sha: bool) -> None:
    """Overwrite a bundle file; ``fix_sha``: the manifest records the new sha256."""
    (b / name).write_bytes(data)
    if fix_sha:
        text = (b / "manifest.json").read_text()
        d = json.loads(text)
        old = next(e["sha256"] for e in _file_entries(d) if e["path"] == name)
        (b / "manifest.json").write_text(text.replace(old, _sha(b / name)))


def _file_entries(d: dict) -> list[dict]:
    out = []
    for w in d["widths"]:
        out.append(w["backbone"])
        out += [t["file"] for t in w["train_steps"]]
    for h in d["heads"]:
        out += [h["file"]] + ([h["head_step"]] if h["head_step"] else [])
    for c in d["clients"]:
        out.append(c["weights"])
    return out


def _no_manifest(b: Path) -> None:
    (b / "manifest.json").unlink()


def _npz_without_a_key(b: Path) -> None:
    with np.load(b / "weights_c00.npz") as z:
        arrays = {k: z[k] for k in list(z.files)[1:]}
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    _replace_file(b, "weights_c00.npz", buf.getvalue(), fix_sha=True)


def _rename_x_input(d: dict) -> None:
    d["widths"][0]["train_steps"][0]["file"]["x_input"] = "pixels"


# (id, how the bundle is broken, the action that meets it, the message)
BUNDLE_CASES = [
    ("no-manifest", _no_manifest, None, r"no manifest at http://127\.0\.0\.1:\d+/bundle/manifest\.json \(HTTP 404\)"),
    ("not-json", lambda b: (b / "manifest.json").write_text("{oops"), None, r"manifest\.json: not valid JSON"),
    ("format-version", lambda b: _edit_manifest(b, lambda d: d.update(format_version=99)), None,
     r"manifest field 'format_version' has unsupported value 99 \(supported: 1\)"),
    ("no-shared-keys", lambda b: _edit_manifest(b, lambda d: d["clients"][0].pop("shared_keys")), None,
     r"manifest field 'clients\[0\]\.shared_keys' is missing"),
    ("bad-width", lambda b: _edit_manifest(b, lambda d: d["widths"][0].update(width=2)), None,
     r"manifest field 'widths\[0\]\.width' must be in \(0, 1\], got 2"),
    ("tampered-graph", lambda b: _replace_file(b, "train_step_w0.5_0.onnx", b"\0" * 64, False), "#train",
     r"file 'train_step_w0\.5_0\.onnx': sha256 [0-9a-f]{64} does not match the manifest's"),
    ("not-onnx", lambda b: _replace_file(b, "train_step_w0.5_0.onnx", b"not a model", True), "#train",
     r"file 'train_step_w0\.5_0\.onnx': not a loadable ONNX model"),
    ("missing-graph", lambda b: (b / "head_c00_digits_digit.onnx").unlink(), "#predict",
     r"file 'head_c00_digits_digit\.onnx' named in the manifest is missing \(.*HTTP 404\)"),
    ("npz-key", _npz_without_a_key, None, r"file 'weights_c00\.npz': key '[^']+' is missing"),
    ("graph-name", lambda b: _edit_manifest(b, _rename_x_input), "#train",
     r"manifest field 'widths\[0\]\.train_steps\[0\]\.file\.x_input' names graph input 'pixels', "
     r"which 'train_step_w0\.5_0\.onnx' does not have"),
]  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("browser_err_data")
    write_images(d, 4)
    return d


def assert_error(page, pattern: str) -> None:
    msg = page_error(page)
    assert page.locator("#error").is_visible()
    assert re.search(pattern, msg), msg
    assert page.locator("#download-update").is_hidden()  # no update offered


@pytest.mark.parametrize("case", BUNDLE_CASES, ids=[c[0] for c in BUNDLE_CASES])
def test_a_bad_bundle_shows_a_clear_error(exported, images, serve, page, tmp_path, case) -> None:
    _, bundle = exported
    _, breaks, action, pattern = case
    b = shutil.copytree(bundle, tmp_path / "bundle")
    breaks(b)
    srv = serve(b, images)
    page.goto(srv.url + "?bundle=bundle/&data=data/data.json")
    if action is not None:
        assert page_error(page) == ""
        page.fill("#steps", "1")
        page.click(action)
    assert_error(page, pattern)


def _png(size: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), 7, np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


IMAGE_CASES = [
    ("not-an-image", "junk.png", b"this is no PNG", r"image junk\.png: not a decodable image"),
    ("wrong-size", "big.png", "png16", r"image big\.png is 16x16 pixels; the model takes 8x8"),
]


@pytest.mark.parametrize("case", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_a_bad_image_shows_a_clear_error(exported, serve, page, case) -> None:
    _, bundle = exported
    _, name, data, pattern = case
    srv = serve(bundle)
    page.goto(srv.url + "?bundle=bundle/")
    assert page_error(page) == ""
    buf = _png(16) if data == "png16" else data
    page.set_input_files("#images", files=[{"name": name, "mimeType": "image/png", "buffer": buf}])
    assert_error(page, pattern)
    assert page.locator("#train").is_disabled()  # nothing was added


def test_an_unlabelled_image_is_refused_at_training(exported, serve, page) -> None:
    _, bundle = exported
    srv = serve(bundle)
    page.goto(srv.url + "?bundle=bundle/")
    settle(page)
    page.set_input_files(
        "#images", files=[{"name": "a.png", "mimeType": "image/png", "buffer": _png(8)}]
    )
    assert page_error(page) == ""
    page.click("#train")
    assert_error(page, r"image a\.png has no label for task digits/digit")
    # label it in the page as a user would: then it trains
    page.select_option("select[data-task='digits/digit']", label="3")
    page.click("#train")
    assert page_error(page) == "" and "trained 1 step(s) on 1 image(s)" in page.text_content(
        "#status"
    )


def test_bad_labels_and_options_show_a_clear_error(exported, images, serve, page, tmp_path) -> None:
    _, bundle = exported
    data = shutil.copytree(images, tmp_path / "data")
    d = json.loads((data / "data.json").read_text())
    d["images"][2]["labels"]["digits/digit"] = 12
    (data / "data.json").write_text(json.dumps(d))
    srv = serve(bundle, data)
    page.goto(srv.url + "?bundle=bundle/&data=data/data.json")
    assert_error(page, r"image img2\.png, task digits/digit: label 12 is not one of 0, 1, .*9")

    srv2 = serve(bundle, images)
    page.goto(srv2.url + "?bundle=bundle/&data=data/data.json")
    assert page_error(page) == ""
    page.fill("#lr", "-1")
    page.click("#train")
    assert_error(page, r"lr must be a finite number > 0, got -1")


def test_a_start_file_without_every_shared_key_is_refused(
    exported, images, serve, page, tmp_path
) -> None:
    from mobile_client.runtime import EdgeClient

    _, bundle = exported
    ec = EdgeClient(bundle)
    arrays = {k: ec.base_state()[k] for k in ec.shared_keys[1:]}
    data = shutil.copytree(images, tmp_path / "data")
    save_file(arrays, data / "global.safetensors", {"round": "1"})
    assert set(load_file(data / "global.safetensors")[0]) == set(arrays)
    srv = serve(bundle, data)
    page.goto(srv.url + "?bundle=bundle/&data=data/data.json&start=data/global.safetensors")
    assert_error(page, rf"start_from lacks 1 shared key\(s\) {ec.shared_keys[0]}")


def test_the_server_refuses_a_bad_update_naming_what_is_wrong(exported, serve, tmp_path) -> None:
    """POST /update runs the server's reader: a bad file is answered 400 with its message
    (which names the upload, not the server's paths) and is not kept."""
    import urllib.error
    import urllib.request

    from mobile_client.update import UpdateMeta, write_update

    _, bundle = exported
    srv = serve(bundle, None, tmp_path / "updates")
    bad = tmp_path / "bad.safetensors"
    write_update(bad, {"w": np.ones(2, np.float32)}, UpdateMeta("c00", 1, 0.5, 3, "h", {}))
    raw = bad.read_bytes().replace(b"fmtl-update", b"fmtl-other!")
    for body, want in ((b"garbage", "not a readable update"),
                       (raw, "metadata field 'format' is 'fmtl-other!'")):  # fmt: skip
        req = urllib.request.Request(srv.url + "update", data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 400
        msg = json.loads(e.value.read())["error"]
        assert want in msg and str(srv.updates) not in msg, msg
    assert srv.received == [] and list(srv.updates.iterdir()) == []
    ok = urllib.request.urlopen(
        urllib.request.Request(srv.url + "update", data=bad.read_bytes(), method="POST"), timeout=10
    )
    assert json.loads(ok.read())["client_id"] == "c00" and len(srv.received) == 1
