// Kitestring for web pages: the JavaScript driver around the core's client
// machine, compiled to WebAssembly.
//
// Owns what a page owns and the machine must not: the browser's WebSocket
// (or the HTTP fallback's requests), the clock (performance.now), one
// timer, random bytes (crypto.getRandomValues), the page's lifecycle, and
// the application's values (JSON and MessagePack payloads, promises, DOM
// events). It moves bytes, time and events between those and the machine,
// and decides nothing about the protocol: reconnecting, backoff,
// heartbeats, acknowledgments, resuming, every close code's meaning and
// which transport a connection takes are the machine's, the same code the
// Rust drivers run. After every input it drains the machine's outputs in
// order, then arms one timer for the machine's next deadline; a deadline
// already due (a batch: by default the machine batches what the page sends
// within one turn) runs at the end of the event loop's turn, as a task of
// its own, not on a timer.

import initWasm, { Machine } from './kitestring_web.js';
import * as msgpack from './msgpack.js';

// The machine's output kinds (adapters/web/src/output.rs, `kinds`).
const NONE = 0;
const CONNECT = 1;
const TEXT = 2;
const BINARY = 3;
const DISCONNECT = 4;
const MESSAGE = 10;
const RESPONSE = 11;
const ACKED = 12;
const DATAGRAM = 13;
const LATEST = 14;
const MAP_CHANGED = 15;
const MAP_SYNCED = 16;
const EVENT = 20;

let wasmReady = null;

/**
 * Loads the WebAssembly module once; `connect` calls it. Pass the module's
 * URL (or bytes) when it is not served beside this file.
 */
export function init(wasm) {
  if (!wasmReady) {
    wasmReady = initWasm(wasm === undefined ? undefined : { module_or_path: wasm });
  }
  return wasmReady;
}

/** Every error this package reports: `kind` names it for programs. */
export class KitestringError extends Error {
  constructor(kind, message, info = {}) {
    super(message);
    this.name = 'KitestringError';
    this.kind = kind;
    Object.assign(this, info);
  }
}

/** A message the machine would not take: the queue is full, it is too large, the session is over. */
export class SendError extends KitestringError {
  constructor(info) {
    super(info.error, info.message, info);
    this.name = 'SendError';
  }
}

/** The server refused a message (a join, a publish, a message it could not accept). */
export class RefusedError extends KitestringError {
  constructor(e) {
    super('refused', `refused: ${e.reason}`, { id: e.id, room: e.room, op: e.op, reason: e.reason, code: e.code });
    this.name = 'RefusedError';
  }
}

/**
 * A message whose fate is unknown or that was never sent: its session was
 * lost or closed. `unconfirmed` is true when it was sent (it may have
 * arrived), false when it never left this page.
 */
export class LostError extends KitestringError {
  constructor(id, reason, detail, unconfirmed) {
    super('lost', `message ${id}: session ${reason}${detail ? ` (${detail})` : ''}`, { id, reason, detail, unconfirmed });
    this.name = 'LostError';
  }
}

/** A request that got no response: `timed_out`, `session_lost` or `closed`. */
export class RequestError extends KitestringError {
  constructor(request, error) {
    super(error, `request ${request}: ${error.replace('_', ' ')}`, { request });
    this.name = 'RequestError';
  }
}

/** A message from the server, in order, exactly once. */
export class KitestringMessageEvent extends Event {
  constructor(client, type) {
    super(type);
    this.client = client;
    /** The decoded payload. */
    this.data = undefined;
    /** The room it was broadcast in, or null. */
    this.room = null;
    /** The server's id for it (bigint). */
    this.id = 0n;
    /** Its sequence number, or its offset in its room's stream (bigint). */
    this.seq = 0n;
    /** The sender's wall-clock timestamp in milliseconds, or null. */
    this.timestamp = null;
    /** Whether the server expects a response: answer with `respond`. */
    this.request = false;
  }

  /** Answers this request. Resolves when the server has the response. */
  respond(value) {
    return this.client.respond(this, value);
  }
}

/** An event carrying the fields of its JSON form (`statechange`, `presence`, `sessionlost`, ...). */
export class KitestringEvent extends Event {
  constructor(type, fields) {
    super(type);
    Object.assign(this, fields);
  }
}

/**
 * Runs `f` once the event loop's current turn is over, after the tasks
 * already queued (a burst of socket messages): a `MessageChannel` task,
 * which neither the 4 ms clamp of nested timers nor a hidden page's timer
 * throttling delays. Callbacks of one turn share one task.
 */
const endOfTurn = (() => {
  if (typeof MessageChannel !== 'function') return (f) => setTimeout(f, 0);
  const queue = [];
  const channel = new MessageChannel();
  channel.port1.onmessage = () => {
    for (const f of queue.splice(0)) f();
  };
  return (f) => {
    if (queue.push(f) === 1) channel.port2.postMessage(null);
  };
})();

