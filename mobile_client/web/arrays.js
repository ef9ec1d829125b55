// Arrays in and out of the edge client: .npz weights (numpy's np.savez: a zip of .npy
// members, stored or deflated, zip64 headers), safetensors files (the update wire format
// of mobile_client.safetensors_np / mobile_client.update) and the state hash.
//
// An array is `{dtype, shape, data}`: dtype "float32" (Float32Array), "int64"
// (BigInt64Array) or "uint8" (Uint8Array, pixels), shape an array of ints ([] for 0-d).
// Every failure is an EdgeError subclass naming the file and the key.

import { InputError, ManifestError } from "./errors.js";

const DTYPES = {
  float32: { npy: "<f4", st: "F32", size: 4, Ctor: Float32Array },
  int64: { npy: "<i8", st: "I64", size: 8, Ctor: BigInt64Array },
  uint8: { npy: "|u1", st: "U8", size: 1, Ctor: Uint8Array },
};
const FROM_NPY = { "<f4": "float32", "<i8": "int64", "|u1": "uint8" };
const FROM_ST = { F32: "float32", I64: "int64" };
const MAX_BYTES = 1 << 30;

export const numel = (shape) => shape.reduce((a, b) => a * b, 1);

// ----------------------------------------------------------------------------- .npz
async function inflateRaw(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate-raw"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

function zipEntries(buf, where, Err) {
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  let eocd = -1;
  for (let i = buf.length - 22; i >= Math.max(0, buf.length - 22 - 0xffff); i--) {
    if (v.getUint32(i, true) === 0x06054b50) {
      eocd = i;
      break;
    }
  }
  if (eocd < 0) throw new Err(`${where}: not a zip (.npz) file`);
  let count = v.getUint16(eocd + 10, true);
  let cd = v.getUint32(eocd + 16, true);
  const loc = eocd - 20; // zip64 end of central directory locator
  if (loc >= 0 && v.getUint32(loc, true) === 0x07064b50) {
    const z = Number(v.getBigUint64(loc + 8, true));
    if (z + 56 > buf.length || v.getUint32(z, true) !== 0x06064b50) {
      throw new Err(`${where}: malformed zip64 directory`);
    }
    count = Number(v.getBigUint64(z + 32, true));
    cd = Number(v.getBigUint64(z + 48, true));
  }
  const out = new Map();
  let p = cd;
  for (let k = 0; k < count; k++) {
    if (p + 46 > buf.length || v.getUint32(p, true) !== 0x02014b50) {
      throw new Err(`${where}: malformed zip central directory`);
    }
    const method = v.getUint16(p + 10, true);
    let csize = v.getUint32(p + 20, true);
    let usize = v.getUint32(p + 24, true);
    const nlen = v.getUint16(p + 28, true);
    const xlen = v.getUint16(p + 30, true);
    const clen = v.getUint16(p + 32, true);
    let off = v.getUint32(p + 42, true);
    const name = new TextDecoder().decode(buf.subarray(p + 46, p + 46 + nlen));
    let x = p + 46 + nlen;
    const xend = x + xlen;
    while (x + 4 <= xend) {
      const id = v.getUint16(x, true);
      const len = v.getUint16(x + 2, true);
      if (id === 0x0001) {
        let q = x + 4;
        const take = () => {
          const r = Number(v.getBigUint64(q, true));
          q += 8;
          return r;
        };
        if (usize === 0xffffffff) usize = take();
        if (csize === 0xffffffff) csize = take();
        if (off === 0xffffffff) off = take();
      }
      x += 4 + len;
    }
    out.set(name, { method, csize, usize, off });
    p = xend + clen;
  }
  return { v, out };
}

/** The arrays `keys` of an np.savez file (each `key.npy`), as {dtype, shape, data}. */
export async function readNpz(bytes, keys, where, Err = ManifestError) {
  const buf = new Uint8Array(bytes);
  const { v, out } = zipEntries(buf, where, Err);
  const arrays = {};
  for (const key of keys) {
    const e = out.get(`${key}.npy`);
    if (!e) throw new Err(`${where}: key '${key}' is missing`);
    if (e.off + 30 > buf.length || v.getUint32(e.off, true) !== 0x04034b50) {
      throw new Err(`${where}: key '${key}': malformed zip member`);
    }
    const start = e.off + 30 + v.getUint16(e.off + 26, true) + v.getUint16(e.off + 28, true);
    if (start + e.csize > buf.length || e.usize > MAX_BYTES) {
      throw new Err(`${where}: key '${key}': zip member out of bounds`);
    }
    let member = buf.subarray(start, start + e.csize);
    if (e.method === 8) member = await inflateRaw(member);
    else if (e.method !== 0) {
      throw new Err(`${where}: key '${key}': zip compression ${e.method} unsupported`);
    }
    arrays[key] = parseNpy(member, `${where}: key '${key}'`, Err);
  }
  return arrays;
}

/** One .npy (versions 1-3): little-endian float32, int64 or uint8, C order. */
export function parseNpy(buf, where, Err = ManifestError) {
  const magic = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]; // \x93NUMPY
  if (buf.length < 10 || magic.some((b, i) => buf[i] !== b)) {
    throw new Err(`${where}: not a .npy array`);
  }
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const major = buf[6];
  const hlen = major === 1 ? v.getUint16(8, true) : v.getUint32(8, true);
  const hstart = major === 1 ? 10 : 12;
  const header = new TextDecoder().decode(buf.subarray(hstart, hstart + hlen));
  const descr = /'descr':\s*'([^']*)'/.exec(header);
  const fortran = /'fortran_order':\s*(True|False)/.exec(header);
  const shapeM = /'shape':\s*\(([^)]*)\)/.exec(header);
  if (!descr || !fortran || !shapeM) throw new Err(`${where}: malformed .npy header`);
  const dtype = FROM_NPY[descr[1]];
  if (!dtype) {
    throw new Err(`${where}: dtype ${descr[1]} is not supported (float32, int64 or uint8)`);
  }
  const shape = shapeM[1].split(",").map((s) => s.trim()).filter((s) => s).map(Number);
  if (shape.some((s) => !Number.isInteger(s) || s < 0)) {
    throw new Err(`${where}: malformed shape (${shapeM[1]})`);
  }
  const n = numel(shape);
  const nbytes = n * DTYPES[dtype].size;
  const start = hstart + hlen;
  if (start + nbytes !== buf.length) {
    throw new Err(`${where}: shape [${shape}] of ${dtype} needs ${nbytes} bytes of data, the file holds ${buf.length - start}`);
  }
  if (fortran[1] === "True" && shape.filter((s) => s > 1).length > 1) {
    throw new Err(`${where}: Fortran-order arrays are not supported`);
  }
  const data = new DTYPES[dtype].Ctor(buf.slice(start, start + nbytes).buffer);
  return { dtype, shape, data };
}

