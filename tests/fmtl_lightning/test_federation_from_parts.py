"""fed_data.federation_from_parts: clients from explicit indices, tested on the test split."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from fmtl_lightning.data import load_dataset  # noqa: E402
from fmtl_lightning.errors import FederationError  # noqa: E402
from fmtl_lightning.fed_data import federation_from_parts, images_to_tensor  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def test_clients_hold_exactly_their_parts(digits):
    train, test = digits
    tr = [np.array([0, 5, 9]), np.array([1, 2])]
    te = [np.array([3, 4]), np.array([], dtype=np.int64)]
    fed = federation_from_parts(train, test, ["digits/digit", "digits/parity"], [1.0, 0.5], tr, te)
    assert [c.cid for c in fed.clients] == ["c00", "c01"]
    assert [c.width for c in fed.clients] == [1.0, 0.5]
    assert fed.image_size == 8 and fed.normalisation == {"digits": (train.mean, train.std)}
    c0, c1 = fed.clients
    by_hand = (train.images[[0, 5, 9]].astype(np.float32) / 255.0 - train.mean) / train.std
    np.testing.assert_array_equal(c0.x_train.numpy(), by_hand[:, None])
    assert c0.x_train.shape == (3, 1, 8, 8) and c0.x_train.dtype.is_floating_point
    np.testing.assert_array_equal(c0.y_train["digits/digit"].numpy(), train.labels[[0, 5, 9]])
    np.testing.assert_array_equal(c0.y_train["digits/parity"].numpy(), train.labels[[0, 5, 9]] % 2)
    # tested on the test split, normalised with the train split's constants
    np.testing.assert_array_equal(
        c0.x_test.numpy(), images_to_tensor(test.images[[3, 4]], train.mean, train.std).numpy()
    )
    np.testing.assert_array_equal(c0.y_test["digits/digit"].numpy(), test.labels[[3, 4]])
    assert c1.x_test.shape == (0, 1, 8, 8)
    # label masks: the classes of the client's training samples, per multiclass task
    mask = np.zeros(10, dtype=bool)
    mask[train.labels[[0, 5, 9]]] = True
    np.testing.assert_array_equal(c0.label_masks["digits/digit"].numpy(), mask)
    assert "tested on 2 images of the" in fed.summary and "c01" in fed.summary


def test_bad_parts_raise_a_federation_error_naming_the_client(digits):
    train, test = digits
    task = ["digits/digit"]
    with pytest.raises(FederationError, match="got 2 widths, 1 train parts"):
        federation_from_parts(train, test, task, [1.0, 1.0], [np.arange(3)], [np.arange(3)] * 2)
    with pytest.raises(
        FederationError, match=r"client 'c00': test indices out of range .* max 9999"
    ):
        federation_from_parts(train, test, task, [1.0], [np.arange(3)], [np.array([0, 9999])])
    with pytest.raises(FederationError, match="client 'c00': the test part must be a 1-D integer"):
        federation_from_parts(train, test, task, [1.0], [np.arange(3)], [np.array([0.5])])
    with pytest.raises(FederationError, match="train and test splits of one dataset"):
        federation_from_parts(train, train, task, [1.0], [np.arange(3)], [np.arange(3)])
    with pytest.raises(FederationError, match="width must lie in"):
        federation_from_parts(train, test, task, [1.5], [np.arange(3)], [np.arange(3)])