/** The page's clock and timers, replaceable (tests slow them down). */
const pageClock = {
  now: () => performance.now(),
  setTimeout: (f, ms) => setTimeout(f, ms),
  clearTimeout: (t) => clearTimeout(t),
  endOfTurn,
};

/** `Client.#timer` while the wake-up is at the end of the turn. */
const TURN = Symbol('end of turn');

const utf8 = new TextDecoder();
// At least 16 digits in a row: a number that may not fit a double exactly.
const LONG_DIGITS = /\d{16}/;

function bigReviver(key, value, context) {
  if (typeof value === 'number' && !Number.isSafeInteger(value) && Number.isInteger(value)
      && context && /^-?\d+$/.test(context.source)) {
    return BigInt(context.source);
  }
  return value;
}

function bigReplacer(key, value) {
  return typeof value === 'bigint' ? JSON.rawJSON(value.toString()) : value;
}

/** JSON text for a value; bigints become JSON integers, exactly. */
function toJson(value) {
  try {
    return JSON.stringify(value) ?? 'null';
  } catch (e) {
    if (e instanceof TypeError && typeof JSON.rawJSON === 'function') {
      return JSON.stringify(value, bigReplacer) ?? 'null';
    }
    throw e;
  }
}

/** A value from JSON text; integers beyond 2^53 - 1 become bigints. */
function fromJson(text) {
  return LONG_DIGITS.test(text) ? JSON.parse(text, bigReviver) : JSON.parse(text);
}

/** The current output's payload, decoded: JSON, MessagePack, or bytes as they are. */
function payloadOf(m) {
  const kind = m.payloadKind();
  return kind === 0 ? fromJson(m.payloadText()) : kind === 1 ? msgpack.decode(m.payloadBytes()) : m.payloadBytes();
}

/** A synced map's value, decoded: `kind` 0 JSON, 1 MessagePack. */
function mapValue(kind, bytes) {
  return kind === 0 ? fromJson(utf8.decode(bytes)) : msgpack.decode(bytes);
}

const strictUtf8 = new TextDecoder('utf-8', { fatal: true });
const toUtf8 = new TextEncoder();
// Bytes an HttpSocket holds for its next sends before it gives up.
const MAX_UNSENT = 16 << 20;

/**
 * A connection over the HTTP fallback (PROTOCOL.md, section 1.1), shaped
 * like a WebSocket for the driver. A request that fails or gets another
 * answer than expected ends it as a drop (1006), never repeated.
 */
class HttpSocket {
  readyState = 0;
  #url;
  #id;
  #wait;
  #max;
  #out = [];
  #unsent = 0;
  #sends = 0;
  #sending = false;
  #closing = null;
  #stop = new AbortController();

  constructor(url, hello) {
    this.#url = url;
    this.#run(hello).catch(() => this.#end(1006, '', false));
  }

  send(data) {
    const text = typeof data === 'string';
    if (this.readyState === 1) this.#queue(text ? 1 : 2, text ? toUtf8.encode(data) : data);
  }

  close(code, reason) {
    if (this.readyState === 1) {
      this.readyState = 2;
      this.#closing = [code, reason, true];
      this.#queue(8, new Uint8Array([code >> 8, code & 255, ...toUtf8.encode(reason)]));
    } else if (this.readyState === 0) this.#end(1006, '', false);
  }

  async #run(hello) {
    const open = hello === undefined ? '' : `&kitestring-hello=${encodeURIComponent(hello)}`;
    this.#take(await this.#fetch('POST', `kitestring-http=open${open}`, 200));
    for (let n = 0; this.readyState < 3; n++) {
      // A poll unanswered past the server's `wait`: the way is dead.
      const watchdog = setTimeout(() => this.#end(1006, '', false), this.#wait + 10000);
      const body = await this.#fetch('GET', `kitestring-http=${this.#id}&kitestring-n=${n}`, 200);
      clearTimeout(watchdog);
      this.#take(body);
    }
  }

  /** Records (kind, u32 length, payload): `open` (16) first, then text (1), binary (2), close (8). */
  #take(body) {
    const view = new DataView(body.buffer);
    for (let i = 0; i < body.length && this.readyState < 3;) {
      const kind = body[i];
      const end = i + 5 + view.getUint32(i + 1);
      if (end > body.length) throw new Error('a record cut short');
      const data = body.subarray(i + 5, end);
      i = end;
      if (this.readyState === 0) {
        const { id, wait, max } = kind === 16 ? JSON.parse(strictUtf8.decode(data)) : {};
        if (typeof id !== 'string' || !(wait >= 0 && max > 0)) break;
        [this.#id, this.#wait, this.#max, this.readyState] = [id, wait, max, 1];
        this.onopen();
      } else if (kind === 1) this.onmessage?.({ data: strictUtf8.decode(data) });
      else if (kind === 2) this.onmessage?.({ data });
      else if (kind === 8 && data.length > 1) this.#end((data[0] << 8) | data[1], strictUtf8.decode(data.subarray(2)), true);
      else throw new Error(`a record of kind ${kind}`);
    }
    if (this.readyState === 0) throw new Error('no open record');
  }

