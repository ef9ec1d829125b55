// The fmtl-lightning edge client in JavaScript: mobile_client.runtime.EdgeClient on
// ONNX Runtime Web (WebAssembly) or any ONNX Runtime JS binding with the same API.
//
// openClient() reads a bundle's manifest.json over fetch, checks each file it loads
// against the manifest's sha256, and returns an EdgeClient that predicts (backbone then
// head graph) and trains (the exported SGD step graphs over mobile_client.batching's
// batch order, bit for bit), and writes the same update file as the Python client: a
// safetensors file of the shared arrays with the metadata of mobile_client.update
// (format, format_version, client_id, round, width, num_examples, base_hash, metrics).
// The ONNX Runtime module is passed in (`ort`), so the same code runs in a page and
// under Node.js.

import {
  numel, parseSafetensors, pyFloatRepr, pyJsonFloats, readNpz, serializeSafetensors, sha256Hex,
  stateHash,
} from "./arrays.js";
import { EdgeError, InputError, ManifestError, UpdateError } from "./errors.js";
import { checkGraphNames, clientPlan, parseManifest } from "./manifest.js";
import { batchOrder, numBatches } from "./rng.js";

export { EdgeError, InputError, ManifestError, UpdateError, parseSafetensors, stateHash };
export const UPDATE_FORMAT = "fmtl-update";
export const UPDATE_VERSION = 1;
const F32_MAX_ABS = Math.sqrt(3.4028234663852886e38); // sqrt(finfo(float32).max)

const copyArray = (a) => ({ dtype: a.dtype, shape: [...a.shape], data: a.data.slice() });
const describe = (a) => `${a.dtype}[${a.shape.join(", ")}]`;

/** Fetch and check the bundle at `baseUrl` (a directory URL or manifest.json URL) and
 * return the EdgeClient of `clientId` (default: the bundle's only client). */
export async function openClient(baseUrl, { ort, clientId = null, fetchFn = globalThis.fetch, providers = ["wasm"] } = {}) {
  if (!ort) throw new EdgeError("openClient needs the onnxruntime module as { ort }");
  const base = new URL(baseUrl, globalThis.location ? globalThis.location.href : undefined);
  const manifestUrl = base.pathname.endsWith(".json") ? base : new URL("manifest.json", base);
  let resp;
  try {
    resp = await fetchFn(manifestUrl.href);
  } catch (exc) {
    throw new ManifestError(`no manifest at ${manifestUrl.href}: ${exc.message}`);
  }
  if (!resp.ok) throw new ManifestError(`no manifest at ${manifestUrl.href} (HTTP ${resp.status})`);
  let raw;
  try {
    raw = JSON.parse(await resp.text());
  } catch (exc) {
    throw new ManifestError(`${manifestUrl.href}: not valid JSON: ${exc.message}`);
  }
  const manifest = parseManifest(raw);
  const ids = manifest.clients.map((c) => c.client);
  if (clientId === null || clientId === undefined || clientId === "") {
    if (ids.length !== 1) throw new ManifestError(`the bundle has ${ids.length} clients (${ids.join(", ")}); name one`);
    clientId = ids[0];
  }
  const entry = manifest.clients.find((c) => c.client === clientId);
  if (!entry) throw new ManifestError(`client '${clientId}' not in the manifest; clients: ${ids.join(", ")}`);
  const client = new EdgeClient({ ort, manifest, entry, base: manifestUrl, fetchFn: (u) => fetchFn(u), providers });
  client.weights = await client.readWeights();
  return client;
}

export class EdgeClient {
  constructor({ ort, manifest, entry, base, fetchFn, providers }) {
    Object.assign(this, { ort, manifest, entry, base, fetchFn, providers });
    this.clientId = entry.client;
    this.plan = clientPlan(manifest, entry);
    this.sessions = new Map();
    this.weights = null;
  }

  get tasks() {
    return Object.keys(this.plan.heads);
  }

  get sharedKeys() {
    return this.entry.shared_keys;
  }

  head(task) {
    const h = this.plan.heads[task];
    if (!h) throw new InputError(`task '${task}' has no head for client '${this.clientId}'; tasks: ${this.tasks.join(", ")}`);
    return h;
  }

