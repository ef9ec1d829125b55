// The page of index.html: loads a bundle, reads images (and their labels), trains with
// edge.js on ONNX Runtime Web (WebAssembly, one thread) and offers the update file to
// download or POST. Every failure is shown in #error (never only in the console).
//
// URL parameters: ?bundle=URL (default bundle/), &client=ID, &data=URL of a data.json
// ({"images": [{"file": "a.png", "labels": {task: class id | label | [0/1, ...]}}]},
// files relative to it), &start=URL of the server's shared arrays (a safetensors file,
// e.g. global.safetensors) to start training from. window.fmtlPage exposes the state.

import * as ort from "onnxruntime-web";
import { EdgeError, InputError, openClient, parseSafetensors } from "./edge.js";

ort.env.wasm.numThreads = 1;
ort.env.wasm.wasmPaths = new URL("./ort/", import.meta.url).href;

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const page = { client: null, examples: [], result: null, update: null, startFrom: null, round: null, busy: false };
window.fmtlPage = page;

function showError(exc) {
  const msg = exc instanceof EdgeError ? exc.message : `${exc.name || "Error"}: ${exc.message || exc}`;
  $("error").textContent = msg;
  $("status").textContent = "";
  page.error = msg;
}

function status(msg) {
  $("status").textContent = msg;
}

async function guarded(fn) {
  $("error").textContent = "";
  page.error = null;
  page.busy = true;
  try {
    await fn();
  } catch (exc) {
    showError(exc);
  } finally {
    page.busy = false;
    refreshButtons();
  }
}

function refreshButtons() {
  $("train").disabled = !page.client || page.examples.length === 0;
  $("predict").disabled = $("train").disabled;
  $("post").disabled = !page.update;
}

// ------------------------------------------------------------------ bundle
async function loadBundle() {
  page.client = null;
  page.result = page.update = null;
  for (const id of ["download-update", "download-local"]) $(id).hidden = true;
  status("loading the bundle...");
  const c = await openClient(new URL($("bundle-url").value, location.href).href, { ort, clientId: $("client").value || null });
  page.client = c;
  const sel = $("client");
  sel.replaceChildren(...c.manifest.clients.map((e) => new Option(e.client, e.client, false, e.client === c.clientId)));
  $("bundle-info").textContent = `client ${c.clientId}, width ${c.entry.width}, tasks ${c.tasks.join(", ")}, `
    + `input ${c.entry.normalisation.input_shape.join("x")}, round ${c.manifest.round}`;
  if (params.get("start")) {
    const url = new URL(params.get("start"), location.href).href;
    const resp = await fetch(url);
    if (!resp.ok) throw new InputError(`start-from file ${url}: HTTP ${resp.status}`);
    const { arrays, metadata } = parseSafetensors(await resp.arrayBuffer(), `start-from file ${url}`);
    c.startState(arrays); // checked now, not at the first step
    page.startFrom = arrays;
    page.round = metadata.round !== undefined ? Number(metadata.round) : null;
    if (page.round !== null && !(Number.isInteger(page.round) && page.round >= 0)) {
      throw new InputError(`start-from file ${url}: metadata 'round' is ${JSON.stringify(metadata.round)}`);
    }
  }
  renderExamples();
  status(`loaded ${c.clientId}: ${c.tasks.length} task(s)`);
}

// ------------------------------------------------------------------ images
/** Pixels of an image file as the model's input [C, H, W] (uint8); grayscale models take
 * Pillow's luma of a colour image (L = (19595 R + 38470 G + 7471 B + 32768) >> 16). */
async function readImage(blob, name) {
  const c = page.client;
  const shape = c.entry.normalisation.input_shape;
  if (shape.length !== 3 || ![1, 3].includes(shape[0])) {
    throw new InputError(`this bundle's input is [${shape.join(", ")}], not an image [C, H, W]`);
  }
  const [ch, h, w] = shape;
  let bmp;
  try {
    bmp = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  } catch (exc) {
    throw new InputError(`image ${name}: not a decodable image (${exc.message || exc})`);
  }
  if (bmp.width !== w || bmp.height !== h) {
    throw new InputError(`image ${name} is ${bmp.width}x${bmp.height} pixels; the model takes ${w}x${h}`);
  }
  const canvas = new OffscreenCanvas(w, h);
  const g = canvas.getContext("2d", { willReadFrequently: true });
  g.drawImage(bmp, 0, 0);
  const rgba = g.getImageData(0, 0, w, h, { colorSpace: "srgb" }).data;
  const px = new Uint8Array(ch * h * w);
  for (let i = 0; i < h * w; i++) {
    const [r, gg, b] = [rgba[4 * i], rgba[4 * i + 1], rgba[4 * i + 2]];
    if (ch === 1) px[i] = (r * 19595 + gg * 38470 + b * 7471 + 0x8000) >>> 16;
    else [px[i], px[h * w + i], px[2 * h * w + i]] = [r, gg, b];
  }
  return px;
}