  #queue(kind, payload) {
    const r = new Uint8Array(5 + payload.length);
    r[0] = kind;
    new DataView(r.buffer).setUint32(1, payload.length);
    r.set(payload, 5);
    this.#out.push(r);
    this.#unsent += r.length;
    if (this.#unsent > MAX_UNSENT) this.#end(1006, '', false);
    else this.#flush();
  }

  /** Sends what was written since the last send: one record at least, `max` bytes at most. */
  async #flush() {
    if (this.#sending || !this.#out.length || this.readyState > 2) return;
    this.#sending = true;
    let n = 0;
    let size = 0;
    while (n < this.#out.length && (n === 0 || size + this.#out[n].length <= this.#max)) size += this.#out[n++].length;
    this.#unsent -= size;
    try {
      await this.#fetch('POST', `kitestring-http=${this.#id}&kitestring-n=${this.#sends++}`, 204, new Blob(this.#out.splice(0, n)));
    } catch {
      this.#end(1006, '', false);
      return;
    }
    this.#sending = false;
    if (this.#closing && !this.#out.length) this.#end(...this.#closing);
    else this.#flush();
  }

  async #fetch(method, query, status, body) {
    const url = new URL(this.#url);
    url.search += (url.search && '&') + query;
    // `text/plain`: no CORS preflight.
    const r = await fetch(url, {
      method, body, headers: { 'content-type': 'text/plain' }, credentials: 'include', signal: this.#stop.signal,
    });
    if (r.status !== status) throw new Error(`answered ${r.status}`);
    return new Uint8Array(await r.arrayBuffer());
  }

  /** Abandons what is under way; `onclose` follows, as a WebSocket's. */
  #end(code, reason, wasClean) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.#stop.abort();
    this.#out = [];
    queueMicrotask(() => this.onclose({ code, reason, wasClean }));
  }
}

function randomSeed() {
  const b = crypto.getRandomValues(new BigUint64Array(1));
  return b[0];
}

/**
 * Opens a session to `url` (`ws:`, `wss:`, or a path resolved against the
 * page) and returns the client at once; connecting goes on in the
 * background and is reported by events. Messages sent before the session
 * opens are queued.
 *
 * @param {string} url
 * @param {import('./kitestring.js').ConnectOptions} [options]
 */
export async function connect(url, options = {}) {
  await init(options.wasm);
  const client = new Client(url, options);
  client._start();
  return client;
}

/** A session with a Kitestring server. Events: see the type declarations. */
export class Client extends EventTarget {
  #m;
  #url;
  #opts;
  #clock;
  /** transport id -> WebSocket or HttpSocket */
  #sockets = new Map();
  /** the open connection's transport id, and what carries it */
  #live = 0;
  #transport = null;
  #probeTimer = null;
  /** transports waiting for the token provider */
  #pending = new Set();
  #timer = null;
  #timerAt = Infinity;
  #deadline = Infinity;
  #draining = false;
  /** message id -> { resolve, reject } for `send`, `publish`, `join`, `leave`, `respond` */
  #waiters = new Map();
  /** request id -> { resolve, reject } */
  #requests = new Map();
  #closeWaiters = [];
  #codec;
  /** event type -> listener count, so that no event is built for nobody */
  #listening = new Map();
  #members = new Map();
  /** the machine's options, as JSON */
  #config;
  /** where `surviveReload` keeps the session, or null */
  #saveKey = null;
  #restored = [];
  #unlisten = [];
  /** the page went away (`pagehide`) */
  #left = false;

