"""A Lightning node: one client of the run config, trained by the simulator's own code.

:class:`LightningNode` runs in the node-resident worker
(:mod:`fmtl_lightning.deploy.worker`, kept between rounds: the default) or, for a node
config without ``worker``, inside the ClientApp (:func:`lightning_train`,
:func:`lightning_evaluate`), which Flower starts afresh for every message, so there
nothing lives in memory between rounds. The node

1. builds its client from the YAML the server sent (a
   :class:`~fmtl_lightning.clients.ClientPool`, the in-process simulation's clients:
   same modules, same Fabric loop, same seeds) with the node's data: its shard of the YAML's dataset
   for its ``client-id`` (as ``fmtl simulate`` partitions it), or, when the node config
   names ``data``, its own ``.npz`` (``x``, ``y__<task>``, optional ``x_test``,
   ``y_test__<task>``; ``x`` float32 normalised ``(N, 1, H, W)``), without the dataset,
2. restores its local state (heads, FedBN norms, Ditto's personal model; full width)
   from ``state-dir/client.safetensors``,
3. runs ``ClientPool.train`` on the received shared arrays exactly as the in-process
   loop does (the same algorithm object, :mod:`fmtl_lightning.algorithms`),
4. writes its local state back atomically and returns the trained shared arrays.

Steps 1-2 happen once per message inside a ClientApp, once per run in a worker. Per
evaluate message (after aggregation, when evaluation is due) the same client scores
the aggregated model exactly as ``fmtl simulate`` scores a client
(:meth:`LightningNode.evaluate`, :mod:`fmtl_lightning.deploy.evaluation`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fmtl_lightning.config import parse_config
from fmtl_lightning.roles import WidthSpec
from fmtl_lightning.validation import validate_state
from mobile_client.flower_app import NodeConfigError, NodeSettings, TrainInstructions
from mobile_client.safetensors_np import load_file, save_file

STATE_FILE = "client.safetensors"


class LightningNode:
    """The node's client, rebuilt from the run config and its state dir."""

    def __init__(self, settings: NodeSettings, run_yaml: str) -> None:
        from fmtl_lightning.clients import ClientPool, federation_plan
        from fmtl_lightning.fed_data import build_federation

        if settings.state_dir is None:
            raise NodeConfigError("node config: 'state-dir' is required for a Lightning node")
        self.settings = settings
        self.state_dir = settings.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cfg = parse_config(yaml.safe_load(run_yaml))
        fed = own_federation(cfg, settings.client_id, settings.data) if settings.data else None
        fed = build_federation(cfg) if fed is None else fed
        ids = [c.cid for c in fed.clients]
        if settings.client_id not in ids:
            raise NodeConfigError(
                f"node config: client-id {settings.client_id!r} is not in the run config "
                f"(clients: {', '.join(ids)})"
            )
        plan = federation_plan(cfg, fed)
        self.pool = ClientPool(cfg, fed, plan, self.state_dir / "run" / "edge")
        self.idx = ids.index(settings.client_id)
        self.client = fed.clients[self.idx]
        self.client.edge = False  # this node trains with Lightning whatever the YAML says
        self.last_round = self._restore()

    # ------------------------------------------------------------------ state on disk
    def _restore(self) -> int:
        p = self.state_dir / STATE_FILE
        if not p.is_file():
            return 0
        arrays, meta = load_file(p)
        if meta.get("client_id") != self.settings.client_id:
            raise NodeConfigError(f"{p} belongs to client {meta.get('client_id')!r}, "
                                  f"not {self.settings.client_id!r}")  # fmt: skip
        st = self.pool.stores[self.settings.client_id]
        local = {k[6:]: v for k, v in arrays.items() if k.startswith("local/")}
        personal = {k[9:]: v for k, v in arrays.items() if k.startswith("personal/")}
        for name, want, got in (("local", st.local, local), ("personal", st.personal, personal)):
            if set(got) != set(want):
                raise NodeConfigError(f"{p}: {name} keys differ from this run's model")
            for k, v in got.items():
                if v.shape != want[k].shape:
                    raise NodeConfigError(f"{p}: {name}/{k} has shape {v.shape}, "
                                          f"expected {want[k].shape}")  # fmt: skip
        st.local, st.personal = local, personal
        return int(meta.get("round", "0"))

    def _save(self, round_no: int) -> None:
        st = self.pool.stores[self.settings.client_id]
        arrays = {f"local/{k}": v for k, v in st.local.items()}
        arrays.update({f"personal/{k}": v for k, v in st.personal.items()})
        save_file(arrays, self.state_dir / STATE_FILE,
                  {"client_id": self.settings.client_id, "round": str(round_no)})  # fmt: skip

    # ------------------------------------------------------------------ one round
    def train(
        self, received: dict[str, np.ndarray], ins: TrainInstructions
    ) -> tuple[dict[str, np.ndarray], int]:
        """The round's local fit from ``received``; keeps the new local state on disk and
        returns the trained shared arrays and the number of examples."""
        pool = self.pool
        ws = WidthSpec(ins.width, ins.slicing, ins.round_idx)  # type: ignore[arg-type]
        cid = self.settings.client_id
        validate_state(received, pool.spec, ws, pool.shared_keys, client=f"server->{cid}")
        res = pool.train(self.idx, ws, ins.round_idx, received)
        if res.shared is None:
            raise NodeConfigError(
                f"algorithm {pool.algorithm.name!r} shares nothing: nothing to send"
            )
        self._save(ins.round)
        return res.shared, res.num_examples

    def evaluate(self, received: dict[str, np.ndarray], ins: TrainInstructions) -> dict[str, float]:
        """Loss/accuracy per task on this client's own test split of the model the
        simulation evaluates after aggregation: ``received`` (the aggregated global shared
        state at the eval width) with this client's local arrays, or its personal model,
        as its algorithm evaluates a client (:meth:`ClientPool.evaluate`: after its
        fine-tune on a copy, seeded by the round). Static batch norm's statistics are
        first computed as the simulation's pass does (the evaluated model over this
        client's training data) and kept with the local state."""
        from fmtl_lightning.engine.metrics import flat_metrics

        pool, c = self.pool, self.client
        ws = WidthSpec(ins.width, ins.slicing, ins.round_idx)  # type: ignore[arg-type]
        cid = self.settings.client_id
        validate_state(received, pool.spec, ws, pool.shared_keys, client=f"server->{cid}")
        full = {k: v.copy() for k, v in pool.plan.initial_state.items()}
        pool.embed(full, received, ws)  # only the entries at ws are read
        if pool.spec.keys_of_kind("static_stat"):
            from fmtl_lightning.models import load_arrays
            from fmtl_lightning.static_bn import compute_static_stats

            m = pool.module_for(c, ws.width)
            load_arrays(m.model, pool.client_state(c, ws, full))
            stats = compute_static_stats(m.model, c.x_train)
            st = pool.stores[cid]
            pool.embed(st.personal if pool.algorithm.evaluates_personal else st.local, stats, ws)
            self._save(ins.round)
        if c.num_test == 0:
            return {}
        per = pool.evaluate(self.idx, pool.client_state(c, ws, full), ws.width, ins.round_idx)
        out = flat_metrics(per)
        out["test-loss"] = float(np.mean([vals["loss"] for vals in per.values()]))
        return out


