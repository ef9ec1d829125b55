// manifest.json of an exported bundle, read and checked as mobile_client.manifest reads it
// (format_version 1; the layout is documented there). Every wrong value raises a
// ManifestError naming the field by its dotted path (`widths[0].backbone.path`).

import { ManifestError } from "./errors.js";

export const SUPPORTED_VERSIONS = [1];
const NORM_BOUND = 1e6;
const MAX_DIM = 1 << 20;

const typeName = (v) => (v === null ? "null" : Array.isArray(v) ? "list" : typeof v);

function get(d, key, where, type, optional = false) {
  const name = where ? `${where}.${key}` : key;
  if (d === null || typeof d !== "object" || Array.isArray(d)) {
    throw new ManifestError(`manifest field '${where}' must be an object, got ${typeName(d)}`);
  }
  const v = d[key];
  if (v === undefined || v === null) {
    if (optional) return null;
    throw new ManifestError(`manifest field '${name}' is missing`);
  }
  const ok = {
    str: typeof v === "string",
    int: Number.isInteger(v),
    num: typeof v === "number" && Number.isFinite(v),
    list: Array.isArray(v),
    object: typeof v === "object" && !Array.isArray(v),
  }[type];
  if (!ok) throw new ManifestError(`manifest field '${name}' must be ${type}, got ${typeName(v)}`);
  return v;
}

function strMap(d, key, where) {
  const m = get(d, key, where, "object", true) || {};
  for (const [k, v] of Object.entries(m)) {
    if (typeof v !== "string") throw new ManifestError(`manifest field '${where}.${key}.${k}' must be str`);
  }
  return m;
}

function strList(d, key, where, optional = false) {
  const v = get(d, key, where, "list", optional) || [];
  v.forEach((s, i) => {
    if (typeof s !== "string") throw new ManifestError(`manifest field '${where}.${key}[${i}]' must be str`);
  });
  return v;
}

function width(d, key, where) {
  const w = get(d, key, where, "num");
  if (!(w > 0 && w <= 1)) throw new ManifestError(`manifest field '${where}.${key}' must be in (0, 1], got ${w}`);
  return w;
}

function tensors(d, key, where) {
  return (get(d, key, where, "list", true) || []).map((t, i) => {
    const at = `${where}.${key}[${i}]`;
    const shape = get(t, "shape", at, "list");
    shape.forEach((s, j) => {
      if (!(typeof s === "string" || Number.isInteger(s))) {
        throw new ManifestError(`manifest field '${at}.shape[${j}]' must be int or str`);
      }
    });
    return { name: get(t, "name", at, "str"), shape, dtype: get(t, "dtype", at, "str") };
  });
}

function fileEntry(d, where) {
  const path = get(d, "path", where, "str");
  if (path.startsWith("/") || path.includes("\\") || path.includes(":") || path.split("/").includes("..")) {
    throw new ManifestError(`manifest field '${where}.path': ${JSON.stringify(path)} must be relative to the manifest`);
  }
  const f = {
    where,
    path,
    sha256: get(d, "sha256", where, "str"),
    kind: get(d, "kind", where, "str"),
    inputs: tensors(d, "inputs", where),
    outputs: tensors(d, "outputs", where),
    weights: strMap(d, "weights", where),
    weight_outputs: strMap(d, "weight_outputs", where),
    target_inputs: strMap(d, "target_inputs", where),
    task_kinds: strMap(d, "task_kinds", where),
  };
  for (const k of ["lr_input", "loss_output", "x_input", "features_input"]) f[k] = get(d, k, where, "str", true);
  return f;
}

