// MessagePack for the application's values (payloads), not for envelopes:
// the envelopes are the machine's, encoded and decoded in WebAssembly.
//
// Owns the mapping between JavaScript values and MessagePack: null and
// undefined as nil, booleans, numbers (integers as the smallest integer
// type, others as float 64), bigint as int 64 / uint 64, strings,
// Uint8Array and ArrayBuffer as bin, arrays, Map and plain objects as
// maps. Integers outside the exact range of a JavaScript number
// (|n| > 2^53 - 1) decode as bigint, so none loses precision. Extension
// types decode as { type, data }. It never touches the network.

const utf8Encoder = new TextEncoder();
const utf8Decoder = new TextDecoder('utf-8', { fatal: true });

/** Nesting deeper than this is refused, as the core refuses it. */
const MAX_DEPTH = 64;

class Writer {
  constructor() {
    this.buf = new Uint8Array(256);
    this.view = new DataView(this.buf.buffer);
    this.pos = 0;
  }

  ensure(n) {
    if (this.pos + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.pos + n) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.buf.subarray(0, this.pos));
    this.buf = next;
    this.view = new DataView(next.buffer);
  }

  u8(b) { this.ensure(1); this.buf[this.pos++] = b; }
  u16(t, v) { this.ensure(3); this.buf[this.pos] = t; this.view.setUint16(this.pos + 1, v); this.pos += 3; }
  u32(t, v) { this.ensure(5); this.buf[this.pos] = t; this.view.setUint32(this.pos + 1, v); this.pos += 5; }
  bytes(b) { this.ensure(b.length); this.buf.set(b, this.pos); this.pos += b.length; }

  value(v, depth) {
    if (depth > MAX_DEPTH) throw new RangeError('MessagePack: nested deeper than 64 levels');
    switch (typeof v) {
      case 'number': return this.number(v);
      case 'string': return this.string(v);
      case 'boolean': return this.u8(v ? 0xc3 : 0xc2);
      case 'bigint': return this.bigint(v);
      case 'undefined': return this.u8(0xc0);
      case 'object': break;
      default: throw new TypeError(`MessagePack: cannot encode a ${typeof v}`);
    }
    if (v === null) return this.u8(0xc0);
    if (v instanceof Uint8Array) return this.bin(v);
    if (v instanceof ArrayBuffer) return this.bin(new Uint8Array(v));
    if (ArrayBuffer.isView(v)) return this.bin(new Uint8Array(v.buffer, v.byteOffset, v.byteLength));
    if (Array.isArray(v)) {
      this.head(v.length, 0x90, 0xdc);
      for (const x of v) this.value(x, depth + 1);
      return;
    }
    if (v instanceof Map) {
      this.head(v.size, 0x80, 0xde);
      for (const [k, x] of v) { this.value(k, depth + 1); this.value(x, depth + 1); }
      return;
    }
    if (typeof v.toJSON === 'function') return this.value(v.toJSON(), depth);
    const keys = Object.keys(v).filter((k) => v[k] !== undefined);
    this.head(keys.length, 0x80, 0xde);
    for (const k of keys) { this.string(k); this.value(v[k], depth + 1); }
  }

  head(n, fix, t16) {
    if (n < 16) this.u8(fix | n);
    else if (n < 0x10000) this.u16(t16, n);
    else this.u32(t16 + 1, n);
  }

  number(n) {
    if (Number.isInteger(n) && Number.isSafeInteger(n)) {
      if (n >= 0) {
        if (n < 0x80) return this.u8(n);
        if (n < 0x100) { this.ensure(2); this.buf[this.pos++] = 0xcc; this.buf[this.pos++] = n; return; }
        if (n < 0x10000) return this.u16(0xcd, n);
        if (n < 0x100000000) return this.u32(0xce, n);
        return this.bigint(BigInt(n));
      }
      if (n >= -32) return this.u8(n & 0xff);
      if (n >= -128) { this.ensure(2); this.buf[this.pos++] = 0xd0; this.buf[this.pos++] = n & 0xff; return; }
      if (n >= -32768) { this.ensure(3); this.buf[this.pos] = 0xd1; this.view.setInt16(this.pos + 1, n); this.pos += 3; return; }
      if (n >= -2147483648) { this.ensure(5); this.buf[this.pos] = 0xd2; this.view.setInt32(this.pos + 1, n); this.pos += 5; return; }
      return this.bigint(BigInt(n));
    }
    this.ensure(9);
    this.buf[this.pos] = 0xcb;
    this.view.setFloat64(this.pos + 1, n);
    this.pos += 9;
  }

  bigint(n) {
    this.ensure(9);
    if (n >= 0n) {
      if (n > 0xffffffffffffffffn) throw new RangeError('MessagePack: integer above 2^64 - 1');
      this.buf[this.pos] = 0xcf;
      this.view.setBigUint64(this.pos + 1, n);
    } else {
      if (n < -0x8000000000000000n) throw new RangeError('MessagePack: integer below -2^63');
      this.buf[this.pos] = 0xd3;
      this.view.setBigInt64(this.pos + 1, n);
    }
    this.pos += 9;
  }

  string(s) {
    // At most 3 bytes per UTF-16 unit.
    const max = s.length * 3;
    this.ensure(max + 5);
    const start = this.pos;
    const headLen = max < 32 ? 1 : max < 0x100 ? 2 : max < 0x10000 ? 3 : 5;
    const { written } = utf8Encoder.encodeInto(s, this.buf.subarray(start + headLen));
    if (headLen === 1) this.buf[start] = 0xa0 | written;
    else if (headLen === 2) { this.buf[start] = 0xd9; this.buf[start + 1] = written; }
    else if (headLen === 3) { this.buf[start] = 0xda; this.view.setUint16(start + 1, written); }
    else { this.buf[start] = 0xdb; this.view.setUint32(start + 1, written); }
    this.pos = start + headLen + written;
  }

  bin(b) {
    const n = b.length;
    if (n < 0x100) { this.ensure(2); this.buf[this.pos++] = 0xc4; this.buf[this.pos++] = n; }
    else if (n < 0x10000) this.u16(0xc5, n);
    else this.u32(0xc6, n);
    this.bytes(b);
  }
}

