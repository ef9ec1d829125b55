"""The ClientApp of a mixed federation: one FAB, each node picks its runtime.

``runtime = "lightning"`` (default) trains with the simulator's module and loop
(:mod:`fmtl_lightning.deploy.lightning_client`, imports torch only then);
``runtime = "edge"`` runs :mod:`mobile_client.flower_app` (numpy + onnxruntime), so an
edge node never imports torch even though it loads this module.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from mobile_client.flower_app import NodeSettings, edge_train, info_reply

app = ClientApp()
app.query("fmtl_info")(info_reply)


@app.train()
def train(msg: Message, context: Context) -> Message:
    s = NodeSettings.from_context(context)
    if s.runtime == "edge":
        return edge_train(msg, context)
    from fmtl_lightning.deploy.lightning_client import lightning_train

    return lightning_train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    s = NodeSettings.from_context(context)
    if s.runtime == "edge":
        from fmtl_lightning.deploy.edge_eval import edge_evaluate

        return edge_evaluate(msg, context)
    from fmtl_lightning.deploy.lightning_client import lightning_evaluate

    return lightning_evaluate(msg, context)