  constructor(url, options = {}) {
    super();
    const { wasm, clock, token, tokenParam, requestTimeout, surviveReload, lifecycle, ...config } = options;
    this.#url = new URL(url, globalThis.location?.href);
    if (this.#url.protocol === 'http:') this.#url.protocol = 'ws:';
    if (this.#url.protocol === 'https:') this.#url.protocol = 'wss:';
    this.#opts = { token, tokenParam: tokenParam ?? 'token', requestTimeout: requestTimeout ?? 30000 };
    this.#clock = { ...pageClock, ...clock };
    this.#config = JSON.stringify({ ...config, canRefreshToken: !!token });
    this.#codec = (config.codecs ?? ['msgpack', 'json'])[0];
    if (surviveReload) {
      this.#saveKey = typeof surviveReload === 'string' ? surviveReload : `kitestring:${this.#url.href}`;
    }
    this.#m = this.#restore() ?? new Machine(this.#config, crypto.getRandomValues(new Uint8Array(16)), randomSeed());
    this.#wallClock();
    if (lifecycle !== false && typeof window !== 'undefined') this.#listen();
  }

  /** @internal */
  _start() {
    const now = this.#clock.now();
    if (globalThis.navigator?.onLine === false) this.#m.network(now, false);
    this.#m.connect(now);
    this.#drain();
  }

  /**
   * Ids of the messages a previous page (before a reload, with
   * `surviveReload`) had sent or queued and not seen acknowledged: each is
   * reported by an `acked` event, or lost in a `sessionlost` event.
   */
  get restored() { return this.#restored; }

  // ---- the page's lifecycle ------------------------------------------------

  /** A machine from the snapshot a previous page left, if there is one (read once). */
  #restore() {
    if (!this.#saveKey) return null;
    let saved = null;
    try {
      saved = sessionStorage.getItem(this.#saveKey);
      sessionStorage.removeItem(this.#saveKey);
    } catch {
      return null;
    }
    if (!saved) return null;
    try {
      const m = Machine.restore(this.#config, saved, randomSeed());
      this.#restored = JSON.parse(m.restored());
      return m;
    } catch (e) {
      globalThis.reportError?.(e);
      return null;
    }
  }

  #listen() {
    const on = (target, type, f) => {
      target.addEventListener(type, f);
      this.#unlisten.push(() => target.removeEventListener(type, f));
    };
    on(window, 'online', () => { this.#m.network(this.#clock.now(), true); this.#drain(); });
    on(window, 'offline', () => { this.#m.network(this.#clock.now(), false); this.#drain(); });
    // A hidden page's timers may have been held back: what is due runs now.
    on(document, 'visibilitychange', () => {
      if (document.visibilityState === 'visible') {
        this.#overdue(this.#clock.now());
        this.#drain();
      }
    });
    on(window, 'pagehide', () => this.#leave());
    on(window, 'pageshow', (e) => { if (e.persisted) this.#back(); });
  }

  /**
   * The page is going away. Without `surviveReload` the session ends now
   * (close 1000: the server lets the page's rooms know at once, instead of
   * keeping a member present for its grace period, as the 1001 the browser
   * would send makes it). With it, the session is kept in `sessionStorage`
   * and the connection abandoned with 4000: the next page resumes it.
   */
  #leave() {
    const now = this.#clock.now();
    const state = this.state;
    if (state === 'closed' || state === 'closing') return;
    if (this.#saveKey) {
      const snapshot = this.#m.suspend(now);
      try {
        sessionStorage.setItem(this.#saveKey, snapshot);
      } catch (e) {
        globalThis.reportError?.(e);
      }
    } else {
      this.#m.close(now);
    }
    this.#drain();
    this.#left = true;
  }

  /** The page came back from the back-forward cache: connect again. */
  #back() {
    if (!this.#left) return;
    this.#left = false;
    const restored = this.#restore();
    if (restored) {
      this.#m = restored;
      this.#wallClock();
    }
    this.#m.connect(this.#clock.now());
    this.#drain();
  }

  // ---- what the page asks ------------------------------------------------

  /** `disconnected`, `connecting`, `handshaking`, `open`, `reconnecting`, `closing`, `closed` or `failed`. */
  get state() { return this.#m.state(); }
  /** The session's id (32 hex digits), once one is open. */
  get session() { return this.#m.session() ?? null; }
  /** This client instance's id (32 hex digits). */
  get clientId() { return this.#m.clientId(); }
  /** What carries the open connection: `websocket`, `http` (the fallback), or null. */
  get transport() { return this.#transport; }
  /** The codec in use (`msgpack` or `json`), or the one preferred before a connection. */
  get codec() { return this.#m.codec() ?? this.#codec; }
  /** The latest heartbeat round trip in milliseconds, or null. */
  get rtt() { const r = this.#m.rtt(); return r < 0 ? null : r; }
  /** Messages waiting for the send window, and sent but not yet acknowledged. */
  get queued() { return this.#m.queued(); }
  get unacknowledged() { return this.#m.unacknowledged(); }
  /** Whether a message sent now goes out at once (no queue ahead, room in the window). */
  get hasRoom() { return this.#m.hasRoom(); }
  /** The rooms this client asked to be in. */
  get rooms() { return JSON.parse(this.#m.rooms()); }
  /** The machine's counters. */
  stats() { const s = JSON.parse(this.#m.stats()); delete s.type; return s; }
  /** The members of a room as its presence events told them: client id -> member. */
  members(room) { return new Map(this.#members.get(room) ?? []); }

  // ---- sending -----------------------------------------------------------

  /**
   * Sends a value for exactly-once, in-order delivery. Returns a promise
   * that resolves (with the message's id) when the server acknowledged it,
   * and rejects with a `SendError` (not taken), `RefusedError` (the server
   * would not accept it) or `LostError` (its session was lost or closed).
   * The promise's `id` property is the message's id.
   */
  send(value, options) {
    return this.#tracked(() => {
      this.#stage(value, options?.binary);
      return this.#m.send(this.#clock.now(), options?.timestamp ?? -1);
    });
  }

  /** Like `send`, without a promise: returns the id (0 if not taken; see `send`'s errors as events). */
  post(value, options) {
    this.#stage(value, options?.binary);
    const id = this.#m.send(this.#clock.now(), options?.timestamp ?? -1);
    if (id === 0) throw this.#error();
    this.#drain();
    return id;
  }

  /** Sends bytes as they are (an opaque payload). */
  sendBytes(bytes) {
    return this.send(bytes, { binary: true });
  }

  /** Joins a room; resolves when the server has the join (its presence snapshot follows as a `presence` event). */
  join(room) {
    return this.#tracked(() => this.#m.join(this.#clock.now(), room));
  }

  /** Leaves a room. */
  leave(room) {
    this.#members.delete(room);
    return this.#tracked(() => this.#m.leave(this.#clock.now(), room));
  }

  /** Publishes a value to every other member of a room this client joined. */
  publish(room, value, options) {
    return this.#tracked(() => {
      this.#stage(value, options?.binary);
      return this.#m.publish(this.#clock.now(), room);
    });
  }

  /**
   * Sends a request; resolves with the response's value (rejects with a
   * `RequestError`, `SendError` or `RefusedError`). `options.timeout` in
   * milliseconds (default `requestTimeout`, 30 s). The promise's `id` is
   * the request's id; pass it to `cancelRequest`.
   */
  request(value, options) {
    let id = 0;
    const p = new Promise((resolve, reject) => {
      try {
        this.#stage(value, options?.binary);
        id = this.#m.request(this.#clock.now(), options?.timeout ?? this.#opts.requestTimeout);
        if (id === 0) { reject(this.#error()); return; }
        this.#requests.set(id, { resolve, reject });
      } catch (e) {
        reject(e);
      }
    });
    p.id = id;
    this.#drain();
    return p;
  }

  /** Stops waiting for a request; its promise rejects with `cancelled`. */
  cancelRequest(id) {
    const pending = this.#m.cancelRequest(this.#clock.now(), id);
    const w = this.#requests.get(id);
    if (w) {
      this.#requests.delete(id);
      w.reject(new RequestError(id, 'cancelled'));
    }
    this.#drain();
    return pending;
  }

  /** Answers a server's request (the message event, or its id). */
  respond(request, value, options) {
    const id = typeof request === 'object' ? request.id : BigInt(request);
    return this.#tracked(() => {
      this.#stage(value, options?.binary);
      return this.#m.respond(this.#clock.now(), id);
    });
  }

  /**
   * Sends the latest value for `key` (a cursor, a position): at most one
   * message per key per coalescing interval (60 a second by default), the
   * newest value replacing any that waited, and the last one always sent.
   * Throws a `SendError` if it cannot be taken.
   */
  sendLatest(key, value, options) {
    this.#stage(value, options?.binary);
    const ok = this.#m.sendLatest(this.#clock.now(), key);
    if (!ok) throw this.#error();
    this.#drain();
  }

  /**
   * Sends bytes as a datagram: no ordering, no acknowledgment, lost if the
   * connection drops. Only while open; throws a `SendError` otherwise.
   */
  sendDatagram(bytes) {
    const ok = this.#m.sendDatagram(this.#clock.now(), bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes));
    if (!ok) throw this.#error();
    this.#drain();
  }

  // ---- synced maps --------------------------------------------------------

  /**
   * Sets `key` of `room`'s synced map `map` to `value` (any value the
   * codec carries; bytes are refused). It reads back at once (`mapGet`,
   * and a `mapchanged` event if that changed what it reads as) and goes to
   * the server as a message of the session, queued while offline. Returns
   * a promise like `publish`'s: it resolves with the write's id when the
   * server acknowledged it, and rejects with a `SendError` (not taken:
   * `not_member` before joining the room, `bad_key`, ...), a
   * `RefusedError` (op `mset`; the key then reads as the server has it
   * again) or a `LostError`.
   */
  mapSet(room, map, key, value) {
    return this.#tracked(() => {
      this.#stage(value);
      this.#m.mapKey(room, map, key);
      return this.#m.mapSet(this.#clock.now());
    });
  }

  /** Deletes `key` of `room`'s synced map `map`, as `mapSet` writes. */
  mapDelete(room, map, key) {
    return this.#tracked(() => {
      this.#m.mapKey(room, map, key);
      return this.#m.mapDelete(this.#clock.now());
    });
  }

  /**
   * What `key` of `room`'s synced map `map` reads as now, decoded: this
   * page's newest unsettled write of it, else what the server confirmed;
   * `undefined` if it holds nothing.
   */
  mapGet(room, map, key) {
    this.#m.mapKey(room, map, key);
    const v = this.#m.mapGet();
    return v === undefined ? undefined : mapValue(v[0], v.subarray(1));
  }

  /** Every entry of `room`'s synced map `map` as it reads now, decoded: key -> value, in key order. */
  mapEntries(room, map) {
    this.#m.mapKey(room, map, '');
    const b = this.#m.mapEntries();
    const view = new DataView(b.buffer, b.byteOffset, b.byteLength);
    const entries = new Map();
    for (let i = 0; i < b.length;) {
      const keyEnd = i + 4 + view.getUint32(i, true);
      const key = utf8.decode(b.subarray(i + 4, keyEnd));
      const valueEnd = keyEnd + 5 + view.getUint32(keyEnd + 1, true);
      entries.set(key, mapValue(b[keyEnd], b.subarray(keyEnd + 5, valueEnd)));
      i = valueEnd;
    }
    return entries;
  }

  /**
   * Whether `room`'s synced map `map` was received whole on the current
   * session (a `mapsynced` event since it opened or resumed); until then
   * it may be out of date.
   */
  mapSynced(room, map) {
    this.#m.mapKey(room, map, '');
    return this.#m.mapSynced();
  }

  /** Connects again now (skipping a backoff delay, or starting again after `failed`). */
  reconnect() {
    this.#m.reconnect(this.#clock.now());
    this.#drain();
  }

  /**
   * Ends the session (close 1000). Unacknowledged messages are reported in
   * a `sessionlost` event and their promises reject. Resolves once closed.
   */
  close() {
    for (const f of this.#unlisten.splice(0)) f();
    const p = new Promise((resolve) => {
      if (this.state === 'closed') { resolve(); return; }
      this.#closeWaiters.push(resolve);
    });
    if (!this.#m.close(this.#clock.now())) this.#settleClose();
    this.#drain();
    return p;
  }

  /** Like addEventListener; returns a function that removes the listener. */
  on(type, listener) {
    this.addEventListener(type, listener);
    return () => this.removeEventListener(type, listener);
  }

  addEventListener(type, listener, options) {
    super.addEventListener(type, listener, options);
    this.#listening.set(type, (this.#listening.get(type) ?? 0) + 1);
  }

  removeEventListener(type, listener, options) {
    super.removeEventListener(type, listener, options);
    const n = (this.#listening.get(type) ?? 1) - 1;
    if (n > 0) this.#listening.set(type, n); else this.#listening.delete(type);
  }

  // ---- the driver ----------------------------------------------------------

  #stage(value, binary) {
    let ok;
    if (binary) {
      ok = this.#m.stageBytes(2, value instanceof Uint8Array ? value : new Uint8Array(value));
    } else if (this.codec === 'json') {
      ok = this.#m.stageJson(toJson(value));
    } else {
      ok = this.#m.stageBytes(1, msgpack.encode(value));
    }
    if (!ok) throw this.#error();
  }

  #error() {
    const e = JSON.parse(this.#m.lastError());
    return new SendError(e);
  }

  /** Runs a command that returns an id; the promise settles when the id is acknowledged. */
  #tracked(command) {
    let id = 0;
    const p = new Promise((resolve, reject) => {
      try {
        id = command();
      } catch (e) {
        reject(e);
        return;
      }
      if (id === 0) reject(this.#error());
      else this.#waiters.set(id, { resolve, reject });
    });
    p.id = id;
    this.#drain();
    return p;
  }

  /** The page's wall clock, for the stamps of synced-map writes. */
  #wallClock() {
    this.#m.setWallClock(this.#clock.now(), Date.now());
  }

  #wants(type) {
    return this.#listening.has(type);
  }

  #emit(type, fields) {
    if (this.#wants(type)) this.#dispatch(new KitestringEvent(type, fields));
  }

  #dispatch(event) {
    try {
      this.dispatchEvent(event);
    } catch (e) {
      // A listener's exception is the page's, not the driver's.
      globalThis.reportError?.(e);
    }
  }

  /** Carries out every output of the machine, in order, then arms the timer. */
  #drain() {
    if (this.#draining) return;
    this.#draining = true;
    const m = this.#m;
    try {
      for (let kind = m.poll(); kind !== NONE; kind = m.poll()) {
        switch (kind) {
          case TEXT: this.#write(m.transport(), m.textOut()); break;
          case BINARY: this.#write(m.transport(), m.bytesOut()); break;
          case MESSAGE: this.#message(m); break;
          case ACKED: this.#acked(m.first(), m.last()); break;
          case RESPONSE: this.#response(m); break;
          case DATAGRAM:
            if (this.#wants('datagram')) {
              this.#dispatch(new KitestringEvent('datagram', { data: m.payloadBytes() }));
            }
            break;
          case LATEST:
            if (this.#wants('latest')) {
              this.#dispatch(new KitestringEvent('latest', { room: m.room(), key: m.key(), data: payloadOf(m) }));
            }
            break;
          case MAP_CHANGED:
            if (this.#wants('mapchanged')) {
              const deleted = m.deleted();
              this.#dispatch(new KitestringEvent('mapchanged', {
                room: m.room(), map: m.map(), key: m.key(), data: deleted ? undefined : payloadOf(m), deleted,
              }));
            }
            break;
          case MAP_SYNCED:
            if (this.#wants('mapsynced')) this.#dispatch(new KitestringEvent('mapsynced', { room: m.room(), map: m.map() }));
            break;
          case CONNECT:
            this.#wallClock();
            this.#open(m.transport());
            break;
          case DISCONNECT: this.#close(m.transport(), m.code(), m.reason()); break;
          case EVENT: this.#event(JSON.parse(m.eventJson())); break;
          default: break;
        }
      }
    } finally {
      this.#draining = false;
    }
    this.#arm();
  }

  #arm() {
    const d = this.#m.deadline();
    this.#deadline = d < 0 ? Infinity : d;
    // A timer already armed for this deadline or an earlier one will do,
    // and so does the end of this turn: when it fires, the next one is armed.
    if (this.#timer === TURN) return;
    if (this.#timer !== null && this.#timerAt <= this.#deadline) return;
    if (this.#timer !== null) this.#clock.clearTimeout(this.#timer);
    this.#timer = null;
    this.#timerAt = Infinity;
    if (d < 0) return;
    this.#timerAt = d;
    const wake = () => {
      this.#timer = null;
      this.#timerAt = Infinity;
      this.#m.timeout(this.#clock.now());
      this.#drain();
    };
    const wait = d - this.#clock.now();
    if (wait <= 0) {
      this.#timer = TURN;
      this.#clock.endOfTurn(wake);
    } else {
      this.#timer = this.#clock.setTimeout(wake, wait);
    }
  }

  /**
   * After an input: timers a throttled page held back run now. What is
   * due at the end of this turn waits for it: a burst of messages is
   * answered in one frame.
   */
  #overdue(now) {
    if (this.#timer !== TURN && now >= this.#deadline) this.#m.timeout(now);
  }

  #open(tid) {
    // The hello travels in the URL (a page can set no request header and
    // read no response header): the server answers with its first frame.
    const hello = this.#m.urlHello(tid);
    this.#pending.add(tid);
    this.#credential(
      (url) => {
        if (this.#pending.delete(tid)) this.#socket(tid, url, hello);
      },
      (e) => {
        if (!this.#pending.delete(tid)) return;
        this.#m.failed(this.#clock.now(), tid, `token provider: ${e?.message ?? e}`);
        this.#drain();
      },
    );
  }

  /** The URL, with a fresh credential (a short-lived ticket) if there is a token provider. */
  #credential(then, failed) {
    const provider = this.#opts.token;
    const url = new URL(this.#url);
    if (!provider) {
      then(url);
      return;
    }
    Promise.resolve()
      .then(provider)
      .then((token) => {
        if (token != null) url.searchParams.set(this.#opts.tokenParam, token);
        then(url);
      }, failed);
  }

  #socket(tid, url, hello) {
    const http = new URL(url);
    http.protocol = url.protocol === 'wss:' ? 'https:' : 'http:';
    const fallBack = () => new HttpSocket(http, hello);
    // 0: a WebSocket; 1: one that may fall back; 2: HTTP.
    const first = this.#m.transportFirst(this.#clock.now());
    if (first === 2) {
      this.#attach(tid, fallBack());
      return;
    }
    if (hello !== undefined) url.searchParams.set('kitestring-hello', hello);
    let ws;
    try {
      ws = new WebSocket(url.href);
    } catch (e) {
      queueMicrotask(() => {
        this.#m.failed(this.#clock.now(), tid, String(e?.message ?? e));
        this.#drain();
      });
      return;
    }
    ws.binaryType = 'arraybuffer';
    this.#attach(tid, ws, first && fallBack);
  }

  /** `fallBack` makes the fallback for a WebSocket failing before it opens; `failure`: that WebSocket's close. */
  #attach(tid, ws, fallBack, failure) {
    const http = ws instanceof HttpSocket;
    let opened = false;
    this.#sockets.set(tid, ws);
    ws.onopen = () => {
      opened = true;
      const now = this.#clock.now();
      // A WebSocket went through, or one failed where HTTP goes.
      if (!http || failure) this.#m.transportBlocked(now, http);
      this.#live = tid;
      this.#carried(http ? 'http' : 'websocket');
      this.#m.opened(now, tid);
      this.#drain();
    };
    ws.onmessage = (e) => {
      const now = this.#clock.now();
      const data = e.data;
      if (typeof data === 'string') this.#m.text(now, tid, data);
      else this.#m.binary(now, tid, new Uint8Array(data));
      this.#overdue(now);
      this.#drain();
    };
    ws.onclose = (e) => {
      const current = this.#sockets.get(tid) === ws;
      if (current) this.#sockets.delete(tid);
      // A page sees no status: the fallback's `open` tells whether it was blocked.
      if (current && !opened && fallBack) {
        this.#attach(tid, fallBack(), null, e);
        return;
      }
      this.#dropped(tid);
      const c = failure && !opened ? failure : e;
      this.#m.closed(this.#clock.now(), tid, c.code, c.reason, c.wasClean);
      this.#drain();
    };
  }

  /** `tid` carries the session no more (closed, or being closed). */
  #dropped(tid) {
    if (this.#live !== tid) return;
    this.#live = 0;
    this.#carried(null);
  }

  /** While HTTP carries the connection, WebSocket is probed when due. */
  #carried(transport) {
    if (this.#transport === transport) return;
    this.#transport = transport;
    this.#probeSoon();
    this.#emit('transportchange', { transport });
  }

  #probeSoon() {
    if (this.#probeTimer !== null) this.#clock.clearTimeout(this.#probeTimer);
    this.#probeTimer = null;
    const at = this.#transport === 'http' ? this.#m.probeAt() : -1;
    if (at >= 0) this.#probeTimer = this.#clock.setTimeout(() => this.#probe(), at - this.#clock.now());
  }

  /** A bare WebSocket, closed once open; if it opens, the session moves to a WebSocket. */
  #probe() {
    this.#probeTimer = null;
    // None again for a while.
    this.#m.transportBlocked(this.#clock.now(), true);
    const done = (passed) => {
      const now = this.#clock.now();
      this.#m.transportBlocked(now, !passed);
      if (passed && this.#transport === 'http') this.#m.reconnect(now);
      this.#probeSoon();
      this.#drain();
    };
    this.#credential((url) => {
      try {
        const ws = new WebSocket(url.href);
        ws.onopen = () => {
          ws.onclose = null;
          ws.close(1000, 'probe');
          done(true);
        };
        ws.onclose = () => done(false);
      } catch {
        done(false);
      }
    }, () => done(false));
  }

  #write(tid, data) {
    const ws = this.#sockets.get(tid);
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(data);
  }

  #close(tid, code, reason) {
    const ws = this.#sockets.get(tid);
    this.#sockets.delete(tid); // no fallback
    this.#pending.delete(tid);
    this.#dropped(tid);
    if (!ws) {
      // Never opened: its close is done.
      queueMicrotask(() => {
        this.#m.closed(this.#clock.now(), tid, code, '', true);
        this.#drain();
      });
      return;
    }
    ws.onmessage = null;
    try {
      ws.close(code, reason);
    } catch {
      ws.close();
    }
  }

  #message(m) {
    if (!this.#wants('message')) return;
    const e = new KitestringMessageEvent(this, 'message');
    e.data = payloadOf(m);
    e.room = m.room() ?? null;
    e.id = m.messageId();
    e.seq = m.seq();
    const ts = m.timestamp();
    e.timestamp = ts < 0 ? null : ts;
    e.request = m.isRequest();
    this.#dispatch(e);
  }

  #response(m) {
    const id = m.requestId();
    const w = this.#requests.get(id);
    if (!w) return;
    this.#requests.delete(id);
    try {
      w.resolve(payloadOf(m));
    } catch (e) {
      w.reject(e);
    }
  }

  #acked(first, last) {
    const waiters = this.#waiters;
    if (waiters.size > 0) {
      for (let id = first; id <= last; id++) {
        const w = waiters.get(id);
        if (w) {
          waiters.delete(id);
          w.resolve(id);
        }
      }
    }
    this.#emit('acked', { first, last });
  }

  #reject(id, error) {
    const w = this.#waiters.get(id);
    if (w) {
      this.#waiters.delete(id);
      w.reject(error);
    }
  }

  #event(e) {
    const type = e.type;
    delete e.type;
    switch (type) {
      case 'statechange':
        if (e.state === 'closed' || e.state === 'failed') {
          for (const id of [...this.#waiters.keys()]) this.#reject(id, new LostError(id, 'closed', null, true));
          for (const [id, w] of this.#requests) w.reject(new RequestError(id, 'closed'));
          this.#requests.clear();
          this.#settleClose();
        }
        break;
      case 'connected':
        this.#emit('open', e);
        return;
      case 'presence':
        this.#presence(e);
        break;
      case 'refused':
        if (e.id !== null) this.#reject(e.id, new RefusedError(e));
        break;
      case 'sessionlost':
        for (const id of e.unconfirmed) this.#reject(id, new LostError(id, e.reason, e.detail, true));
        for (const id of e.unsent) this.#reject(id, new LostError(id, e.reason, e.detail, false));
        break;
      case 'requestfailed': {
        const w = this.#requests.get(e.request);
        if (w) {
          this.#requests.delete(e.request);
          w.reject(new RequestError(e.request, e.error));
        }
        break;
      }
      case 'sendfailed':
        this.#reject(e.id, new SendError(e.error));
        break;
      case 'missed':
        e.from = BigInt(e.from);
        if (e.to !== null) e.to = BigInt(e.to);
        break;
      case 'tokenexpiring':
        this.#refreshToken();
        break;
      default:
        break;
    }
    this.#emit(type, e);
  }

  #presence(e) {
    let members = this.#members.get(e.room);
    if (e.snapshot || !members) {
      members = new Map();
      this.#members.set(e.room, members);
    }
    for (const m of e.left) members.delete(m.client);
    for (const m of e.joined) members.set(m.client, m);
  }

  #refreshToken() {
    const provider = this.#opts.token;
    if (!provider) return;
    Promise.resolve()
      .then(() => provider())
      .then((token) => {
        if (typeof token === 'string') {
          this.#m.sendToken(this.#clock.now(), token);
          this.#drain();
        }
      })
      .catch((e) => globalThis.reportError?.(e));
  }

  #settleClose() {
    const waiters = this.#closeWaiters;
    this.#closeWaiters = [];
    for (const resolve of waiters) resolve();
  }
}

export { msgpack };
