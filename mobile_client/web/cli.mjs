#!/usr/bin/env node
// The web edge client under Node.js (onnxruntime-web's WebAssembly build, one thread):
// the same module as the page, with `fmtl-edge train`'s files and options.
//
//   node mobile_client/web/cli.mjs train BUNDLE_DIR --data local.npz [--client C]
//       [--epochs E | --steps N] [--batch-size B] [--lr LR] [--seed S] [--head-only]
//       [--start-from global.safetensors] [--round R] [--out update.safetensors]
//   node mobile_client/web/cli.mjs predict BUNDLE_DIR --task T --data x.npz [--client C]
//
// `--data` is an .npz with `x` (uint8 pixels or float32, the bundle's input shape) and,
// for train, one `y__<task>` per task (int64 class ids or float32 0/1 rows; `/` in the
// task name written `__`). train writes the update and `<out>.local.safetensors` (the
// heads, kept on the device); predict prints the logits as JSON. Errors print one line
// `fmtl-edge-web: error: ...` and exit with status 2.

import { readFile, rename, writeFile } from "node:fs/promises";
import { resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";

import * as ort from "onnxruntime-web";
import { readNpz } from "./arrays.js";
import { EdgeError, InputError, openClient, parseSafetensors } from "./edge.js";

ort.env.wasm.numThreads = 1;
ort.env.logLevel = "error";

/** fetch() over local files (file:// URLs), for openClient. */
async function fileFetch(url) {
  try {
    const b = await readFile(new URL(url));
    const ab = b.buffer.slice(b.byteOffset, b.byteOffset + b.length);
    return { ok: true, status: 200, text: async () => b.toString("utf8"), arrayBuffer: async () => ab };
  } catch {
    return { ok: false, status: 404 };
  }
}

const headName = (task) => task.replaceAll("/", "__").replaceAll(".", "_");

async function readData(path, keys) {
  let bytes;
  try {
    bytes = await readFile(path);
  } catch (exc) {
    throw new InputError(`--data ${path}: ${exc.code === "ENOENT" ? "no such file" : exc.message}`);
  }
  return readNpz(bytes, keys, `--data ${path}`, InputError);
}

function targets(client, arrays, tasks) {
  const out = {};
  for (const t of tasks) {
    const a = arrays[`y__${headName(t)}`];
    const k = client.head(t).labels.length;
    if (client.head(t).kind === "multiclass") {
      if (a.dtype !== "int64") throw new InputError(`y__${headName(t)} has dtype ${a.dtype}; expected int64 class ids`);
      out[t] = Array.from(a.data, Number);
    } else {
      if (a.dtype !== "float32" || a.shape.length !== 2 || a.shape[1] !== k) {
        throw new InputError(`y__${headName(t)} is ${a.dtype}[${a.shape}]; expected float32 [n, ${k}]`);
      }
      out[t] = Array.from({ length: a.shape[0] }, (_, i) => Array.from(a.data.subarray(i * k, (i + 1) * k)));
    }
  }
  return out;
}

async function main(argv) {
  const [cmd, dir, ...rest] = argv;
  if (!["train", "predict"].includes(cmd) || !dir) throw new InputError("usage: cli.mjs train|predict BUNDLE_DIR --data FILE.npz [options]");
  const { values: o } = parseArgs({
    args: rest,
    options: {
      data: { type: "string" }, client: { type: "string" }, task: { type: "string" },
      epochs: { type: "string", default: "1" }, steps: { type: "string" }, "batch-size": { type: "string", default: "32" },
      lr: { type: "string", default: "0.05" }, seed: { type: "string", default: "0" }, "head-only": { type: "boolean", default: false },
      "start-from": { type: "string" }, round: { type: "string" }, out: { type: "string", default: "update.safetensors" },
    },
  });
  if (!o.data) throw new InputError("--data is required");
  await readData(o.data, []); // a missing or unreadable file fails before the bundle loads
  const client = await openClient(pathToFileURL(resolve(dir) + "/").href, { ort, clientId: o.client || null, fetchFn: fileFetch });
  const int = (name, min) => {
    const v = Number(o[name]);
    if (!Number.isInteger(v) || v < min) throw new InputError(`--${name} must be an integer >= ${min}, got ${o[name]}`);
    return v;
  };
  if (cmd === "predict") {
    const { x } = await readData(o.data, ["x"]);
    const logits = await client.predict(o.task || client.tasks[0], x);
    console.log(JSON.stringify({ task: o.task || client.tasks[0], shape: logits.shape, logits: Array.from(logits.data) }));
    return;
  }
  const tasks = o["head-only"] ? client.entry.tasks : Object.keys(client.plan.step ? client.plan.step.task_kinds : {});
  const arrays = await readData(o.data, ["x", ...tasks.map((t) => `y__${headName(t)}`)]);
  let startFrom = null;
  let round = client.manifest.round;
  if (o["start-from"]) {
    const parsed = parseSafetensors(await readFile(o["start-from"]), `--start-from ${o["start-from"]}`);
    startFrom = parsed.arrays;
    if (parsed.metadata.round !== undefined) round = Number(parsed.metadata.round);
  }
  if (o.round !== undefined) round = int("round", 0);
  const res = await client.train(arrays.x, targets(client, arrays, tasks), {
    epochs: int("epochs", 0), steps: o.steps === undefined ? null : int("steps", 0), batchSize: int("batch-size", 1),
    lr: Number(o.lr), seed: int("seed", 0), headOnly: o["head-only"], startFrom,
  });
  const local = o.out.replace(/\.safetensors$/, "") + ".local.safetensors";
  for (const [path, bytes] of [[o.out, client.updateFile(res, { round })], [local, client.localFile(res)]]) {
    await writeFile(`${path}.tmp`, bytes); // then renamed: a reader never sees half a file
    await rename(`${path}.tmp`, path);
  }
  console.log(`wrote ${o.out} (${Object.keys(res.shared).length} shared arrays, ${res.numExamples} examples, loss ${res.metrics.loss.toFixed(4)}) and ${local}`);
}

main(process.argv.slice(2)).catch((exc) => {
  if (!(exc instanceof EdgeError)) throw exc;
  console.error(`fmtl-edge-web: error: ${exc.message.split(/\s+/).join(" ")}`);
  process.exit(2);
});
