"""An edge node's answer to an evaluate message (numpy + onnxruntime + flwr: no torch).

The simulation scores an edge client with the aggregated global shared arrays plus the
local arrays (heads) the device trained. The edge node does the same on its own test
split (``x_test``, ``y_test__<task>`` of its data file): the bundle's inference graphs
run with their baked initializers replaced by those weights
(:class:`mobile_client.edge_scoring.EdgeScorer`, onnxruntime's
``SessionOptions.add_initializer``). A node whose data has no test split, or whose
graphs cannot take other weights (a weight folded into a constant at export, a task
kind other than multiclass), answers with no score and the reason as its note.
"""

from __future__ import annotations

from flwr.app import Context, Message

from fmtl_lightning.deploy.evaluation import eval_reply
from mobile_client.batching import label_key
from mobile_client.errors import FMTLError
from mobile_client.flower_app import edge_message, write_status
from mobile_client.inputs import npz_keys, read_npz


def edge_evaluate(msg: Message, context: Context) -> Message:
    """Reply to an evaluate message: the node's test metrics of the weights sent (with
    its own heads), or no metrics and why."""
    from mobile_client.edge_scoring import EdgeScorer
    from mobile_client.runtime import EdgeClient

    s, received, ins = edge_message(msg, context, "evaluating")
    assert s.state_dir is not None and s.bundle is not None and s.data is not None
    tasks = s.tasks  # the node's tasks (the server checked them against the run config)
    keys = ["x_test", *(label_key(t, test=True) for t in tasks)]
    if not set(keys) <= set(npz_keys(s.data)):
        return eval_reply(msg, ins, {}, 0, f"edge node: its data file {s.data} has no test "
                          f"split ({', '.join(keys)})")  # fmt: skip
    arrays = read_npz(s.data, keys)
    n = int(arrays["x_test"].shape[0])
    if n == 0:
        return eval_reply(msg, ins, {}, 0, "the node's data has no test split")
    client = EdgeClient(s.bundle, s.client_id)
    local_file = s.state_dir / "local.safetensors"
    if local_file.is_file():  # the heads this device trained
        client.load_local(local_file)
    try:
        state = client.start_state(received)
        metrics = EdgeScorer(client).score(
            state, arrays["x_test"], {t: arrays[label_key(t, test=True)] for t in tasks}
        )
    except FMTLError as exc:
        return eval_reply(msg, ins, {}, 0, f"edge node cannot score: {exc}")
    write_status(s.state_dir, round=ins.round, phase="evaluated", client=s.client_id)
    return eval_reply(msg, ins, metrics, n)