  /** The bytes of file entry `f`, checked against its sha256. */
  async fetchFile(f) {
    const url = new URL(f.path, this.base).href;
    let resp;
    try {
      resp = await this.fetchFn(url);
    } catch (exc) {
      throw new ManifestError(`file '${f.path}' named in the manifest cannot be fetched (${url}): ${exc.message}`);
    }
    if (!resp.ok) throw new ManifestError(`file '${f.path}' named in the manifest is missing (${url}: HTTP ${resp.status})`);
    const bytes = new Uint8Array(await resp.arrayBuffer());
    const got = await sha256Hex(bytes);
    if (got !== f.sha256) throw new ManifestError(`file '${f.path}': sha256 ${got} does not match the manifest's ${f.sha256}`);
    return bytes;
  }

  /** The client's weights file: every key its entry maps, with the declared dtype/shape. */
  async readWeights() {
    const f = this.entry.weights;
    const keys = [...new Set(Object.values(f.weights))];
    const arrays = await readNpz(await this.fetchFile(f), keys, `file '${f.path}'`);
    const specs = Object.fromEntries(f.outputs.map((t) => [t.name, t]));
    for (const [k, a] of Object.entries(arrays)) {
      const t = specs[k];
      if (t && (t.dtype !== a.dtype || t.shape.join() !== a.shape.join())) {
        throw new ManifestError(`file '${f.path}': key '${k}' is ${describe(a)}, the manifest says ${t.dtype}[${t.shape.join(", ")}]`);
      }
      if (a.dtype === "float32" && !a.data.every(Number.isFinite)) throw new ManifestError(`file '${f.path}': key '${k}' has NaN/Inf`);
    }
    return arrays;
  }

  /** The ONNX Runtime session of graph `f` (opened once, names checked). */
  async session(f) {
    if (!this.sessions.has(f.path)) {
      const bytes = await this.fetchFile(f);
      let s;
      try {
        s = await this.ort.InferenceSession.create(bytes, { executionProviders: this.providers, logSeverityLevel: 3 });
      } catch (exc) {
        throw new ManifestError(`file '${f.path}': not a loadable ONNX model: ${exc.message || exc}`);
      }
      checkGraphNames(f, s.inputNames, s.outputNames);
      this.sessions.set(f.path, s);
    }
    return this.sessions.get(f.path);
  }

  tensor(a) {
    return new this.ort.Tensor(a.dtype, a.data, a.shape);
  }

  /** Outputs of graph `f` on `feeds` ({name: array}), as arrays by output name. */
  async run(f, feeds) {
    const s = await this.session(f);
    const t = {};
    for (const [k, a] of Object.entries(feeds)) t[k] = this.tensor(a);
    let res;
    try {
      res = await s.run(t);
    } catch (exc) {
      throw new ManifestError(`file '${f.path}': the graph does not run: ${exc.message || exc}`);
    }
    const out = {};
    for (const [k, v] of Object.entries(res)) out[k] = { dtype: v.type, shape: [...v.dims], data: v.data };
    return out;
  }

  // ---------------------------------------------------------------- inputs
  /** A batch `{dtype: "uint8" | "float32", shape: [B, ...input_shape], data}` normalised
   * to float32 as mobile_client.edge_arrays.prepare_x does (grayscale [B, H, W] too). */
  prepareX(x) {
    const norm = this.entry.normalisation;
    const want = norm.input_shape;
    let shape = [...x.shape];
    const gray = want.length === 3 && want[0] === 1;
    if (gray && shape.length === 3) shape = [shape[0], 1, shape[1], shape[2]];
    if (shape.length !== want.length + 1 || shape.slice(1).join() !== want.join() || !(shape[0] >= 1)) {
      throw new InputError(`x has shape [${x.shape.join(", ")}]; expected [B, ${want.join(", ")}]${gray ? ` or [B, ${want[1]}, ${want[2]}]` : ""} with B >= 1`);
    }
    if (x.data.length !== numel(shape)) throw new InputError(`x holds ${x.data.length} values for shape [${shape.join(", ")}]`);
    let data;
    if (x.dtype === "uint8") {
      const s = Math.fround(norm.scale), m = Math.fround(norm.mean), d = Math.fround(norm.std);
      data = new Float32Array(x.data.length);
      for (let i = 0; i < data.length; i++) data[i] = Math.fround(Math.fround(x.data[i] * s) - m) / d;
    } else if (x.dtype === "float32") {
      data = Float32Array.from(x.data);
      const bad = data.findIndex((v) => !Number.isFinite(v));
      if (bad >= 0) throw new InputError(`x has NaN/Inf values (first at flat index ${bad})`);
    } else {
      throw new InputError(`x has dtype ${x.dtype}; expected float32 (normalised) or uint8 (pixels)`);
    }
    return { dtype: "float32", shape, data };
  }