function normalisation(d, where) {
  const shape = get(d, "input_shape", where, "list");
  if (shape.length < 1 || shape.length > 4 || !shape.every((s) => Number.isInteger(s) && s > 0 && s <= MAX_DIM)) {
    throw new ManifestError(`manifest field '${where}.input_shape' must be 1 to 4 dims such as [C, H, W] or [F], got ${JSON.stringify(shape)}`);
  }
  const std = get(d, "std", where, "num");
  if (!(std >= 1 / NORM_BOUND && std <= NORM_BOUND)) throw new ManifestError(`manifest field '${where}.std' must be in [1e-06, 1e+06], got ${std}`);
  const scale = get(d, "scale", where, "num", true) || 1 / 255;
  if (!(scale > 0 && scale <= NORM_BOUND)) throw new ManifestError(`manifest field '${where}.scale' must be in (0, 1e+06], got ${scale}`);
  const mean = get(d, "mean", where, "num");
  if (!(Math.abs(mean) <= NORM_BOUND)) throw new ManifestError(`manifest field '${where}.mean' must be in [-1e+06, 1e+06], got ${mean}`);
  if (Math.max(Math.abs(mean), Math.abs(255 * scale - mean)) / std > NORM_BOUND) {
    throw new ManifestError(`manifest field '${where}': (pixels * scale - mean) / std exceeds 1e+06 for pixels in 0..255`);
  }
  return { mean, std, scale, input_shape: shape, domain: get(d, "domain", where, "str", true) || "" };
}

/** The manifest object `d` (parsed JSON), validated; throws ManifestError. */
export function parseManifest(d) {
  if (d === null || typeof d !== "object" || Array.isArray(d)) throw new ManifestError("manifest must be a JSON object");
  if (!("format_version" in d)) throw new ManifestError(`manifest field 'format_version' is missing (supported: ${SUPPORTED_VERSIONS})`);
  if (!SUPPORTED_VERSIONS.includes(d.format_version)) {
    throw new ManifestError(`manifest field 'format_version' has unsupported value ${JSON.stringify(d.format_version)} (supported: ${SUPPORTED_VERSIONS})`);
  }
  const m = {
    format_version: d.format_version,
    opset: get(d, "opset", "", "int"),
    normalisation: normalisation(get(d, "normalisation", "", "object"), "normalisation"),
    algorithm: get(d, "algorithm", "", "str", true) || "",
    round: get(d, "round", "", "int", true) || 0,
    widths: get(d, "widths", "", "list").map((w, i) => {
      const at = `widths[${i}]`;
      return {
        width: width(w, "width", at),
        feature_dim: get(w, "feature_dim", at, "int"),
        backbone: fileEntry(get(w, "backbone", at, "object"), `${at}.backbone`),
        train_steps: (get(w, "train_steps", at, "list", true) || []).map((t, j) => {
          const st = `${at}.train_steps[${j}]`;
          return { tasks: strList(t, "tasks", st), clients: strList(t, "clients", st), file: fileEntry(get(t, "file", st, "object"), `${st}.file`) };
        }),
      };
    }),
    heads: get(d, "heads", "", "list").map((h, i) => {
      const at = `heads[${i}]`;
      const kind = get(h, "kind", at, "str");
      if (kind !== "multiclass" && kind !== "multilabel") throw new ManifestError(`manifest field '${at}.kind' has unknown value '${kind}'`);
      const step = get(h, "head_step", at, "object", true);
      const cols = get(h, "columns", at, "list", true);
      if (cols && !(cols.length === 2 && cols.every(Number.isInteger) && cols[0] >= 0 && cols[0] < cols[1])) {
        throw new ManifestError(`manifest field '${at}.columns' must be [start, end], 0 <= start < end`);
      }
      return {
        client: get(h, "client", at, "str"), task: get(h, "task", at, "str"), kind,
        labels: strList(h, "labels", at), width: width(h, "width", at),
        file: fileEntry(get(h, "file", at, "object"), `${at}.file`),
        head_step: step ? fileEntry(step, `${at}.head_step`) : null, columns: cols,
      };
    }),
    clients: (get(d, "clients", "", "list", true) || []).map((c, i) => {
      const at = `clients[${i}]`;
      const bb = get(c, "backbone", at, "object", true);
      return {
        client: get(c, "client", at, "str"), width: width(c, "width", at), tasks: strList(c, "tasks", at),
        weights: fileEntry(get(c, "weights", at, "object"), `${at}.weights`),
        normalisation: normalisation(get(c, "normalisation", at, "object"), `${at}.normalisation`),
        backbone: bb ? fileEntry(bb, `${at}.backbone`) : null,
        shared_keys: strList(c, "shared_keys", at), where: at,
      };
    }),
  };
  if (m.widths.length === 0) throw new ManifestError("manifest field 'widths' names no width");
  return m;
}