/** A label as given (class id, label name, 0/1 list or label names) -> the target. */
function parseLabel(head, v, where) {
  if (v === undefined || v === null) return head.kind === "multilabel" ? head.labels.map(() => 0) : null; // unticked boxes: 0
  if (head.kind === "multiclass") {
    const id = typeof v === "string" ? head.labels.indexOf(v) : v;
    if (!Number.isInteger(id) || id < 0 || id >= head.labels.length) {
      throw new InputError(`${where}: label ${JSON.stringify(v)} is not one of ${head.labels.join(", ")}`);
    }
    return id;
  }
  if (Array.isArray(v) && v.every((x) => typeof x === "string")) {
    const bad = v.filter((x) => !head.labels.includes(x));
    if (bad.length) throw new InputError(`${where}: labels ${bad.join(", ")} are not among ${head.labels.join(", ")}`);
    return head.labels.map((l) => (v.includes(l) ? 1 : 0));
  }
  if (!Array.isArray(v) || v.length !== head.labels.length || !v.every((x) => x === 0 || x === 1)) {
    throw new InputError(`${where}: ${JSON.stringify(v)} must be ${head.labels.length} values of 0/1 or label names`);
  }
  return v;
}

async function addExamples(items) {
  if (!page.client) throw new InputError("load a bundle first");
  const added = [];
  for (const it of items) {
    const pixels = await readImage(it.blob, it.name);
    const labels = {};
    for (const t of page.client.tasks) {
      labels[t] = parseLabel(page.client.head(t), it.labels ? it.labels[t] : null, `image ${it.name}, task ${t}`);
    }
    added.push({ name: it.name, pixels, labels, url: URL.createObjectURL(it.blob) });
  }
  page.examples.push(...added);
  renderExamples();
  status(`${page.examples.length} image(s)`);
}

async function loadData(url) {
  const resp = await fetch(url);
  if (!resp.ok) throw new InputError(`data file ${url}: HTTP ${resp.status}`);
  let d;
  try {
    d = JSON.parse(await resp.text());
  } catch (exc) {
    throw new InputError(`data file ${url}: not valid JSON (${exc.message})`);
  }
  if (!d || !Array.isArray(d.images)) throw new InputError(`data file ${url}: field 'images' must be a list`);
  const items = [];
  for (const [i, e] of d.images.entries()) {
    if (!e || typeof e.file !== "string") throw new InputError(`data file ${url}: images[${i}].file must be a string`);
    const r = await fetch(new URL(e.file, url));
    if (!r.ok) throw new InputError(`image ${e.file}: HTTP ${r.status}`);
    items.push({ name: e.file, blob: await r.blob(), labels: e.labels || {} });
  }
  await addExamples(items);
}

function renderExamples() {
  const c = page.client;
  const head = $("examples").tHead;
  const body = $("examples").tBodies[0];
  body.replaceChildren();
  if (!c) return;
  head.innerHTML = "<tr><th>image</th><th>file</th>" + c.tasks.map((t) => `<th>${t}</th>`).join("") + "<th>predicted</th></tr>";
  page.examples.forEach((ex, i) => {
    const tr = body.insertRow();
    const img = document.createElement("img");
    Object.assign(img, { src: ex.url, className: "thumb", alt: ex.name });
    tr.insertCell().append(img);
    tr.insertCell().textContent = ex.name;
    for (const t of c.tasks) {
      const h = c.head(t);
      const td = tr.insertCell();
      if (h.kind === "multiclass") {
        const sel = document.createElement("select");
        sel.dataset.example = i;
        sel.dataset.task = t;
        sel.append(new Option("(unlabelled)", ""), ...h.labels.map((l, j) => new Option(l, j, false, ex.labels[t] === j)));
        sel.onchange = () => { ex.labels[t] = sel.value === "" ? null : Number(sel.value); };
        td.append(sel);
      } else {
        h.labels.forEach((l, j) => {
          const lab = document.createElement("label");
          const box = Object.assign(document.createElement("input"), { type: "checkbox", checked: !!(ex.labels[t] && ex.labels[t][j]) });
          box.onchange = () => {
            ex.labels[t] = ex.labels[t] || h.labels.map(() => 0);
            ex.labels[t][j] = box.checked ? 1 : 0;
          };
          lab.append(box, l);
          td.append(lab);
        });
      }
    }
    tr.insertCell().className = "predicted";
  });
}