  /** Targets of `tasks` for `n` examples: class ids (multiclass) or 0/1 rows (multilabel). */
  prepareTargets(targets, tasks, n) {
    const missing = tasks.filter((t) => !(t in targets));
    if (missing.length) throw new InputError(`targets missing for tasks ${missing.join(", ")}; given ${Object.keys(targets).join(", ")}`);
    const extra = Object.keys(targets).filter((t) => !tasks.includes(t));
    if (extra.length) throw new InputError(`targets for unknown tasks ${extra.join(", ")}; tasks: ${tasks.join(", ")}`);
    const out = {};
    for (const t of tasks) {
      const h = this.head(t);
      const k = h.labels.length;
      const y = targets[t];
      if (!Array.isArray(y) || y.length !== n) throw new InputError(`targets['${t}'] has ${Array.isArray(y) ? y.length : 0} rows; expected ${n}`);
      if (h.kind === "multiclass") {
        y.forEach((v, i) => {
          if (!Number.isInteger(v) || v < 0 || v >= k) throw new InputError(`targets['${t}'][${i}] is ${JSON.stringify(v)}; expected a class id in [0, ${k - 1}]`);
        });
        out[t] = { dtype: "int64", shape: [n], data: BigInt64Array.from(y, BigInt) };
      } else {
        y.forEach((row, i) => {
          if (!Array.isArray(row) || row.length !== k || !row.every((v) => v === 0 || v === 1)) {
            throw new InputError(`targets['${t}'][${i}] must be ${k} values of 0/1 (labels: ${h.labels.join(", ")})`);
          }
        });
        out[t] = { dtype: "float32", shape: [n, k], data: Float32Array.from(y.flat()) };
      }
    }
    return out;
  }

  // ---------------------------------------------------------------- inference
  async features(xs) {
    const f = this.plan.backbone;
    const xin = f.x_input || (f.inputs[0] ? f.inputs[0].name : "x");
    const out = await this.run(f, { [xin]: xs });
    const feats = out[(await this.session(f)).outputNames[0]];
    if (!feats.data.every(Number.isFinite)) throw new InputError("features have NaN/Inf values: the input is outside the range the model can compute on");
    return feats;
  }

  /** Logits {shape: [B, labels], data} of `task` for a batch `x` (see prepareX). */
  async predict(task, x) {
    const h = this.head(task);
    const feats = await this.features(this.prepareX(x));
    const fin = h.file.features_input || h.file.inputs[0].name;
    const out = await this.run(h.file, { [fin]: feats });
    let logits = out[(await this.session(h.file)).outputNames[0]];
    if (h.columns) logits = sliceColumns(logits, h.columns[0], h.columns[1]);
    if (logits.shape.length !== 2 || logits.shape[1] !== h.labels.length) {
      throw new ManifestError(`file '${h.file.path}': logits of shape [${logits.shape}], expected [B, ${h.labels.length}] (one per label)`);
    }
    if (!logits.data.every(Number.isFinite)) throw new InputError("logits have NaN/Inf values");
    return logits;
  }

