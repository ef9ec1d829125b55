"""Score an edge client's model with weights other than those baked into its bundle.

A bundle's inference graphs (``backbone_w*.onnx``, ``head_*.onnx``) carry the weights
they were exported with as initializers. After a federated round the device holds
other weights: the aggregated shared arrays plus the heads it trained. This module
runs the same graphs with those weights, through onnxruntime's documented
``SessionOptions.add_initializer(name, OrtValue)``, which replaces an initializer of
the graph when the session is created:

* which initializer carries which state key is established per graph from the file
  itself (:func:`~mobile_client.onnx_initializers.read_initializers`): an initializer
  maps to the state key whose name ends with the initializer's name (``layers.1.weight``
  -> ``backbone.layers.1.weight``) and whose exported value (the bundle's
  ``weights_<cid>.npz``) it equals bit for bit; a head graph's candidates are the keys
  its head step trains (the manifest's map), so two heads' equal-valued biases cannot be
  confused;
* every float key of the client's weights must be carried by exactly one initializer
  of the backbone or of a head graph; a key the exporter folded into a constant (e.g.
  an affine merged into another op) is refused with :class:`ManifestError` naming it:
  those graphs cannot be scored with new weights;
* the sessions run with graph optimisations off (``ORT_DISABLE_ALL``): DESIGN.md records
  wrong conv outputs with replaced initializers under ``ORT_ENABLE_ALL``, and the
  replacement arrays are kept referenced for the session's life (onnxruntime does not
  copy them).

:func:`score` gives what the simulation reports for a client's test split (per
multiclass task ``acc/<task>`` and ``loss/<task>``, the mean cross-entropy, and
``test-loss``, the mean over tasks). numpy + onnxruntime only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mobile_client.edge_arrays import check_finite, read_weights
from mobile_client.errors import InputError, ManifestError
from mobile_client.manifest_entries import FileEntry
from mobile_client.onnx_initializers import read_initializers
from mobile_client.sessions import ort_errors


def _map_graph(
    root: Any, f: FileEntry, exported: Mapping[str, np.ndarray], candidates: set[str]
) -> dict[str, str]:
    """initializer name -> state key for graph ``f`` (see the module docstring)."""
    out: dict[str, str] = {}
    for name, arr in read_initializers(root / f.path).items():
        hits = [
            k
            for k in sorted(candidates)
            if (k == name or k.endswith("." + name))
            and exported[k].shape == arr.shape
            and np.array_equal(exported[k], arr)
        ]
        if len(hits) > 1:
            raise ManifestError(f"file {f.path!r}: initializer {name!r} matches the state keys "
                                f"{hits}; cannot tell which it carries")  # fmt: skip
        if hits:
            out[name] = hits[0]
    return out


class EdgeScorer:
    """The inference graphs of ``client`` (an :class:`~mobile_client.runtime.EdgeClient`)
    with their initializers mapped to its state keys; :meth:`score` runs them with
    given weights."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.exported = read_weights(client.dir, client.entry.weights)
        floats = {k for k, v in self.exported.items() if v.dtype.kind == "f"}
        heads = {t: client.head(t) for t in client.entry.tasks}
        self.backbone = client.backbone_file()
        self.maps: dict[str, dict[str, str]] = {}
        bb = _map_graph(client.dir, self.backbone, self.exported, floats)
        self.maps[self.backbone.path] = bb
        claimed = set(bb.values())
        for h in heads.values():
            if h.file.path in self.maps:  # a union head shared by the tasks
                continue
            cands = floats - claimed
            if h.head_step is not None:
                cands &= set(h.head_step.weights.values())
            m = _map_graph(client.dir, h.file, self.exported, cands)
            self.maps[h.file.path] = m
            claimed |= set(m.values())
        missing = sorted(floats - claimed)
        if missing:
            raise ManifestError(
                f"client {client.client_id!r}: no initializer of its inference graphs carries "
                f"the state key(s) {missing} (folded into constants at export): these graphs "
                "cannot be scored with other weights"
            )
        self.heads = heads

    def _session(self, f: FileEntry, state: Mapping[str, np.ndarray]) -> tuple[Any, list[Any]]:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.intra_op_num_threads = 1
        keep = []
        for name, key in self.maps[f.path].items():
            arr = np.ascontiguousarray(state[key], dtype=np.float32)
            val = ort.OrtValue.ortvalue_from_numpy(arr)
            keep += [arr, val]
            opts.add_initializer(name, val)
        try:
            sess = ort.InferenceSession(
                str(self.client.dir / f.path), opts, providers=["CPUExecutionProvider"]
            )
        except ort_errors() as exc:
            raise ManifestError(f"file {f.path!r}: cannot run with new weights: {exc}") from exc
        return sess, keep

    def logits(self, state: Mapping[str, np.ndarray], x: Any) -> dict[str, np.ndarray]:
        """Per task, the logits ``(B, n_labels)`` of ``x`` under the weights ``state``
        (every state key of the client, at its width: e.g. ``EdgeClient.start_state``)."""
        for key, v in self.exported.items():
            if v.dtype.kind == "f" and (key not in state or np.shape(state[key]) != v.shape):
                raise InputError(f"weights: key {key!r} is missing or not of shape {v.shape}")
        xs = self.client.prepare_x(x)
        sess, keep = self._session(self.backbone, state)
        xin = self.backbone.x_input or sess.get_inputs()[0].name
        feats = check_finite("features", sess.run(None, {xin: xs})[0])
        out: dict[str, np.ndarray] = {}
        runs: dict[str, np.ndarray] = {}
        for t, h in self.heads.items():
            if h.file.path not in runs:
                hs, hkeep = self._session(h.file, state)
                fin = h.file.features_input or hs.get_inputs()[0].name
                runs[h.file.path] = check_finite("logits", hs.run(None, {fin: feats})[0])
                del hs, hkeep
            lg = runs[h.file.path]
            if h.columns is not None:
                lg = lg[:, h.columns[0] : h.columns[1]]
            out[t] = lg
        del sess, keep
        return out

    def score(
        self, state: Mapping[str, np.ndarray], x: Any, targets: Mapping[str, np.ndarray]
    ) -> dict[str, float]:
        """``acc/<task>``, ``loss/<task>`` and ``test-loss`` of the weights ``state`` on
        ``x`` and the integer labels ``targets`` (one array per task of the client)."""
        metrics: dict[str, float] = {}
        logits = self.logits(state, x)
        for t, lg in logits.items():
            h = self.heads[t]
            if h.kind != "multiclass":
                raise InputError(f"task {t!r} is {h.kind}: the edge node scores multiclass "
                                 "tasks only")  # fmt: skip
            if t not in targets:
                raise InputError(f"no test labels for task {t!r}")
            y = np.asarray(targets[t]).astype(np.int64).reshape(-1)
            if y.shape[0] != lg.shape[0] or (y.size and not 0 <= y.min() <= y.max() < lg.shape[1]):
                raise InputError(f"task {t!r}: {y.shape[0]} labels in [0, {lg.shape[1]}) "
                                 f"expected for {lg.shape[0]} examples")  # fmt: skip
            z = lg.astype(np.float64)
            z = z - z.max(axis=1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            metrics[f"acc/{t}"] = float(np.mean(np.argmax(lg, axis=1) == y))
            metrics[f"loss/{t}"] = float(-np.mean(logp[np.arange(y.size), y]))
        metrics["test-loss"] = float(np.mean([metrics[f"loss/{t}"] for t in logits]))
        return metrics
