"""Inputs that are not images: a bundle's ``input_shape`` may be ``[F]`` (tabular
features), ``[L, F]`` (sequences) or ``[C, H, W]`` (images). The manifest bounds it,
the edge runtime checks batches against it, and only image bundles take PNG/PGM files.
(End to end with exported zoo models: tests/fmtl_lightning/test_own_model.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from mobile_client.cli import _as_batch
from mobile_client.edge_arrays import prepare_x
from mobile_client.errors import InputError, ManifestError
from mobile_client.manifest_entries import MAX_DIM, Normalisation


def _norm(shape: list[int], **kw) -> Normalisation:
    return Normalisation.from_dict({"mean": 0.5, "std": 2.0, "input_shape": shape, **kw}, "n")


@pytest.mark.parametrize("shape", [[12], [20, 6], [1, 8, 8], [3, 16, 16], [2, 3, 4, 5]])
def test_input_shapes_of_any_rank_load(shape: list[int]) -> None:
    n = _norm(shape)
    assert n.input_shape == tuple(shape)
    assert n.is_image == (shape in ([1, 8, 8], [3, 16, 16]))


@pytest.mark.parametrize(
    "shape,words",
    [
        ([], "must be 1 to 4 dims"),
        ([1, 2, 3, 4, 5], "must be 1 to 4 dims"),
        ([0, 4], "must be 1 to 4 dims"),
        ([True, 4], "must be 1 to 4 dims"),
        ([4.0], "must be 1 to 4 dims"),
        ([MAX_DIM, 2], f"holds {2 * MAX_DIM} values per example"),
    ],
)
def test_bad_input_shapes_are_refused_naming_the_field(shape: list, words: str) -> None:
    with pytest.raises(ManifestError, match=rf"'n.input_shape'.*{words}"):
        _norm(shape)


def test_tabular_batches_are_checked_and_normalised() -> None:
    n = _norm([12])
    x = np.arange(24, dtype=np.float32).reshape(2, 12)
    np.testing.assert_array_equal(prepare_x(x, n), x)  # float32: already normalised
    px = np.full((3, 12), 255, np.uint8)  # uint8: (v * scale - mean) / std
    np.testing.assert_allclose(prepare_x(px, n), np.full((3, 12), (1.0 - 0.5) / 2.0), rtol=1e-6)
    with pytest.raises(InputError, match=r"x has shape \(12,\); expected \(B, 12\) with B >= 1"):
        prepare_x(x[0], n)
    with pytest.raises(InputError, match=r"x has shape \(2, 1, 12\); expected \(B, 12\)"):
        prepare_x(x[:, None], n)
    seq = _norm([20, 6])
    assert prepare_x(np.zeros((4, 20, 6), np.float32), seq).shape == (4, 20, 6)
    with pytest.raises(InputError, match=r"expected \(B, 20, 6\)"):
        prepare_x(np.zeros((4, 6, 20), np.float32), seq)
    # a grayscale image bundle still takes (B, H, W)
    assert prepare_x(np.zeros((2, 8, 8), np.float32), _norm([1, 8, 8])).shape == (2, 1, 8, 8)


def test_one_example_becomes_a_batch_of_one() -> None:
    assert _as_batch(np.zeros(12), (12,)).shape == (1, 12)
    assert _as_batch(np.zeros((5, 12)), (12,)).shape == (5, 12)
    assert _as_batch(np.zeros((20, 6)), (20, 6)).shape == (1, 20, 6)
    assert _as_batch(np.zeros((8, 8)), (1, 8, 8)).shape == (1, 8, 8)  # (H, W) -> (1, H, W)
    assert _as_batch(np.zeros((3, 8, 8)), (3, 8, 8)).shape == (1, 3, 8, 8)