def own_federation(cfg: Any, client_id: str, data: Path) -> Any:
    """The run's clients with only this node's data (from ``data``); the others are
    empty shells that fix the model (tasks, widths) and the client numbering."""
    import torch

    from fmtl_lightning.engine.plan import client_by_id, config_image_size, planned_clients
    from fmtl_lightning.fed_data import ClientData, Federation
    from fmtl_lightning.federation import ClientSpec
    from fmtl_lightning.tasks import get_task, task_domain
    from mobile_client.batching import label_key
    from mobile_client.inputs import client_labels, read_npz

    planned = planned_clients(cfg)
    me = client_by_id(planned, client_id)
    if me is None:
        ids = ", ".join(c.client_id for c in planned)
        raise NodeConfigError(f"node config: client-id {client_id!r} is not in the run config "
                              f"(clients: {ids})")  # fmt: skip
    size = config_image_size(cfg)  # the server's model takes these images
    if not data.is_file():
        raise NodeConfigError(f"node config 'data': {data} is not a file")
    arrays = read_npz(data, error=NodeConfigError)  # checked headers, never unpickles

    def xs(key: str) -> torch.Tensor:
        x = arrays.get(key, np.zeros((0, 1, size, size), np.float32))
        if x.dtype != np.float32 or x.shape[1:] != (1, size, size) or not np.isfinite(x).all():
            raise NodeConfigError(f"{data}: {key!r} must be finite float32 (N, 1, {size}, {size}) "
                                  f"normalised images, got {x.dtype}{list(x.shape)}")  # fmt: skip
        return torch.from_numpy(np.ascontiguousarray(x))

    def ys(test: bool, n: int, tasks: tuple[str, ...], need: bool) -> dict[str, torch.Tensor]:
        out = {}
        optional = not (need or n)  # no rows: a task's labels may be left out
        have = [t for t in tasks if not optional or label_key(t, test=test) in arrays]
        labels = client_labels(arrays, have, data, test=test, error=NodeConfigError)
        for t in tasks:
            kind = get_task(t).kind
            if t not in labels:  # an empty split of the right dtype
                y = np.zeros((0,) if kind == "multiclass" else (0, get_task(t).num_outputs))
                y = y.astype(np.int64 if kind == "multiclass" else np.float32)
            else:
                y = labels[t]
            if y.ndim == 0 or len(y) != n:
                key = label_key(t, test=test)
                raise NodeConfigError(f"{data}: {key!r} has {len(y)} rows, x has {n}")
            out[t] = torch.from_numpy(np.ascontiguousarray(y))
        return out

    clients = []
    for c in planned:
        mine = c.client_id == client_id
        x_tr = xs("x") if mine else torch.zeros(0, 1, size, size)
        x_te = xs("x_test") if mine else torch.zeros(0, 1, size, size)
        y_tr = ys(False, x_tr.shape[0], c.tasks, mine)
        y_te = ys(True, x_te.shape[0], c.tasks, False)
        held = {t: get_task(t).label_mask(y_tr[t].numpy()) for t in c.tasks}
        masks = {t: torch.from_numpy(m) for t, m in held.items() if m is not None}
        spec = ClientSpec(c.client_id, c.tasks, c.width, np.arange(x_tr.shape[0]),
                          np.arange(x_tr.shape[0], x_tr.shape[0] + x_te.shape[0]),
                          task_domain(c.tasks[0]))  # fmt: skip
        clients.append(ClientData(spec, c.lam, x_tr, y_tr, x_te, y_te, masks, c.edge))
    return Federation(clients, size, f"{len(clients)} clients (node {client_id}: own data)", {})


def lightning_train(msg: Any, context: Any) -> Any:
    """Train handler of a Lightning node inside the ClientApp (see the module docstring)."""
    from fmtl_lightning.deploy.worker_forward import prepare
    from mobile_client.flower_app import reply_message, write_status

    s, received, ins = prepare(msg, context, "training")
    shared, n = LightningNode(s, ins.run_config).train(received, ins)
    write_status(s.state_dir, round=ins.round, phase="done", client=s.client_id)
    return reply_message(msg, shared, n, {}, ins)


def lightning_evaluate(msg: Any, context: Any) -> Any:
    """Evaluate handler of a Lightning node inside the ClientApp: its score of the
    aggregated model."""
    from fmtl_lightning.deploy.worker_forward import finish_evaluate, prepare

    s, received, ins = prepare(msg, context, "evaluating")
    node = LightningNode(s, ins.run_config)
    metrics = node.evaluate(received, ins)
    return finish_evaluate(msg, s, ins, metrics, node.client.num_test)
