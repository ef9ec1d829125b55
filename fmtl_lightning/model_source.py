"""Where a run's models come from: the built-in families, or a user's own ``nn.Module``.

A :class:`ModelSource` builds the model of any client (the heads of its tasks) at any
width, and declares its roles (the :class:`~fmtl_lightning.roles.ModelSpec`). The server
plan, the in-process clients and the Lightning nodes read models only through it, so a
user's model is federated exactly like a built-in one:

* :class:`BuiltinModel` — the configured family (``model.family``: mlp, cnn, dwcnn,
  fedavgcnn), planned by the same inference as a user's model
  (:func:`fmtl_lightning.models.builtin_plan`);
* :class:`FederatedModel` — a user's backbone (any ``nn.Module`` mapping an input batch
  to ``(B, F)`` features) and optionally their own head per task (default: a linear
  layer). Roles follow from the module types (:func:`fmtl_lightning.width_plan.infer_plan`:
  norms, statistics, counters, task heads); which dims scale with width is inferred from
  the traced graph, so HeteroFL and FedRolex slicing work on it. Layers that cannot be
  sliced are refused naming the layer; pass them in ``not_scaled`` and they stay at full
  width in every client.

Usage::

    fm = FederatedModel(MyBackbone(), example_input=torch.zeros(1, 3, 32, 32))
    run_config(cfg, "runs/mine", model=fm)        # or Simulation(cfg, run_dir, model=fm)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeAlias

import torch
from torch import nn

from fmtl_lightning.errors import WidthPlanError
from fmtl_lightning.models import BackboneConfig, MultiTaskModel, head_name, model_spec
from fmtl_lightning.own_steps import OwnSteps, overrides
from fmtl_lightning.roles import ModelSpec, RolePolicy, WidthSpec


class ModelSource(Protocol):
    """Builds every client's model and declares its roles (see the module docstring);
    ``own_steps``: the user's own steps drive local fits (else the library's);
    ``callbacks``: Lightning Callbacks called in every local fit."""

    own_steps: OwnSteps | None
    callbacks: list[Any]

    def build(self, task_outputs: Mapping[str, int], width: float) -> ClientModel:
        """The model with one head per task of ``task_outputs`` at ``width``; its forward
        maps an input batch to ``{task: output}``; it has ``backbone``, ``heads``,
        ``task_outputs``, ``width`` and ``declarations`` (key -> (kind, axes, ...))."""
        ...

    def spec(
        self, task_outputs: Mapping[str, int], policy: RolePolicy | str = "fedper"
    ) -> ModelSpec:
        """The full-width roles of :meth:`build`'s model under ``policy``."""
        ...


class BuiltinModel:
    """A built-in family (:class:`~fmtl_lightning.models.BackboneConfig`)."""

    def __init__(self, cfg: BackboneConfig) -> None:
        self.cfg = cfg
        self.own_steps: OwnSteps | None = None
        self.callbacks: list[Any] = []

    def build(self, task_outputs: Mapping[str, int], width: float) -> MultiTaskModel:
        return MultiTaskModel(self.cfg, task_outputs, width)

    def spec(
        self, task_outputs: Mapping[str, int], policy: RolePolicy | str = "fedper"
    ) -> ModelSpec:
        return model_spec(self.cfg, task_outputs, policy)


