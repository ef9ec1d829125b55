"""PNG/PGM inputs to ``fmtl-edge predict``: gray, palette, RGB and RGBA images are
converted to the bundle's channels (alpha over black) and resized to its input size;
an unreadable or unsupported file is one typed error naming it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mobile_client.cli import main
from mobile_client.errors import InputError
from mobile_client.inputs import read_image
from mobile_client.runtime import EdgeClient

GRAY = (1, 8, 8)  # the tiny digits bundle's input shape


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma of uint8 (H, W, 3), as Pillow's ``convert("L")`` defines it."""
    return (rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])).round()


def _rgb(seed: int, h: int = 8, w: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_gray_image_is_read_as_stored(tmp_path: Path) -> None:
    px = _rgb(0)[..., 0]
    Image.fromarray(px, "L").save(tmp_path / "g.png")
    got = read_image(tmp_path / "g.png", GRAY)
    assert got.shape == (1, 1, 8, 8) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[0, 0], px)


def test_rgb_to_gray_and_gray_to_rgb(tmp_path: Path) -> None:
    rgb = _rgb(1)
    Image.fromarray(rgb, "RGB").save(tmp_path / "c.png")
    got = read_image(tmp_path / "c.png", GRAY)[0, 0].astype(int)
    assert np.abs(got - _luma(rgb)).max() <= 1  # Pillow's fixed-point rounding
    Image.fromarray(rgb[..., 1], "L").save(tmp_path / "g.png")
    got3 = read_image(tmp_path / "g.png", (3, 8, 8))
    assert got3.shape == (1, 3, 8, 8)
    for c in range(3):
        np.testing.assert_array_equal(got3[0, c], rgb[..., 1])
    np.testing.assert_array_equal(read_image(tmp_path / "c.png", (3, 8, 8))[0],
                                  rgb.transpose(2, 0, 1))  # fmt: skip


def test_alpha_is_composited_over_black(tmp_path: Path) -> None:
    rgb = _rgb(2)
    alpha = np.random.default_rng(3).integers(0, 256, (8, 8), dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "a.png")
    over_black = np.rint(rgb * (alpha[..., None] / 255.0))
    got = read_image(tmp_path / "a.png", (3, 8, 8))[0].transpose(1, 2, 0).astype(int)
    assert np.abs(got - over_black).max() <= 1
    assert (got[0, 0] == 0).all() and (got[0, 1] == rgb[0, 1]).all()
    gray = read_image(tmp_path / "a.png", GRAY)[0, 0].astype(int)
    assert np.abs(gray - _luma(over_black.astype(np.uint8))).max() <= 1
    Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA").save(tmp_path / "la.png")
    got_la = read_image(tmp_path / "la.png", GRAY)[0, 0].astype(int)
    assert np.abs(got_la - np.rint(rgb[..., 0] * (alpha / 255.0))).max() <= 1


def test_palette_image(tmp_path: Path) -> None:
    rgb = _rgb(4)
    Image.fromarray(rgb, "RGB").convert("P", palette=Image.Palette.ADAPTIVE).save(
        tmp_path / "p.png"
    )
    with Image.open(tmp_path / "p.png") as im:
        want = np.asarray(im.convert("RGB"))  # the palette's colours
    np.testing.assert_array_equal(read_image(tmp_path / "p.png", (3, 8, 8))[0],
                                  want.transpose(2, 0, 1))  # fmt: skip


def test_resized_to_the_model_input(tmp_path: Path) -> None:
    Image.fromarray(np.full((37, 21, 3), 77, np.uint8), "RGB").save(tmp_path / "flat.png")
    got = read_image(tmp_path / "flat.png", GRAY)
    assert got.shape == (1, 1, 8, 8) and (got == 77).all()  # luma of gray 77 is 77
    px = _rgb(5)[..., 0]
    big = np.kron(px, np.ones((4, 4), np.uint8))  # each pixel a 4x4 block: (32, 32)
    Image.fromarray(big, "L").save(tmp_path / "big.png")
    small = read_image(tmp_path / "big.png", GRAY)[0, 0].astype(int)
    inner = np.abs(small - px.astype(int))  # bilinear blurs only across block edges
    assert small.shape == (8, 8) and inner.mean() < 40


def test_predict_converts_and_resizes(mlp_export, tmp_path: Path, capsys) -> None:
    bundle = mlp_export[1]
    from tests.mobile_client.edge_helpers import digits

    px, _, _ = digits(2, ())
    rgb = np.repeat(np.kron(px[0], np.ones((3, 3), np.uint8))[..., None], 3, axis=2)
    Image.fromarray(np.dstack([rgb, np.full((24, 24), 255, np.uint8)]), "RGBA").save(
        tmp_path / "big.png"
    )
    argv = ["predict", str(bundle), "--task", "digits/digit", "--probs", str(tmp_path / "big.png")]
    assert main(argv) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1].split("\t")
    want = EdgeClient(bundle, "c00").predict("digits/digit", read_image(tmp_path / "big.png", GRAY))
    assert row[0] == str(tmp_path / "big.png") and row[1] == str(int(want.argmax()))


@pytest.mark.parametrize(
    ("name", "data", "match"),
    [
        ("junk.png", b"not a png at all", r"junk\.png: not a readable PNG image"),
        ("cut.png", None, r"cut\.png: not a readable PNG image"),
        ("deep.png", "I;16", r"deep\.png: image mode 'I;16'; supported: 8-bit L, LA, P, RGB"),
    ],
)
def test_bad_image_files_are_named(tmp_path: Path, name: str, data, match: str) -> None:
    p = tmp_path / name
    if data is None:
        Image.fromarray(_rgb(6, 32, 32), "RGB").save(p)
        p.write_bytes(p.read_bytes()[:120])  # truncated
    elif data == "I;16":
        Image.fromarray(np.zeros((8, 8), np.uint16)).save(p)
    else:
        p.write_bytes(data)
    with pytest.raises(InputError, match=match):
        read_image(p, GRAY)
