// The batch order of mobile_client.batching.batch_order, bit for bit.
//
// One pass = numpy's `np.random.default_rng(seed).permutation(n)` (one generator, drawn
// anew per pass), cut into slices of `batchSize`; stop after `epochs` passes, or after
// exactly `steps` batches when `steps` is given. numpy's generator is PCG64 (XSL-RR
// 128/64) seeded through SeedSequence; the permutation is its Fisher-Yates shuffle with
// masked rejection sampling (`random_interval`). Same arguments -> the same batches as
// the Python edge client and the Lightning clients.

const M32 = 0xffffffff;
const MASK64 = (1n << 64n) - 1n;
const MASK128 = (1n << 128n) - 1n;
const PCG_MULT = (0x2360ed051fc65da4n << 64n) | 0x4385df649fccf645n;

// numpy.random.SeedSequence constants (pool of 4 uint32 words)
const INIT_A = 0x43b0d7e5;
const MULT_A = 0x931e8875;
const INIT_B = 0x8b51f9dd;
const MULT_B = 0x58f38ded;
const MIX_MULT_L = 0xca01f9dd;
const MIX_MULT_R = 0x4973f715;
const POOL_SIZE = 4;

const mul32 = (a, b) => Math.imul(a, b) >>> 0;

/** SeedSequence(seed).generate_state(nWords64, uint64) as BigInts. */
export function seedSequenceState(seed, nWords64) {
  if (!Number.isSafeInteger(seed) || seed < 0) {
    throw new RangeError(`seed must be an integer >= 0, got ${seed}`);
  }
  const entropy = [];
  let s = BigInt(seed);
  do {
    entropy.push(Number(s & 0xffffffffn));
    s >>= 32n;
  } while (s > 0n);
  let hashConst = INIT_A;
  const hashmix = (value) => {
    value = (value ^ hashConst) >>> 0;
    hashConst = mul32(hashConst, MULT_A);
    value = mul32(value, hashConst);
    return (value ^ (value >>> 16)) >>> 0;
  };
  const mix = (x, y) => {
    const r = (mul32(MIX_MULT_L, x) - mul32(MIX_MULT_R, y)) >>> 0;
    return (r ^ (r >>> 16)) >>> 0;
  };
  const pool = new Array(POOL_SIZE);
  for (let i = 0; i < POOL_SIZE; i++) pool[i] = hashmix(i < entropy.length ? entropy[i] : 0);
  for (let src = 0; src < POOL_SIZE; src++) {
    for (let dst = 0; dst < POOL_SIZE; dst++) {
      if (src !== dst) pool[dst] = mix(pool[dst], hashmix(pool[src]));
    }
  }
  for (let src = POOL_SIZE; src < entropy.length; src++) {
    for (let dst = 0; dst < POOL_SIZE; dst++) pool[dst] = mix(pool[dst], hashmix(entropy[src]));
  }
  const words = [];
  let hb = INIT_B;
  for (let i = 0; i < nWords64 * 2; i++) {
    let v = (pool[i % POOL_SIZE] ^ hb) >>> 0;
    hb = mul32(hb, MULT_B);
    v = mul32(v, hb);
    words.push((v ^ (v >>> 16)) >>> 0);
  }
  const out = [];
  for (let i = 0; i < nWords64; i++) {
    out.push(BigInt(words[2 * i]) | (BigInt(words[2 * i + 1]) << 32n));
  }
  return out;
}

/** numpy's PCG64 bit generator (np.random.default_rng(seed)). */
export class PCG64 {
  constructor(seed) {
    const [s0, s1, i0, i1] = seedSequenceState(seed, 4);
    const initState = (s0 << 64n) | s1;
    const initSeq = (i0 << 64n) | i1;
    this.inc = ((initSeq << 1n) | 1n) & MASK128;
    this.state = 0n;
    this.step();
    this.state = (this.state + initState) & MASK128;
    this.step();
    this.hasUint32 = false;
    this.uinteger = 0;
  }

  step() {
    this.state = (this.state * PCG_MULT + this.inc) & MASK128;
  }

  nextUint64() {
    this.step();
    const rot = this.state >> 122n;
    const x = ((this.state >> 64n) ^ this.state) & MASK64;
    return ((x >> rot) | (x << ((64n - rot) & 63n))) & MASK64;
  }

  nextUint32() {
    if (this.hasUint32) {
      this.hasUint32 = false;
      return this.uinteger;
    }
    const next = this.nextUint64();
    this.hasUint32 = true;
    this.uinteger = Number(next >> 32n);
    return Number(next & 0xffffffffn);
  }

  /** A uniform integer in [0, max] (numpy's random_interval: masked rejection). */
  interval(max) {
    if (max === 0) return 0;
    if (max <= M32) {
      let mask = max;
      for (const sh of [1, 2, 4, 8, 16]) mask = (mask | (mask >>> sh)) >>> 0;
      let v;
      do v = (this.nextUint32() & mask) >>> 0;
      while (v > max);
      return v;
    }
    const big = BigInt(max);
    let mask = big;
    for (const sh of [1n, 2n, 4n, 8n, 16n, 32n]) mask |= mask >> sh;
    let v;
    do v = this.nextUint64() & mask;
    while (v > big);
    return Number(v);
  }

  /** np.random.default_rng(seed).permutation(n) continued from this generator. */
  permutation(n) {
    const a = new Array(n);
    for (let i = 0; i < n; i++) a[i] = i;
    for (let i = n - 1; i >= 1; i--) {
      const j = this.interval(i);
      const t = a[i];
      a[i] = a[j];
      a[j] = t;
    }
    return a;
  }
}

/** How many batches batchOrder yields for these arguments. */
export function numBatches(n, batchSize, epochs = 1, steps = null) {
  return steps !== null && steps !== undefined ? steps : epochs * Math.ceil(n / batchSize);
}

/** The index arrays of mobile_client.batching.batch_order(n, batchSize, epochs, steps, seed). */
export function batchOrder(n, batchSize, epochs = 1, steps = null, seed = 0) {
  for (const [name, v] of [["n", n], ["batchSize", batchSize]]) {
    if (!Number.isInteger(v) || v <= 0) throw new RangeError(`${name} must be > 0, got ${v}`);
  }
  const bySteps = steps !== null && steps !== undefined;
  if (bySteps ? !(Number.isInteger(steps) && steps >= 0) : !(Number.isInteger(epochs) && epochs >= 0)) {
    throw new RangeError(`epochs/steps must be integers >= 0, got ${epochs}/${steps}`);
  }
  const rng = new PCG64(seed);
  const out = [];
  let passes = 0;
  while ((bySteps && out.length < steps) || (!bySteps && passes < epochs)) {
    const perm = rng.permutation(n);
    passes += 1;
    for (let start = 0; start < n; start += batchSize) {
      if (bySteps && out.length >= steps) return out;
      out.push(perm.slice(start, start + batchSize));
    }
  }
  return out;
}
