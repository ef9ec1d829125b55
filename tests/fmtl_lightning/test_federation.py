"""ClientSpec validation and the federation summary table, on hand-made labels."""

from __future__ import annotations

import numpy as np
import pytest

from fmtl_lightning.errors import FederationError, UnknownTaskError
from fmtl_lightning.federation import ClientSpec, federation_summary

MNIST_LABELS = np.array([0, 0, 1, 2, 3, 3, 3, 9, 5, 5])
FASHION_LABELS = np.array([8, 8, 8, 1, 7])


def _client(**overrides) -> ClientSpec:
    fields = dict(
        client_id="phone-0",
        tasks=("mnist/digit", "mnist/parity"),
        width=0.5,
        train_idx=np.array([0, 1, 2, 4, 5]),
        test_idx=np.array([3]),
        domain="mnist",
    )
    fields.update(overrides)
    return ClientSpec(**fields)


def test_client_spec_normalises_indices_to_read_only_int64():
    client = _client(train_idx=[0, 1, 2], test_idx=np.array([3], dtype=np.int32))
    assert client.train_idx.dtype == np.int64 and client.test_idx.dtype == np.int64
    assert client.train_idx.tolist() == [0, 1, 2]
    assert not client.train_idx.flags.writeable
    assert _client(width=1).width == 1


def test_tasks_from_two_domains_are_rejected_naming_client_and_tasks():
    with pytest.raises(FederationError) as info:
        _client(tasks=("mnist/digit", "fashion/item"))
    message = str(info.value)
    assert "'phone-0'" in message and "mnist/digit" in message and "fashion/item" in message
    with pytest.raises(FederationError, match="domain 'fashion_mnist'"):
        _client(domain="fashion_mnist")  # mnist tasks on a fashion client


@pytest.mark.parametrize("width", [0, -0.5, 1.01, float("nan")])
def test_width_outside_zero_one_is_rejected(width):
    with pytest.raises(FederationError, match=f"width must lie in \\(0, 1\\], got {width}"):
        _client(width=width)


def test_other_invalid_specs():
    with pytest.raises(UnknownTaskError, match="mnist/colour"):
        _client(tasks=("mnist/colour",))
    with pytest.raises(FederationError, match="needs at least one task"):
        _client(tasks=())
    with pytest.raises(FederationError, match="1 indices are in both"):
        _client(train_idx=np.array([0, 1]), test_idx=np.array([1, 2]))
    with pytest.raises(FederationError, match="train_idx must be a 1-D integer array"):
        _client(train_idx=np.array([0.5]))


def test_summary_is_a_fixed_width_table_with_each_clients_counts():
    clients = [
        _client(tasks=("mnist/parity",)),
        ClientSpec("server-1", ("fashion/group",), 1.0, [0, 1, 2, 3], [4], "fashion_mnist"),
    ]
    table = federation_summary(clients, {"mnist": MNIST_LABELS, "fashion_mnist": FASHION_LABELS})
    rule = "-" * 76  # as long as the longest line (the header here)
    expected = [
        "client    domain         width  tasks          n_train  n_test  train labels",
        rule,
        "phone-0   mnist            0.5  mnist/parity         5       1  0:2 1:1 3:2",
        "server-1  fashion_mnist      1  fashion/group        4       1  1:1 8:3",
        rule,
        "2 clients, 9 train samples, 2 test samples",
    ]
    assert table.splitlines() == expected


def test_summary_checks_domains_and_index_ranges():
    with pytest.raises(FederationError, match="no labels given for domain 'mnist'"):
        federation_summary([_client()], {"digits": MNIST_LABELS})
    with pytest.raises(FederationError, match="train_idx out of range for the 3 labels"):
        federation_summary([_client()], {"mnist": MNIST_LABELS[:3]})
