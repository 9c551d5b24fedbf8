// Type declarations for the Kitestring browser package (kitestring.js).
//
// Numbers: ids of this client's own messages and requests are `number`s
// (assigned here from 1 upwards: exact far beyond any page's life). Numbers
// the server assigns (its message ids, room stream offsets) are `bigint`s,
// so none loses precision. In payloads, JSON integers beyond 2^53 - 1 arrive
// as `bigint`s, and `bigint`s are sent as exact JSON integers; MessagePack
// 64-bit integers beyond that range arrive as `bigint`s too.

/** Milliseconds. */
export type Millis = number;

export type State =
  | 'disconnected' | 'connecting' | 'handshaking' | 'open'
  | 'reconnecting' | 'closing' | 'closed' | 'failed';

export type Codec = 'msgpack' | 'json';

/** What carries a connection: a WebSocket, or the HTTP fallback (PROTOCOL.md, section 1.1). */
export type Transport = 'websocket' | 'http';

/** The page's clock and timer, replaceable (tests slow them down to model a hidden tab). */
export interface Clock {
  now(): number;
  setTimeout(callback: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
  /** Runs the callback once the event loop's current turn is over (default: a `MessageChannel` task). */
  endOfTurn(callback: () => void): void;
}

export interface ConnectOptions {
  /** Codecs offered, preferred first. Default `['msgpack', 'json']`. */
  codecs?: Codec[];
  /** Heartbeat: ping interval, pong timeout, grace. Defaults 20 000, 10 000, 1 000 (the server's welcome overrides the first two). */
  heartbeat?: { interval?: Millis; timeout?: Millis; grace?: Millis };
  /** Reconnect backoff. Defaults: base 1 000, factor 2, max 30 000, jitter 0.5, maxAttempts 10 (`null`: for ever). */
  backoff?: { base?: Millis; factor?: number; max?: Millis; jitter?: 'none' | 'full' | number; maxAttempts?: number | null };
  /** From "open a socket" to the welcome. Default 10 000. */
  connectTimeout?: Millis;
  /** How long a connection must last before the attempt count resets. Default 10 000. */
  stabilityWindow?: Millis;
  /** Least wait after "try again later" without a hint. Default 10 000. */
  tryLaterDelay?: Millis;
  /** Cap on a server's retry hint. Default 300 000. */
  maxRetryAfter?: Millis;
  /** How long `close()` waits for the socket. Default 5 000. */
  closeTimeout?: Millis;
  /** Messages waiting while offline or while the window is full. Defaults 100 messages, 1 MiB. */
  queue?: { maxMessages?: number; maxBytes?: number };
  /** Send window and acknowledgments. */
  reliability?: {
    windowMessages?: number; windowBytes?: number; ackDelay?: Millis; ackEvery?: number;
    ackTimeout?: Millis; overflow?: 'refuse' | 'failSession';
  };
  /** Largest message accepted. Default 1 MiB. */
  maxMessageSize?: number;
  /** Undecodable frames in a row before a `resync` event. Default 3. */
  maxDecodeFailures?: number;
  /** Extra capabilities announced in the hello. */
  capabilities?: string[];
  /** Take room broadcasts as room streams. Default true. */
  roomStreams?: boolean;
  /**
   * Batching of small messages into one frame. Default (and `true`): a
   * message sent while nothing else is unacknowledged goes out at once;
   * what the page sends behind messages still in flight within one turn of
   * the event loop leaves in one frame at the end of that turn (`window` 0,
   * at most 64 messages and 64 KiB a frame); `false`: every message in a
   * frame of its own, at once; an object: a window in milliseconds and
   * limits.
   */
  batch?: boolean | { window?: Millis; maxMessages?: number; maxBytes?: number };
  /** `sendLatest` pacing per key. Default 1000/60. */
  coalesceInterval?: Millis;
  /** Keys `sendLatest` tracks at once. Default 1024. */
  coalesceKeys?: number;
  /** Requests waiting for a response at once. Default 1024. */
  maxPendingRequests?: number;
  /** Default timeout of `request`. Default 30 000. */
  requestTimeout?: Millis;
  /**
   * Fetches a credential before every connection attempt (a short-lived
   * ticket, say), put in the URL's query as `tokenParam`, and again when the
   * server asks for re-authentication.
   */
  token?: () => string | null | Promise<string | null>;
  /** The query parameter that carries the token. Default `token`. */
  tokenParam?: string;
  /**
   * Keep the session across a reload of the page: on `pagehide` the session
   * (its unacknowledged and queued messages included) goes to
   * `sessionStorage` under this key (`true`: a key made from the URL), and
   * the next page's client with the same option resumes it; nothing sent or
   * received is lost. Without it, a page that goes away ends its session at
   * once (close 1000), so the server does not keep it present in its rooms.
   * The saved session holds its resume key: use it only where scripts of
   * the same origin are trusted.
   */
  surviveReload?: boolean | string;
  /**
   * The transports a connection may take. `auto` (the default): a
   * WebSocket, and where one fails before it opens and the HTTP fallback's
   * `open` (same URL, plain requests with `fetch`, cookies included) then
   * succeeds, the fallback: upgrades are blocked on the way (a proxy), and
   * connections go over HTTP for `fallbackMemory`; meanwhile a bare
   * WebSocket tests the way now and then, and once one opens the session
   * moves back to a WebSocket (nothing lost or repeated either way).
   * `websocket`: never the fallback; `http`: only the fallback. A page
   * carried by the fallback that goes away leaves its session detached
   * (kept for the server's grace period) rather than ended at once: the
   * browser abandons the page's poll before a close could be read.
   */
  transports?: 'auto' | 'websocket' | 'http';
  /** How long a block of WebSocket upgrades is remembered before one is tried again. Default 120 000. */
  fallbackMemory?: Millis;
  /** Listen to the page's `online`, `offline`, `visibilitychange`, `pagehide` and `pageshow`. Default true. */
  lifecycle?: boolean;
  /**
   * Ask the server to ping this client (default true): a hidden tab's timers
   * may run once a minute, but its message handler runs at once, so the
   * session survives a tab hidden for any time.
   */
  serverPings?: boolean;
  /** Where the WebAssembly module is, when not beside kitestring.js. */
  wasm?: string | URL | Response | BufferSource | WebAssembly.Module;
  /** Replaces the page's clock and timer. */
  clock?: Partial<Clock>;
}

/** Every error this package reports; `kind` names it for programs. */
export class KitestringError extends Error {
  readonly kind: string;
}

/** A message the client would not take: `queue_full`, `too_large`, `not_connected`, `not_open`, `session_failed`, `bad_room`, `too_many_requests`, `payload`; for synced-map writes also `not_member` (the room is not joined), `bad_key` (a map name or key not 1 to 256 bytes) and `unsupported` (bytes as a value). */
export class SendError extends KitestringError {}

/** The server refused a message. `op` names what was refused (`join`, `publish`, `mset` for a synced-map write, ...); `code`: `invalid`, `rate_limited`, `not_member`, `forbidden`, `room_full`, `too_many_rooms`, or for a synced-map write `read_only`, `no_map`, `map_full`, `forbidden`, `clock_drift`, `bad_value`, ... */
export class RefusedError extends KitestringError {
  readonly id: number | null;
  readonly room: string | null;
  readonly op: string;
  readonly reason: string;
  readonly code: string | null;
}

/** A message whose session was lost or closed: `unconfirmed` if it was sent (it may have arrived), otherwise it never left. */
export class LostError extends KitestringError {
  readonly id: number;
  readonly reason: 'not_resumed' | 'closed' | 'overflow' | 'inconsistent' | string;
  readonly detail: string | null;
  readonly unconfirmed: boolean;
}

/** A request without a response: `kind` is `timed_out`, `session_lost`, `closed` or `cancelled`. */
export class RequestError extends KitestringError {
  readonly request: number;
}

/** A promise for an acknowledgment, with the message's id. */
export type Sent = Promise<number> & { readonly id: number };

export class KitestringMessageEvent<T = unknown> extends Event {
  readonly client: Client;
  /** The decoded payload (a `Uint8Array` for opaque bytes). */
  readonly data: T;
  /** The room it was broadcast in, or null. */
  readonly room: string | null;
  /** The server's id for it (for a room stream entry, its offset). */
  readonly id: bigint;
  /** Its sequence number, or its offset in its room's stream. */
  readonly seq: bigint;
  /** The sender's wall-clock timestamp in milliseconds, if it set one. */
  readonly timestamp: number | null;
  /** Whether the server expects a response. */
  readonly request: boolean;
  respond(value: unknown): Sent;
}

export interface Member { client: string; identity?: string }

export interface Cause { type: string; code?: number; reason?: string; status?: number; retryAfter?: Millis }

export interface Failure { type: string; attempts?: number; last?: Cause; code?: number; reason?: string; status?: number }

export interface KitestringEventMap {
  message: KitestringMessageEvent;
  /** Every state change. `attempt`, `at` and `cause` while reconnecting; `code` once closed; `failure` once failed. */
  statechange: Event & { old: State; state: State; attempt?: number; at?: Millis; cause?: Cause; code?: number; failure?: Failure };
  /** A session opened or resumed. `recovered`: resumed by a server that took the session up after the one holding it was lost; what that server had sent and this page never received may be gone (ask for fresh state). */
  open: Event & { session: string; resumed: boolean; recovered: boolean; version: number; codec: Codec };
  presence: Event & { room: string; snapshot: boolean; joined: Member[]; left: Member[] };
  /** A session was given up: `unconfirmed` were sent and may not have arrived; `unsent` never left. */
  sessionlost: Event & { reason: string; detail: string | null; unconfirmed: number[]; unsent: number[] };
  refused: Event & { id: number | null; room: string | null; op: string; reason: string; code: string | null };
  /** Entries of a room's stream this client will never get (`to` null: unknown how many). */
  missed: Event & { room: string; from: bigint; to: bigint | null };
  acked: Event & { first: number; last: number };
  datagram: Event & { data: Uint8Array };
  /** A room's newest value of a key (the server's `broadcast_latest`): it supersedes every earlier value of the key; each comes once, and after a reconnect the server sends every key's newest. */
  latest: Event & { room: string; key: string; data: unknown };
  /**
   * What an entry of a synced map reads as changed: the server sent a
   * change or a snapshot, this page wrote it, or one of its writes was
   * settled the other way (refused, or overtaken). `deleted`: it holds
   * nothing now, and `data` is `undefined` (a value of JSON `null` is
   * `data: null, deleted: false`).
   */
  mapchanged: Event & { room: string; map: string; key: string; data: unknown; deleted: boolean };
  /** A synced map's snapshot arrived whole, after the `mapchanged` events it caused: the map is in step with the server's (on a join and on every new connection). */
  mapsynced: Event & { room: string; map: string };
  /** Entries of a synced map were not kept: the client holds its most entries already; the map reads incomplete. */
  mapoverflow: Event & { room: string; map: string };
  requestfailed: Event & { request: number; error: string };
  lateresponse: Event & { request: number };
  sendfailed: Event & { id: number; error: { error: string; message: string } };
  latestfailed: Event & { key: string; error: { error: string; message: string } };
  tokenexpiring: Event & { within: Millis };
  rtt: Event & { rtt: Millis };
  decodefailed: Event & { error: string };
  resync: Event;
  /** What carries the open connection changed: a connection opened on a WebSocket or the HTTP fallback, or closed (null). */
  transportchange: Event & { transport: Transport | null };
}

export class Client extends EventTarget {
  readonly state: State;
  readonly session: string | null;
  readonly clientId: string;
  readonly codec: Codec;
  /** What carries the open connection: `websocket`, `http` (the fallback), or null while none is open. */
  readonly transport: Transport | null;
  readonly rtt: Millis | null;
  readonly queued: number;
  readonly unacknowledged: number;
  readonly hasRoom: boolean;
  readonly rooms: string[];
  /** Ids of messages a previous page (`surviveReload`) left unacknowledged: each gets an `acked` or `sessionlost` event. */
  readonly restored: number[];
  stats(): Record<string, number>;
  members(room: string): Map<string, Member>;