/** The entries client `c` runs on, cross-checked (keys, heads, train step). */
export function clientPlan(m, c) {
  const keys = new Set(Object.values(c.weights.weights));
  const need = (names, field) => {
    for (const k of names) {
      if (!keys.has(k)) throw new ManifestError(`manifest field '${field}' names key '${k}', which is not in the client's weights '${c.weights.path}'`);
    }
  };
  if (keys.size === 0) throw new ManifestError(`manifest field '${c.where}.weights.weights' names no key`);
  need(c.shared_keys, `${c.where}.shared_keys`);
  const w = m.widths.find((x) => Math.abs(x.width - c.width) < 1e-9);
  if (!w) throw new ManifestError(`manifest field '${c.where}.width': ${c.width} is not in 'widths'`);
  const heads = {};
  m.heads.forEach((h, i) => {
    if (h.client !== c.client) return;
    const out = h.file.outputs[0] ? h.file.outputs[0].shape : [];
    const n = h.columns ? h.columns[1] - h.columns[0] : out[out.length - 1];
    if (!h.labels.length || (Number.isInteger(n) && h.labels.length !== n)) {
      throw new ManifestError(`manifest field 'heads[${i}].labels': ${h.labels.length} label(s) for a head with ${n} output(s)`);
    }
    for (const f of [h.file, h.head_step]) if (f) need(Object.values(f.weights), `${f.where}.weights`);
    heads[h.task] = h;
  });
  for (const t of c.tasks) if (!heads[t]) throw new ManifestError(`manifest field '${c.where}.tasks': task '${t}' has no head`);
  const step = w.train_steps.find((s) => s.clients.includes(c.client))
    || w.train_steps.find((s) => s.tasks.length === c.tasks.length && s.tasks.every((t) => c.tasks.includes(t)));
  if (step) {
    need(Object.values(step.file.weights), `${step.file.where}.weights`);
    need(Object.values(step.file.weight_outputs), `${step.file.where}.weight_outputs`);
    for (const t of Object.keys(step.file.task_kinds)) {
      if (!(t in step.file.target_inputs)) throw new ManifestError(`manifest field '${step.file.where}.target_inputs' has no entry '${t}'`);
    }
  }
  return { width: w, backbone: c.backbone || w.backbone, heads, step: step ? step.file : null };
}

/** Every graph input/output name `f` gives is one the loaded graph has. */
export function checkGraphNames(f, inputs, outputs) {
  const named = [
    ...Object.keys(f.weights).map((n) => ["input", `weights.${n}`, n]),
    ...["x_input", "features_input", "lr_input"].map((k) => ["input", k, f[k]]),
    ...Object.entries(f.target_inputs).map(([t, n]) => ["input", `target_inputs.${t}`, n]),
    ...Object.keys(f.weight_outputs).map((n) => ["output", `weight_outputs.${n}`, n]),
    ["output", "loss_output", f.loss_output],
  ];
  for (const [side, field, name] of named) {
    const have = side === "input" ? inputs : outputs;
    if (name && !have.includes(name)) {
      throw new ManifestError(`manifest field '${f.where}.${field}' names graph ${side} '${name}', which '${f.path}' does not have (${side}s: ${[...have].sort().join(", ") || "none"})`);
    }
  }
}
