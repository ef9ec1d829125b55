"""Built-in tasks: every target on hand-made labels against hand-written expected values."""

from __future__ import annotations

import numpy as np
import pytest

from fmtl_lightning.data.datasets import DATASET_NAMES
from fmtl_lightning.errors import TaskDefinitionError, TaskLabelError, UnknownTaskError
from fmtl_lightning.tasks import (
    CLOSED_LOOP_DIGITS,
    TASKS,
    Task,
    get_task,
    load_task_factory,
    register_task,
    unregister_task,
)

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


# ----------------------------------------------------------------------------- Task objects
def test_default_metrics_match_independent_computations():
    import torch
    import torchmetrics
    from sklearn.metrics import r2_score

    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(50, 4, generator=g), torch.randint(0, 4, (50,), generator=g)
    mc = Task("t/mc", 4, "multiclass").compute_metrics(z, y)
    want = torchmetrics.classification.MulticlassAccuracy(num_classes=4, average="micro")
    assert mc == pytest.approx({"acc": float(want(z, y))}, abs=1e-7)

    z, y = torch.randn(40, 3, generator=g), (torch.rand(40, 3, generator=g) > 0.6).float()
    y[:, 2] = 0  # a label that never occurs: its F1 is 0 in the macro mean, as torchmetrics
    ml = Task("t/ml", 3, "multilabel").compute_metrics(z, y)
    f1 = torchmetrics.classification.MultilabelF1Score(num_labels=3, average="macro")
    assert ml["f1"] == pytest.approx(float(f1(z, y.int())), abs=1e-6)
    assert ml["acc"] == pytest.approx(float(((z > 0).float() == y).float().mean()), abs=1e-7)

    z, y = torch.randn(30, 2, generator=g), torch.randn(30, 2, generator=g)
    rg = Task("t/rg", 2, "regression").compute_metrics(z, y)
    zn, yn = z.numpy().astype(np.float64), y.numpy().astype(np.float64)
    assert rg["acc"] == pytest.approx(r2_score(yn, zn), abs=1e-9)
    assert rg["mse"] == pytest.approx(np.mean((zn - yn) ** 2), abs=1e-9)
    assert rg["mae"] == pytest.approx(np.mean(np.abs(zn - yn)), abs=1e-9)
    const = torch.ones(5, 1)  # constant target: 1 when exact, else 0 (sklearn's r2_score)
    assert Task("t/c", 1, "regression").compute_metrics(const, const)["acc"] == 1.0
    assert Task("t/c", 1, "regression").compute_metrics(const * 2, const)["acc"] == 0.0


def test_losses_by_kind_and_masks_only_touch_multiclass():
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 3, generator=g)
    mask = torch.tensor([True, False, True])
    yc = torch.tensor([0, 2, 0, 2, 2, 0])
    mc = Task("t/mc", 3, "multiclass")
    want = F.cross_entropy(z[:, mask], torch.tensor([0, 1, 0, 1, 1, 0]))
    assert torch.allclose(mc.compute_loss(z, yc, mask), want, atol=1e-6)
    yr = torch.randn(6, 3, generator=g)
    rg = Task("t/rg", 3, "regression")
    assert torch.allclose(rg.compute_loss(z, yr, mask), ((z - yr) ** 2).mean(), atol=1e-7)
    yl = (yr > 0).float()
    ml = Task("t/ml", 3, "multilabel")
    bce = -(yl * F.logsigmoid(z) + (1 - yl) * F.logsigmoid(-z)).mean()
    assert torch.allclose(ml.compute_loss(z, yl, mask), bce, atol=1e-6)
    own = Task("t/own", 3, "regression", loss=lambda a, b: (a - b).abs().mean())
    assert torch.allclose(own.compute_loss(z, yr), (z - yr).abs().mean())
    assert not own.default_loss and rg.default_loss


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "", "num_outputs": 2, "kind": "multiclass"}, "name"),
        ({"name": "a/b", "num_outputs": 0, "kind": "regression"}, "num_outputs"),
        ({"name": "a/b", "num_outputs": True, "kind": "regression"}, "num_outputs"),
        ({"name": "a/b", "num_outputs": 1, "kind": "multiclass"}, "num_outputs"),
        ({"name": "a/b", "num_outputs": 2, "kind": "ranking"}, "kind"),
        ({"name": "a/b", "num_outputs": 2, "kind": "regression", "output_names": ("x",)},
         "output_names"),
        ({"name": "a/b", "num_outputs": 2, "kind": "regression", "loss": 3}, "loss"),
        ({"name": "a/b", "num_outputs": 2, "kind": "regression", "target": "y"}, "target"),
        ({"name": "a/b", "num_outputs": 2, "kind": "regression", "domain": 5}, "domain"),
    ],
)  # fmt: skip
def test_bad_task_fields_raise_a_typed_error_naming_the_field(kwargs, field):
    with pytest.raises(TaskDefinitionError, match=f"'{field}'") as info:
        Task(**kwargs)
    assert info.value.field == field


def test_register_refuses_duplicates_and_unregister_keeps_built_ins():
    task = Task("user/score", 1, "regression")
    assert task.output_names == ("0",)
    register_task(task)
    try:
        assert get_task("user/score") is task and TASKS["user/score"] is task
        with pytest.raises(TaskDefinitionError, match="already registered") as info:
            register_task(Task("user/score", 2, "multilabel"))
        assert info.value.field == "name"
        with pytest.raises(TaskDefinitionError, match="already registered"):
            register_task(Task("mnist/digit", 10, "multiclass"))
        with pytest.raises(TaskDefinitionError, match="register_task takes a Task"):
            register_task("user/other")  # type: ignore[arg-type]
    finally:
        unregister_task("user/score")
    assert "user/score" not in TASKS
    with pytest.raises(TaskDefinitionError, match="built-in"):
        unregister_task("mnist/digit")


def test_metrics_without_acc_and_tasks_without_target_are_refused():
    import torch

    t = Task("user/m", 2, "multilabel", metrics=lambda z, y: {"f1": 1.0})
    with pytest.raises(TaskDefinitionError, match="'acc'") as info:
        t.compute_metrics(torch.zeros(2, 2), torch.zeros(2, 2))
    assert info.value.field == "metrics"
    with pytest.raises(TaskDefinitionError, match="'target'"):
        Task("user/n", 1, "regression").targets(np.arange(3))


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("no_colon", "import path"),
        ("os.path:join; rm", "import path"),
        ("fmtl_lightning.nope:make", "cannot be imported"),
        ("fmtl_lightning.tasks:nope", "cannot be imported"),
        ("fmtl_lightning.tasks:TASK_KINDS", "not callable"),
        ("fmtl_lightning.tasks:_fashion_tasks", "already registered"),
        ("builtins:list", "non-empty list of Tasks"),
    ],
)
def test_bad_task_factories_raise_a_typed_error_naming_factory(path, match):
    with pytest.raises(TaskDefinitionError, match=match) as info:
        load_task_factory(path)
    assert info.value.field in ("factory", "name")


def test_label_masks_are_for_multiclass_tasks_only():
    mask = get_task("mnist/digit").label_mask(np.array([3, 3, 7]))
    assert mask.dtype == bool and np.flatnonzero(mask).tolist() == [3, 7]
    assert get_task("mnist/attrs").label_mask(np.zeros((3, 3), np.float32)) is None
    assert Task("t/r", 2, "regression").label_mask(np.zeros((3, 2), np.float32)) is None