  send(value: unknown, options?: { binary?: boolean; timestamp?: number }): Sent;
  post(value: unknown, options?: { binary?: boolean; timestamp?: number }): number;
  sendBytes(bytes: Uint8Array | ArrayBuffer): Sent;
  join(room: string): Sent;
  leave(room: string): Sent;
  publish(room: string, value: unknown, options?: { binary?: boolean }): Sent;
  request<T = unknown>(value: unknown, options?: { timeout?: Millis; binary?: boolean }): Promise<T> & { readonly id: number };
  cancelRequest(id: number): boolean;
  respond(request: KitestringMessageEvent | bigint | number, value: unknown, options?: { binary?: boolean }): Sent;
  sendLatest(key: string, value: unknown, options?: { binary?: boolean }): void;
  sendDatagram(bytes: Uint8Array | ArrayBuffer): void;

  /**
   * Sets `key` of `room`'s synced map `map` (a room this client joined):
   * reads back at once, goes to the server as a message of the session
   * (queued while offline). Resolves with the write's id once the server
   * acknowledged it; rejects with a `SendError`, a `RefusedError` (op
   * `mset`: the key reads as the server has it again) or a `LostError`.
   */
  mapSet(room: string, map: string, key: string, value: unknown): Sent;
  /** Deletes `key` of `room`'s synced map `map`, as `mapSet` writes. */
  mapDelete(room: string, map: string, key: string): Sent;
  /** What `key` reads as now, decoded (this page's unsettled write first); `undefined` if it holds nothing. */
  mapGet<T = unknown>(room: string, map: string, key: string): T | undefined;
  /** Every entry as it reads now, decoded, in key order. */
  mapEntries<T = unknown>(room: string, map: string): Map<string, T>;
  /** Whether the map was received whole on the current session (a `mapsynced` event since it opened or resumed). */
  mapSynced(room: string, map: string): boolean;
  reconnect(): void;
  close(): Promise<void>;

  on<K extends keyof KitestringEventMap>(type: K, listener: (event: KitestringEventMap[K]) => void): () => void;
  addEventListener<K extends keyof KitestringEventMap>(type: K, listener: (event: KitestringEventMap[K]) => void, options?: boolean | AddEventListenerOptions): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
  removeEventListener<K extends keyof KitestringEventMap>(type: K, listener: (event: KitestringEventMap[K]) => void, options?: boolean | EventListenerOptions): void;
  removeEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | EventListenerOptions): void;
}

/** Loads the WebAssembly module (`connect` does it). */
export function init(wasm?: ConnectOptions['wasm']): Promise<unknown>;

/** Opens a session to `url` and returns the client at once; connecting is reported by events. */
export function connect(url: string | URL, options?: ConnectOptions): Promise<Client>;

export namespace msgpack {
  function encode(value: unknown): Uint8Array;
  function decode(bytes: Uint8Array): unknown;
}