// ----------------------------------------------------------------------------- safetensors
const ALIGN_RANK = { int64: 2, float32: 1, uint8: 0 }; // the safetensors writer: larger dtypes first

/** The bytes of a safetensors file holding `arrays` and string `metadata`. Tensors
 * are laid out as the `safetensors` package lays them out: by dtype (I64 before F32),
 * then by name; the header is padded with spaces to a multiple of 8 bytes. */
export function serializeSafetensors(arrays, metadata) {
  const keys = Object.keys(arrays).sort((a, b) => {
    const d = ALIGN_RANK[arrays[b].dtype] - ALIGN_RANK[arrays[a].dtype];
    return d !== 0 ? d : cmpCodePoints(a, b);
  });
  const header = {};
  if (metadata) header.__metadata__ = metadata;
  let off = 0;
  const parts = [];
  for (const k of keys) {
    const a = arrays[k];
    const info = DTYPES[a.dtype];
    if (!info) throw new InputError(`key '${k}' has unsupported dtype ${a.dtype}`);
    if (a.data.length !== numel(a.shape)) {
      throw new InputError(`key '${k}': ${a.data.length} values for shape [${a.shape}]`);
    }
    const bytes = new Uint8Array(a.data.buffer, a.data.byteOffset, a.data.byteLength);
    header[k] = { dtype: info.st, shape: a.shape, data_offsets: [off, off + bytes.length] };
    off += bytes.length;
    parts.push(bytes);
  }
  let json = JSON.stringify(header);
  json += " ".repeat((8 - (new TextEncoder().encode(json).length % 8)) % 8);
  const hbytes = new TextEncoder().encode(json);
  const out = new Uint8Array(8 + hbytes.length + off);
  new DataView(out.buffer).setBigUint64(0, BigInt(hbytes.length), true);
  out.set(hbytes, 8);
  let p = 8 + hbytes.length;
  for (const b of parts) {
    out.set(b, p);
    p += b.length;
  }
  return out;
}

/** (arrays, metadata) of a safetensors file with F32/I64 tensors (e.g. a server's
 * global.safetensors to start from). */
