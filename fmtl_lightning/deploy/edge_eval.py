"""An edge node's answer to an evaluate message (numpy + flwr only: no torch, no onnx).

The simulation scores an edge client with the aggregated global backbone plus the
heads the device trained. An edge node runs its bundle's inference graphs, whose
weights are baked in at export (``export_backbone``/``export_head`` with
``weights_as_inputs=False``, the bundle's layout): onnxruntime can run them only with
the weights they were exported with, never with the aggregated ones. So the node
answers with no score and says why; the deploy report prints that line instead of a
number that would mean something else (the exported model's accuracy). Scoring it
needs inference graphs that take their weights as inputs, fed by
:class:`~mobile_client.runtime.EdgeClient` (an ``export`` + ``mobile_client`` change).
"""

from __future__ import annotations

from flwr.app import Context, Message

from fmtl_lightning.deploy.evaluation import eval_reply
from mobile_client.flower_app import NodeSettings, ProtocolError, read_train_message

WHY = (
    "edge node: its bundle's inference graphs have the exported weights baked in, so "
    "onnxruntime cannot score the aggregated model with them (needs graphs taking the "
    "weights as inputs); fmtl simulate scores this client in-process"
)


def edge_evaluate(msg: Message, context: Context) -> Message:
    """Reply to an evaluate message: no metrics, :data:`WHY` as the note."""
    s = NodeSettings.from_context(context)
    _, ins = read_train_message(msg)
    if ins.client_id != s.client_id:
        raise ProtocolError(f"evaluate message for {ins.client_id!r} reached node {s.client_id!r}")
    return eval_reply(msg, ins, {}, 0, WHY)