class TaskModel(nn.Module):
    """A user's backbone plus one head per task; forward returns ``{task: output}``."""

    def __init__(
        self, backbone: nn.Module, heads: Mapping[str, nn.Module], task_outputs: Mapping[str, int]
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict({head_name(t): heads[t] for t in task_outputs})
        self.task_outputs = dict(task_outputs)
        self.width = 1.0
        self.declarations: dict[str, Any] = {}
        self.input_shape: tuple[int, ...] = ()  # one input without the batch dim
        self.feature_dim = 0  # the backbone's output features at this width
        self.own_steps: OwnSteps | None = None  # the user's steps drive local fits
        self._spec: Callable[[RolePolicy | str], ModelSpec] | None = None

    @property
    def family(self) -> str:
        """The model's name in bundles: ``own:<backbone class>``."""
        return f"own:{type(self.backbone).__name__}"

    def role_spec(self, policy: RolePolicy | str = "fedper") -> ModelSpec:
        """The full-width ModelSpec of this model's architecture under ``policy``."""
        assert self._spec is not None
        return self._spec(policy)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        return {t: self.heads[head_name(t)](feats) for t in self.task_outputs}


#: What a :class:`ModelSource` builds: a built-in family's model or a user's.
ClientModel: TypeAlias = MultiTaskModel | TaskModel


class FederatedModel:
    """A user's model for a federation: ``backbone`` (shared) and a head per task (local
    under FedPer; see the module docstring).

    ``example_input``: one input batch (any batch size) of the shape the data has, used
    to trace the model; ``heads``: task -> head module (its input is the backbone's
    ``(B, F)`` output); a task without one gets ``nn.Linear(F, outputs)``;
    ``not_scaled``: names of backbone submodules that keep their full width in every
    client. Raises :class:`~fmtl_lightning.errors.WidthPlanError` naming a layer it
    cannot plan.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        example_input: torch.Tensor,
        heads: Mapping[str, nn.Module] | None = None,
        not_scaled: Iterable[str] = (),
    ) -> None:
        self.backbone = backbone
        self.example_input = example_input
        self.heads = dict(heads or {})
        self.not_scaled = tuple(not_scaled)
        was = backbone.training
        backbone.eval()
        with torch.no_grad():
            feats = backbone(example_input)
        backbone.train(was)
        if not isinstance(feats, torch.Tensor) or feats.ndim != 2:
            got = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
            raise WidthPlanError(
                f"backbone: must map the example input to (batch, features), got {got}"
            )
        self.feature_dim = int(feats.shape[1])
        self._plans: dict[tuple, tuple[dict, dict]] = {}
        self._template: nn.Module | None = None  # from_model: the model's own head
        self.own_steps: OwnSteps | None = None  # from_model: the user's own steps
        self.callbacks: list[Any] = []  # called in every local fit (own_steps.LocalFit)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        *,
        head: str,
        example_input: torch.Tensor,
        not_scaled: Iterable[str] = (),
        own_steps: bool | None = None,
        callbacks: Iterable[Any] = (),
    ) -> FederatedModel:
        """A whole model with its split declared: the submodule named ``head`` (applied
        last in ``forward``, to ``(B, F)`` features) is the per-task head, everything
        else the shared backbone. Each task gets a copy of that head when its output size
        matches, else a linear layer. ``model`` itself is not changed.

        ``own_steps``: local fits run the model's own ``training_step`` and
        ``configure_optimizers`` (:mod:`fmtl_lightning.own_steps`); default: when
        ``model`` is a LightningModule that defines ``training_step``. ``callbacks``:
        Lightning Callbacks called in every local fit, after which the module's own
        ``configure_callbacks()`` are added."""
        names = dict(model.named_modules())
        if head not in names or not head:
            raise WidthPlanError(f"head: {head!r} is not a submodule of {type(model).__name__} "
                                 f"(known: {sorted(n for n in names if n)[:12]})")  # fmt: skip
        backbone = copy.deepcopy(model)
        parent, _, leaf = head.rpartition(".")
        template = backbone.get_submodule(head)
        setattr(backbone.get_submodule(parent) if parent else backbone, leaf, nn.Identity())
        fm = cls(backbone, example_input=example_input, not_scaled=not_scaled)
        fm._template = template
        if own_steps is None:
            own_steps = overrides(model, "training_step")
        if own_steps:
            fm.own_steps = OwnSteps(head)
            fm.own_steps.check(model)
        fm.callbacks = list(callbacks)
        if overrides(model, "configure_callbacks"):
            more = model.configure_callbacks()
            fm.callbacks += [more] if not isinstance(more, Sequence) else list(more)
        return fm

    def _full(self, task_outputs: Mapping[str, int]) -> TaskModel:
        heads = {}
        tmpl = self._template
        for t, n in task_outputs.items():
            h = self.heads.get(t)
            if h is None and tmpl is not None and _out_features(tmpl, self.feature_dim) == n:
                h = copy.deepcopy(tmpl)
            elif h is None:
                h = nn.Linear(self.feature_dim, n)
            else:
                h = copy.deepcopy(h)
                out = _out_features(h, self.feature_dim)
                if out != n:
                    raise WidthPlanError(f"heads[{t!r}]: gives {out} outputs, the task has {n}")
            heads[t] = h
        return TaskModel(copy.deepcopy(self.backbone), heads, task_outputs)

    def _plan(self, model: TaskModel) -> tuple[dict, dict]:
        key = tuple(model.task_outputs.items())
        if key not in self._plans:
            from fmtl_lightning.width_plan import infer_plan

            heads = [f"heads.{head_name(t)}" for t in model.task_outputs]
            opaque = [f"backbone.{n}" for n in self.not_scaled]
            self._plans[key] = infer_plan(model, self.example_input, heads=heads, not_scaled=opaque)
        return self._plans[key]

    def build(self, task_outputs: Mapping[str, int], width: float) -> TaskModel:
        from fmtl_lightning.width_build import build_at_width

        full = self._full(task_outputs)
        groups, decl = self._plan(full)
        model = full if width == 1.0 else build_at_width(full, groups, decl, WidthSpec(width))
        model.width = float(width)
        model.declarations = dict(decl)
        model.input_shape = tuple(self.example_input.shape[1:])
        was = model.backbone.training
        model.backbone.eval()
        with torch.no_grad():
            model.feature_dim = int(model.backbone(self.example_input[:1]).shape[1])
        model.backbone.train(was)
        model.own_steps = self.own_steps
        outputs = dict(task_outputs)
        model._spec = lambda policy: self.spec(outputs, policy)
        return model

    def spec(
        self, task_outputs: Mapping[str, int], policy: RolePolicy | str = "fedper"
    ) -> ModelSpec:
        from fmtl_lightning.width_build import plan_spec

        full = self._full(task_outputs)
        groups, decl = self._plan(full)
        return plan_spec(full, groups, decl, policy)


def _out_features(head: nn.Module, feature_dim: int) -> int:
    with torch.no_grad():
        was = head.training
        head.eval()
        out = head(torch.zeros(2, feature_dim))
        head.train(was)
    return int(out.shape[-1])


def model_from_factory(path: str) -> ModelSource:
    """The model ``model.factory`` (``"package.module:callable"``, no arguments) builds,
    checked to be a :class:`ModelSource` (a :class:`FederatedModel`)."""
    from fmtl_lightning.config import ConfigError
    from fmtl_lightning.config.factory import call_factory, import_factory

    made = call_factory(import_factory(path, "model.factory"), path, "model.factory")
    if not (callable(getattr(made, "build", None)) and callable(getattr(made, "spec", None))):
        raise ConfigError(f"model.factory: {path!r} must return a FederatedModel "
                          f"(build/spec), got {type(made).__name__}")  # fmt: skip
    return made