export function parseSafetensors(bytes, where) {
  const buf = new Uint8Array(bytes);
  const fail = (msg) => {
    throw new InputError(`${where}: not a valid safetensors file: ${msg}`);
  };
  if (buf.length < 8) fail("shorter than 8 bytes");
  const n = Number(new DataView(buf.buffer, buf.byteOffset).getBigUint64(0, true));
  if (n > buf.length - 8) fail(`header of ${n} bytes in a ${buf.length}-byte file`);
  let header;
  try {
    header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(buf.subarray(8, 8 + n)));
  } catch (exc) {
    fail(`header is not JSON (${exc.message})`);
  }
  if (!header || typeof header !== "object" || Array.isArray(header)) fail("header is no object");
  const metadata = header.__metadata__ || {};
  const data = buf.subarray(8 + n);
  const arrays = {};
  const spans = [];
  for (const [k, t] of Object.entries(header)) {
    if (k === "__metadata__") continue;
    const dtype = FROM_ST[t && t.dtype];
    if (!dtype) fail(`key '${k}' has dtype ${t && t.dtype}; supported: F32, I64`);
    const shape = t.shape;
    const [s, e] = t.data_offsets || [];
    if (!Array.isArray(shape) || shape.some((d) => !Number.isInteger(d) || d < 0)) {
      fail(`key '${k}' has a malformed shape`);
    }
    if (!Number.isInteger(s) || !Number.isInteger(e) || s > e || e > data.length
        || e - s !== numel(shape) * DTYPES[dtype].size) {
      fail(`key '${k}' has data offsets [${s}, ${e}] that do not fit its shape or the file`);
    }
    spans.push([s, e]);
    arrays[k] = { dtype, shape, data: new DTYPES[dtype].Ctor(data.slice(s, e).buffer) };
  }
  spans.sort((a, b) => a[0] - b[0]);
  let at = 0;
  for (const [s, e] of spans) {
    if (s !== at) fail("tensor data overlaps or leaves a gap");
    at = e;
  }
  if (at !== data.length) fail("tensor data does not cover the file");
  return { arrays, metadata };
}

// ----------------------------------------------------------------------------- state hash
/** Compare strings by code point, as Python's sorted() does. */
export function cmpCodePoints(a, b) {
  const x = Array.from(a, (c) => c.codePointAt(0));
  const y = Array.from(b, (c) => c.codePointAt(0));
  for (let i = 0; i < Math.min(x.length, y.length); i++) if (x[i] !== y[i]) return x[i] - y[i];
  return x.length - y.length;
}

/** mobile_client.update.state_hash: sha256 over sorted keys, each key's dtype, shape
 * (Python's json.dumps of the list) and little-endian bytes. */
export async function stateHash(arrays) {
  const enc = new TextEncoder();
  const parts = [];
  for (const k of Object.keys(arrays).sort(cmpCodePoints)) {
    const a = arrays[k];
    parts.push(enc.encode(`${k}\0${DTYPES[a.dtype].npy}\0[${a.shape.join(", ")}]\0`));
    parts.push(new Uint8Array(a.data.buffer, a.data.byteOffset, a.data.byteLength));
  }
  return sha256Hex(concat(parts));
}

export function concat(parts) {
  const out = new Uint8Array(parts.reduce((s, p) => s + p.length, 0));
  let p = 0;
  for (const b of parts) {
    out.set(b, p);
    p += b.length;
  }
  return out;
}

export async function sha256Hex(bytes) {
  const d = new Uint8Array(await globalThis.crypto.subtle.digest("SHA-256", bytes));
  return Array.from(d, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Python's repr(float(x)) (shortest round-trip digits, Python's exponent rules). */
export function pyFloatRepr(x) {
  if (Number.isNaN(x)) return "nan";
  if (!Number.isFinite(x)) return x > 0 ? "inf" : "-inf";
  if (x === 0) return Object.is(x, -0) ? "-0.0" : "0.0";
  const [mant, expS] = x.toExponential().split("e");
  const exp = Number(expS);
  const neg = mant.startsWith("-");
  const digits = mant.replace("-", "").replace(".", "");
  let s;
  if (exp < -4 || exp >= 16) {
    const m = digits.length > 1 ? `${digits[0]}.${digits.slice(1)}` : digits;
    s = `${m}e${exp < 0 ? "-" : "+"}${String(Math.abs(exp)).padStart(2, "0")}`;
  } else if (exp < 0) {
    s = `0.${"0".repeat(-exp - 1)}${digits}`;
  } else if (digits.length <= exp + 1) {
    s = `${digits}${"0".repeat(exp + 1 - digits.length)}.0`;
  } else {
    s = `${digits.slice(0, exp + 1)}.${digits.slice(exp + 1)}`;
  }
  return neg ? `-${s}` : s;
}

/** Python's json.dumps of a dict of floats ({"a": 1.0, "b": 0.25}). */
export function pyJsonFloats(obj) {
  const items = Object.entries(obj).map(([k, v]) => `${JSON.stringify(k)}: ${pyFloatRepr(v)}`);
  return `{${items.join(", ")}}`;
}
