"""The ClientApp of a mixed federation: one FAB, each node picks its runtime.

``runtime = "lightning"`` (default) trains with the simulator's module and loop
(:class:`fmtl_lightning.deploy.lightning_client.LightningNode`): in the node-resident
worker named by the node config's ``worker`` key (a socket; the ClientApp only forwards
the message, :mod:`fmtl_lightning.deploy.worker_forward`, and imports no torch), or,
without ``worker``, here (torch imported, the client rebuilt, for every message).
``runtime = "edge"`` runs :mod:`mobile_client.flower_app` (numpy + onnxruntime), so an
edge node never imports torch even though it loads this module.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fmtl_lightning.deploy.worker_forward import forward_evaluate, forward_train, worker_socket
from mobile_client.flower_app import NodeSettings, edge_train, info_reply

app = ClientApp()
app.query("fmtl_info")(info_reply)


@app.train()
def train(msg: Message, context: Context) -> Message:
    s = NodeSettings.from_context(context)
    if s.runtime == "edge":
        return edge_train(msg, context)
    if (sock := worker_socket(context)) is not None:
        return forward_train(msg, context, sock)
    from fmtl_lightning.deploy.lightning_client import lightning_train

    return lightning_train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    s = NodeSettings.from_context(context)
    if s.runtime == "edge":
        from fmtl_lightning.deploy.edge_eval import edge_evaluate

        return edge_evaluate(msg, context)
    if (sock := worker_socket(context)) is not None:
        return forward_evaluate(msg, context, sock)
    from fmtl_lightning.deploy.lightning_client import lightning_evaluate

    return lightning_evaluate(msg, context)