/**
 * Encodes a value as MessagePack.
 * @param {unknown} value
 * @returns {Uint8Array}
 */
export function encode(value) {
  const w = new Writer();
  w.value(value, 0);
  return w.buf.subarray(0, w.pos);
}

class Reader {
  constructor(bytes) {
    this.buf = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.pos = 0;
  }

  need(n) {
    if (this.pos + n > this.buf.length) throw new RangeError('MessagePack: value cut short');
  }

  value(depth) {
    if (depth > MAX_DEPTH) throw new RangeError('MessagePack: nested deeper than 64 levels');
    this.need(1);
    const b = this.buf[this.pos++];
    if (b < 0x80) return b;
    if (b >= 0xe0) return b - 0x100;
    if (b < 0x90) return this.map(b & 0x0f, depth);
    if (b < 0xa0) return this.array(b & 0x0f, depth);
    if (b < 0xc0) return this.str(b & 0x1f);
    const v = this.view;
    let p = this.pos;
    switch (b) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xc4: this.need(1); this.pos += 1; return this.bin(this.buf[p]);
      case 0xc5: this.need(2); this.pos += 2; return this.bin(v.getUint16(p));
      case 0xc6: this.need(4); this.pos += 4; return this.bin(v.getUint32(p));
      case 0xc7: this.need(2); this.pos += 2; return this.ext(this.buf[p], v.getInt8(p + 1));
      case 0xc8: this.need(3); this.pos += 3; return this.ext(v.getUint16(p), v.getInt8(p + 2));
      case 0xc9: this.need(5); this.pos += 5; return this.ext(v.getUint32(p), v.getInt8(p + 4));
      case 0xca: this.need(4); this.pos += 4; return v.getFloat32(p);
      case 0xcb: this.need(8); this.pos += 8; return v.getFloat64(p);
      case 0xcc: this.need(1); this.pos += 1; return this.buf[p];
      case 0xcd: this.need(2); this.pos += 2; return v.getUint16(p);
      case 0xce: this.need(4); this.pos += 4; return v.getUint32(p);
      case 0xcf: this.need(8); this.pos += 8; return exact(v.getBigUint64(p));
      case 0xd0: this.need(1); this.pos += 1; return v.getInt8(p);
      case 0xd1: this.need(2); this.pos += 2; return v.getInt16(p);
      case 0xd2: this.need(4); this.pos += 4; return v.getInt32(p);
      case 0xd3: this.need(8); this.pos += 8; return exact(v.getBigInt64(p));
      case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8: {
        this.need(1);
        this.pos += 1;
        return this.ext(1 << (b - 0xd4), v.getInt8(p));
      }
      case 0xd9: this.need(1); this.pos += 1; return this.str(this.buf[p]);
      case 0xda: this.need(2); this.pos += 2; return this.str(v.getUint16(p));
      case 0xdb: this.need(4); this.pos += 4; return this.str(v.getUint32(p));
      case 0xdc: this.need(2); this.pos += 2; return this.array(v.getUint16(p), depth);
      case 0xdd: this.need(4); this.pos += 4; return this.array(v.getUint32(p), depth);
      case 0xde: this.need(2); this.pos += 2; return this.map(v.getUint16(p), depth);
      case 0xdf: this.need(4); this.pos += 4; return this.map(v.getUint32(p), depth);
      default: throw new RangeError(`MessagePack: 0x${b.toString(16)} is not a type`);
    }
  }

  str(n) {
    this.need(n);
    const s = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    if (n < 16) {
      // Short ASCII strings are the common case: no decoder call.
      let out = '';
      for (let i = 0; i < n; i++) {
        const c = s[i];
        if (c >= 0x80) return utf8Decoder.decode(s);
        out += String.fromCharCode(c);
      }
      return out;
    }
    return utf8Decoder.decode(s);
  }

  bin(n) {
    this.need(n);
    const b = this.buf.slice(this.pos, this.pos + n);
    this.pos += n;
    return b;
  }

  ext(n, type) {
    return { type, data: this.bin(n) };
  }

  array(n, depth) {
    const out = new Array(n);
    for (let i = 0; i < n; i++) out[i] = this.value(depth + 1);
    return out;
  }

  map(n, depth) {
    const out = {};
    for (let i = 0; i < n; i++) {
      const k = this.value(depth + 1);
      const key = typeof k === 'string' ? k : typeof k === 'object' ? JSON.stringify(k) : String(k);
      if (key === '__proto__') {
        Object.defineProperty(out, key, { value: this.value(depth + 1), enumerable: true, writable: true, configurable: true });
      } else {
        out[key] = this.value(depth + 1);
      }
    }
    return out;
  }
}

/** A 64-bit integer as a number when that is exact, as a bigint otherwise. */
function exact(n) {
  return n >= -9007199254740991n && n <= 9007199254740991n ? Number(n) : n;
}

/**
 * Decodes exactly one MessagePack value.
 * @param {Uint8Array} bytes
 * @returns {unknown}
 */
export function decode(bytes) {
  const r = new Reader(bytes);
  const v = r.value(0);
  if (r.pos !== bytes.length) throw new RangeError('MessagePack: bytes after the value');
  return v;
}