  // ---------------------------------------------------------------- state
  /** The bundle's weights overlaid with `startFrom` (the server's shared arrays), which
   * must hold every shared key, each with its shape and dtype, finite and bounded. */
  startState(startFrom = null) {
    const state = Object.fromEntries(Object.entries(this.weights).map(([k, a]) => [k, copyArray(a)]));
    if (!startFrom) return state;
    for (const [k, a] of Object.entries(startFrom)) {
      if (!(k in state)) throw new InputError(`start_from: key '${k}' is not in the client's state`);
      if (a.dtype !== state[k].dtype || a.shape.join() !== state[k].shape.join()) {
        throw new InputError(`start_from: key '${k}' expected ${describe(state[k])}, got ${describe(a)}`);
      }
      if (a.dtype === "float32" && !a.data.every((v) => Number.isFinite(v) && Math.abs(v) <= F32_MAX_ABS)) {
        throw new InputError(`start_from: key '${k}' has NaN/Inf or values past sqrt(finfo.max)`);
      }
      state[k] = copyArray(a);
    }
    const missing = this.sharedKeys.filter((k) => !(k in startFrom));
    if (missing.length) throw new InputError(`start_from lacks ${missing.length} shared key(s) ${missing.slice(0, 3).join(", ")}: training would silently start those from the bundle's weights`);
    return state;
  }

  // ---------------------------------------------------------------- training
  /** SGD on the exported step graphs over batchOrder(n, batchSize, epochs, steps, seed),
   * as EdgeClient.train; returns {state, shared, numExamples, metrics, baseHash}. */
  async train(x, targets, { batchSize = 32, epochs = 1, steps = null, lr = 0.05, seed = 0, headOnly = false, startFrom = null, onStep = null } = {}) {
    const xs = this.prepareX(x);
    const n = xs.shape[0];
    if (!(lr > 0 && Number.isFinite(lr))) throw new InputError(`lr must be a finite number > 0, got ${lr}`);
    if (!(batchSize > 0) || epochs < 0 || (steps !== null && steps < 0) || seed < 0) {
      throw new InputError(`batch_size must be > 0 and epochs/steps/seed >= 0, got ${batchSize}/${epochs}/${steps}/${seed}`);
    }
    if (numBatches(n, batchSize, epochs, steps) === 0) throw new InputError(`epochs=${epochs}, steps=${steps} give no training step: nothing to train`);
    const state = this.startState(startFrom);
    const shared = this.sharedKeys;
    const baseHash = await stateHash(Object.fromEntries(shared.map((k) => [k, state[k]])));
    const lrArr = { dtype: "float32", shape: [], data: Float32Array.of(lr) };
    const losses = [];
    const batches = batchOrder(n, batchSize, epochs, steps, seed);
    if (headOnly) {
      const heads = this.entry.tasks.map((t) => this.head(t));
      for (const h of heads) if (!h.head_step) throw new ManifestError(`head ${h.client}/${h.task} has no head_step graph`);
      const stepped = new Set(heads.flatMap((h) => Object.values(h.head_step.weights)));
      for (const [k, a] of Object.entries(startFrom || {})) {
        if (!stepped.has(k) && !a.data.every((v, i) => v === this.weights[k].data[i])) {
          throw new InputError("head-only training computes features with the bundle's backbone graph (weights inside the graph); start_from holds a different backbone: train the full model or export a bundle from that backbone");
        }
      }
      const ys = this.prepareTargets(targets, heads.map((h) => h.task), n);
      const feats = await this.features(xs);
      for (const idx of batches) {
        let total = 0;
        for (const h of heads) {
          const s = h.head_step;
          const feed = {};
          for (const [name, key] of Object.entries(s.weights)) feed[name] = state[key];
          feed[s.features_input || "features"] = gatherRows(feats, idx);
          feed[s.target_inputs.task] = gatherRows(ys[h.task], idx);
          feed[s.lr_input || "lr"] = lrArr;
          const res = await this.run(s, feed);
          storeOutputs(state, s, res);
          total += res[s.loss_output || "loss"].data[0];
        }
        losses.push(total);
        if (onStep) onStep(losses.length, batches.length, total);
      }
    } else {
      const step = this.plan.step;
      if (!step) throw new ManifestError(`width ${this.entry.width}: no train_step for client '${this.clientId}'`);
      const ys = this.prepareTargets(targets, Object.keys(step.task_kinds), n);
      for (const idx of batches) {
        const feed = {};
        for (const [name, key] of Object.entries(step.weights)) feed[name] = state[key];
        feed[step.x_input || "x"] = gatherRows(xs, idx);
        for (const [t, y] of Object.entries(ys)) feed[step.target_inputs[t]] = gatherRows(y, idx);
        feed[step.lr_input || "lr"] = lrArr;
        const res = await this.run(step, feed);
        storeOutputs(state, step, res);
        const loss = res[step.loss_output || "loss"].data[0];
        losses.push(loss);
        if (onStep) onStep(losses.length, batches.length, loss);
      }
    }
    for (const [k, a] of Object.entries(state)) {
      if (a.dtype === "float32" && !a.data.every(Number.isFinite)) throw new InputError(`training diverged: key '${k}' has NaN/Inf (lower lr=${lr})`);
    }
    const metrics = { steps: losses.length };
    if (losses.length) Object.assign(metrics, { loss: losses.reduce((a, b) => a + b, 0) / losses.length, last_loss: losses[losses.length - 1] });
    return { state, shared: Object.fromEntries(shared.map((k) => [k, state[k]])), numExamples: n, metrics, baseHash };
  }

