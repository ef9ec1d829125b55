"""Built-in tasks: every target on hand-made labels against hand-written expected values."""

from __future__ import annotations

import numpy as np
import pytest

from fmtl_lightning.data.datasets import DATASET_NAMES
from fmtl_lightning.errors import TaskLabelError, UnknownTaskError
from fmtl_lightning.tasks import CLOSED_LOOP_DIGITS, TASKS, Task, get_task

LABELS = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 7, 0], dtype=np.int64)

# attrs rows for digits 0..9: (ge5, odd, has_closed_loop), closed loops in {0, 4, 6, 8, 9}
ATTRS_BY_DIGIT = [
    [0, 0, 1],  # 0
    [0, 1, 0],  # 1
    [0, 0, 0],  # 2
    [0, 1, 0],  # 3
    [0, 0, 1],  # 4
    [1, 1, 0],  # 5
    [1, 0, 1],  # 6
    [1, 1, 0],  # 7
    [1, 0, 1],  # 8
    [1, 1, 1],  # 9
]

EXPECTED_MULTICLASS = {
    "digit": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 7, 0],
    "parity": [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 0],
    "ge5": [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0],
}
# fashion: 0 T-shirt, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat, 5 Sandal, 6 Shirt,
# 7 Sneaker, 8 Bag, 9 Ankle boot -> tops 0, bottoms 1, footwear 2, bags 3
EXPECTED_FASHION_GROUP = [0, 1, 0, 0, 0, 2, 0, 2, 3, 2, 2, 0]


def test_registry_holds_exactly_the_built_in_tasks():
    assert sorted(TASKS) == sorted(
        [f"{d}/{t}" for d in ("mnist", "digits") for t in ("digit", "parity", "ge5", "attrs")]
        + ["fashion/item", "fashion/group"]
    )
    for name, task in TASKS.items():
        assert isinstance(task, Task) and task.name == name
        assert task.domain in DATASET_NAMES
        assert task.num_outputs == len(task.output_names)
    assert {t.domain for n, t in TASKS.items() if n.startswith("fashion/")} == {"fashion_mnist"}
    with pytest.raises(TypeError):
        TASKS["mnist/new"] = TASKS["mnist/digit"]  # type: ignore[index]


@pytest.mark.parametrize("domain", ["mnist", "digits"])
@pytest.mark.parametrize("kind", sorted(EXPECTED_MULTICLASS))
def test_digit_multiclass_targets(domain, kind):
    task = get_task(f"{domain}/{kind}")
    target = task.target(LABELS)
    assert task.kind == "multiclass" and task.domain == domain
    assert target.dtype == np.int64 and target.shape == (12,)
    assert target.tolist() == EXPECTED_MULTICLASS[kind]
    assert task.num_outputs == (10 if kind == "digit" else 2)


@pytest.mark.parametrize("domain", ["mnist", "digits"])
def test_digit_attrs_multilabel_target(domain):
    task = get_task(f"{domain}/attrs")
    target = task.target(LABELS)
    assert task.kind == "multilabel" and task.num_outputs == 3
    assert task.output_names == ("ge5", "odd", "has_closed_loop")
    assert target.dtype == np.float32 and target.shape == (12, 3)
    expected = [ATTRS_BY_DIGIT[d] for d in LABELS.tolist()]
    assert target.tolist() == expected
    assert CLOSED_LOOP_DIGITS == (0, 4, 6, 8, 9)


def test_fashion_targets():
    item, group = get_task("fashion/item"), get_task("fashion/group")
    assert item.target(LABELS).tolist() == LABELS.tolist()
    assert item.output_names[0] == "T-shirt/top" and item.num_outputs == 10
    target = group.target(LABELS)
    assert target.dtype == np.int64
    assert target.tolist() == EXPECTED_FASHION_GROUP
    assert group.output_names == ("tops", "bottoms", "footwear", "bags")
    assert group.num_outputs == 4


def test_targets_accept_other_int_dtypes_and_empty_arrays():
    assert get_task("mnist/parity").target(np.array([3, 4], dtype=np.uint8)).tolist() == [1, 0]
    assert get_task("mnist/attrs").target(np.array([], dtype=np.int64)).shape == (0, 3)


@pytest.mark.parametrize(
    "labels",
    [np.array([10]), np.array([-1]), np.array([1.0, 2.0]), np.zeros((2, 2), dtype=np.int64)],
    ids=["too-big", "negative", "float", "2-D"],
)
def test_bad_labels_raise_task_label_error(labels):
    with pytest.raises(TaskLabelError, match="mnist/ge5"):
        get_task("mnist/ge5").target(labels)


def test_unknown_task_names_itself_and_lists_known_tasks():
    with pytest.raises(UnknownTaskError) as info:
        get_task("mnist/colour")
    message = str(info.value)
    assert "'mnist/colour'" in message
    assert all(name in message for name in TASKS)
