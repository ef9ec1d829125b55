"""ONNX export of a trained federation: separable backbone/head inference graphs and
SGD (momentum, weight decay) training-step graphs that run on stock onnxruntime.

Public API (graph building and parity; the manifest/CLI layer builds on it):

* :func:`export_backbone`, :func:`export_head` -> :class:`GraphInfo`
* :func:`export_train_step`, :func:`export_head_step` -> :class:`TrainStepInfo`, taking a
  :class:`StepOptimizer` (SGD momentum, weight decay; :func:`step_optimizer` of a torch one)
* :func:`to_ort_format` -> ``.ort`` paths
* :func:`training_decompositions` -> the aten decomposition table the step graphs need
"""

from export.decompositions import training_decompositions
from export.graphs import ExportError, GraphInfo, TensorInfo, TrainStepInfo, to_ort_format
from export.inference import export_backbone, export_head
from export.step_optimizer import StepOptimizer, step_optimizer
from export.trainstep import export_head_step, export_train_step

__all__ = [
    "ExportError",
    "GraphInfo",
    "StepOptimizer",
    "TensorInfo",
    "TrainStepInfo",
    "export_backbone",
    "export_head",
    "export_head_step",
    "export_train_step",
    "step_optimizer",
    "to_ort_format",
    "training_decompositions",
]