  /** The update file (bytes) of a train() result, as mobile_client.update.write_update
   * writes it; `round` defaults to the manifest's. */
  updateFile(result, { round = this.manifest.round } = {}) {
    const meta = {
      format: UPDATE_FORMAT, format_version: String(UPDATE_VERSION), client_id: this.clientId,
      round: String(round), width: pyFloatRepr(this.entry.width), num_examples: String(result.numExamples),
      base_hash: result.baseHash, metrics: pyJsonFloats(result.metrics),
    };
    if (!Number.isInteger(round) || round < 0) throw new UpdateError(`metadata field 'round' must be an integer >= 0, got ${round}`);
    if (!(result.numExamples > 0)) throw new UpdateError(`metadata field 'num_examples' must be > 0, got ${result.numExamples}`);
    for (const [k, v] of Object.entries(result.metrics)) if (!Number.isFinite(v)) throw new UpdateError(`metadata field 'metrics.${k}' is not finite: ${v}`);
    for (const [k, a] of Object.entries(result.shared)) {
      if (a.dtype !== "float32" && a.dtype !== "int64") throw new UpdateError(`key '${k}' has dtype ${a.dtype}; expected float32 or int64`);
      if (a.dtype === "float32" && !a.data.every(Number.isFinite)) throw new UpdateError(`key '${k}' has NaN/Inf`);
    }
    return serializeSafetensors(result.shared, meta);
  }

  /** The non-shared arrays (heads, local norms) of a train() result: they stay on the
   * device (EdgeClient.save_local's file). */
  localFile(result) {
    const shared = new Set(this.sharedKeys);
    const local = Object.fromEntries(Object.entries(result.state).filter(([k]) => !shared.has(k)));
    return serializeSafetensors(local, { client_id: this.clientId, kind: "local" });
  }
}

function gatherRows(a, idx) {
  const row = numel(a.shape.slice(1));
  const data = new a.data.constructor(idx.length * row);
  idx.forEach((r, i) => data.set(a.data.subarray(r * row, (r + 1) * row), i * row));
  return { dtype: a.dtype, shape: [idx.length, ...a.shape.slice(1)], data };
}

function sliceColumns(a, start, end) {
  const [b, k] = a.shape;
  const data = new Float32Array(b * (end - start));
  for (let i = 0; i < b; i++) data.set(a.data.subarray(i * k + start, i * k + end), i * (end - start));
  return { dtype: a.dtype, shape: [b, end - start], data };
}

function storeOutputs(state, f, res) {
  for (const [name, key] of Object.entries(f.weight_outputs)) {
    const v = res[name];
    const old = state[key];
    if (!v || v.dtype !== old.dtype || v.shape.join() !== old.shape.join()) {
      throw new ManifestError(`${f.path}: output '${name}' for key '${key}' is ${v ? describe(v) : "missing"}, the state holds ${describe(old)}`);
    }
    state[key] = v;
  }
}