function batch() {
  const c = page.client;
  const shape = c.entry.normalisation.input_shape;
  const per = shape.reduce((a, b) => a * b, 1);
  const data = new Uint8Array(page.examples.length * per);
  page.examples.forEach((ex, i) => data.set(ex.pixels, i * per));
  return { dtype: "uint8", shape: [page.examples.length, ...shape], data };
}

// ------------------------------------------------------------------ train / predict
const intField = (id, min) => {
  const raw = $(id).value.trim();
  if (raw === "") return null;
  const v = Number(raw);
  if (!Number.isInteger(v) || v < min) throw new InputError(`${id} must be an integer >= ${min}, got ${raw}`);
  return v;
};

async function train() {
  const c = page.client;
  const headOnly = $("head-only").checked;
  const tasks = headOnly ? c.entry.tasks : Object.keys(c.plan.step ? c.plan.step.task_kinds : {});
  const targets = {};
  for (const t of tasks) {
    targets[t] = page.examples.map((ex) => {
      if (ex.labels[t] === null || ex.labels[t] === undefined) throw new InputError(`image ${ex.name} has no label for task ${t}`);
      return ex.labels[t];
    });
  }
  const lr = Number($("lr").value);
  const opts = {
    steps: intField("steps", 1), epochs: intField("epochs", 1) ?? 1, batchSize: intField("batch-size", 1) ?? 32,
    seed: intField("seed", 0) ?? 0, lr, headOnly, startFrom: page.startFrom,
    onStep: (i, n, loss) => status(`step ${i}/${n}: loss ${loss.toFixed(4)}`),
  };
  const t0 = performance.now();
  const res = await c.train(batch(), targets, opts);
  page.seconds = (performance.now() - t0) / 1000;
  page.result = res;
  page.update = c.updateFile(res, { round: page.round ?? c.manifest.round });
  page.local = c.localFile(res);
  for (const [id, bytes] of [["download-update", page.update], ["download-local", page.local]]) {
    const a = $(id);
    if (a.href) URL.revokeObjectURL(a.href);
    a.href = URL.createObjectURL(new Blob([bytes], { type: "application/octet-stream" }));
    a.hidden = false;
  }
  status(`trained ${res.metrics.steps} step(s) on ${res.numExamples} image(s): loss ${res.metrics.loss.toFixed(4)}, `
    + `last ${res.metrics.last_loss.toFixed(4)} (${page.seconds.toFixed(2)} s); the update holds ${Object.keys(res.shared).length} arrays`);
}

async function predict() {
  const c = page.client;
  const x = batch();
  const out = {};
  for (const t of c.tasks) out[t] = await c.predict(t, x);
  page.predictions = Object.fromEntries(Object.entries(out).map(([t, a]) => [t, Array.from(a.data)]));
  const cells = document.querySelectorAll("#examples td.predicted");
  page.examples.forEach((ex, i) => {
    cells[i].textContent = c.tasks.map((t) => {
      const h = c.head(t);
      const row = Array.from(out[t].data.subarray(i * h.labels.length, (i + 1) * h.labels.length));
      if (h.kind === "multiclass") return `${t}: ${h.labels[row.indexOf(Math.max(...row))]}`;
      return `${t}: ${h.labels.filter((_, j) => row[j] > 0).join("+") || "-"}`;
    }).join("; ");
  });
  status(`predicted ${page.examples.length} image(s)`);
}

async function post() {
  const resp = await fetch(new URL("update", location.href), { method: "POST", body: page.update, headers: { "Content-Type": "application/octet-stream" } });
  let body;
  try {
    body = await resp.json();
  } catch {
    body = { error: `HTTP ${resp.status}` };
  }
  if (!resp.ok) throw new EdgeError(`the server refused the update: ${body.error || resp.status}`);
  page.posted = body;
  status(`the server accepted the update (${body.num_examples} examples)`);
}

// ------------------------------------------------------------------ wiring
$("load").onclick = () => guarded(async () => {
  page.examples = [];
  await loadBundle();
});
$("images").onchange = () => guarded(() => addExamples([...$("images").files].map((f) => ({ name: f.name, blob: f }))));
$("train").onclick = () => guarded(train);
$("predict").onclick = () => guarded(predict);
$("post").onclick = () => guarded(post);
window.addEventListener("unhandledrejection", (e) => showError(e.reason));

page.ready = guarded(async () => {
  if (params.get("bundle")) $("bundle-url").value = params.get("bundle");
  if (params.get("client")) $("client").replaceChildren(new Option(params.get("client"), params.get("client"), true, true));
  if (params.get("bundle") || params.get("data")) {
    await loadBundle();
    if (params.get("data")) await loadData(new URL(params.get("data"), location.href).href);
  }
});
