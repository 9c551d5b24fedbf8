//! Kitestring in the browser: the core's client machine
//! ([`kitestring_core::client::Client`]), compiled to WebAssembly, for the
//! JavaScript driver in `js/` to drive.
//!
//! The split is the one every Kitestring driver has. This crate owns the
//! protocol: it is a thin binding of the same machine the conformance suite
//! proves, and adds nothing to its decisions. The JavaScript driver owns
//! what the page owns: the `WebSocket`, the clock (`performance.now()`),
//! timers, random bytes (`crypto.getRandomValues`), the page's lifecycle and
//! the application's values; it moves bytes, time and events across and
//! decides nothing about the protocol. The machine never reads a clock:
//! every call takes `now`, milliseconds on the driver's monotonic clock.
//!
//! # The loop the driver runs
//!
//! ```text
//! machine = new Machine(optionsJson, clientId, seed)
//! machine.connect(now)
//! after every input or command:
//!     while ((kind = machine.poll()) !== NONE)   // outputs, in order
//!         read the current output with the accessors, carry it out
//!     arm one timer for machine.deadline(); when it fires: machine.timeout(now)
//! ```
//!
//! A connection is carried by a `WebSocket` or by the HTTP fallback
//! (PROTOCOL.md, section 1.1), which the machine cannot tell apart. Which
//! one a `CONNECT` takes, whether a failed `WebSocket` may fall back, and
//! when a page on the fallback tests WebSocket again is the core's
//! [`TransportChoice`], kept here beside the machine
//! ([`Machine::transport_first`], [`Machine::transport_blocked`],
//! [`Machine::probe_at`]); the driver reports what it found and carries
//! the answers out.
//!
//! Outputs come one at a time: [`Machine::poll`] makes the next one current
//! and says its kind ([`kinds`]); accessors read it. The messages and
//! acknowledgments that make up the traffic, latest values and synced-map
//! changes are read field by field, which costs no allocation on the
//! JavaScript side; every other event (state changes, presence, losses,
//! refusals) comes as one JSON text ([`Machine::event_json`]), read once.
//! What a synced map reads as is asked for directly ([`Machine::map_get`],
//! [`Machine::map_entries`]), outside the outputs.
//!
//! # Numbers
//!
//! Numbers the machine assigns on this side (message ids, transport ids)
//! start at 1 and count up; they cross as JavaScript numbers, exact below
//! 2^53, which a page cannot reach (a million sends a second for 285
//! years). Numbers the server assigns (its message ids, room stream
//! offsets) cross as `bigint`s (`u64`), so none loses precision.
//!
//! # Files
//!
//! * `lib.rs`: [`Machine`]: construction, inputs, commands, outputs.
//! * `output.rs`: the current output, its accessors and the JSON form of
//!   the rarer events.
//! * `options.rs`: the page's options as the core's `ClientConfig` and the
//!   transport choice.

mod options;
mod output;

use bytes::Bytes;
use kitestring_core::client::transport::{TransportChoice, TransportKind};
use kitestring_core::client::{Client, Snapshot, TransportError, TransportId};
use kitestring_core::close::CloseCode;
use kitestring_core::reliable::{MessageId, SendError};
use kitestring_core::wire::{push_json_str, ClientId, Incoming, Payload};
use kitestring_core::Instant;
use wasm_bindgen::prelude::*;

pub use output::kinds;
use output::Current;

/// The core's client machine, with the state of one output being read.
///
/// Every method is one of the core's four kinds: a getter, an input
/// (`opened`, `text`, `binary`, `closed`, `failed`, `timeout`), a command
/// (`connect`, `send`, `join`, ...), or an output (`poll`, `deadline`);
/// beside them, the transport choice's (`transportFirst`,
/// `transportBlocked`, `probeAt`). After an input or a command, drain
/// `poll` until it returns [`kinds::NONE`], then arm a timer for
/// `deadline`.
#[wasm_bindgen]
pub struct Machine {
    client: Client,
    /// Which transport the next connection takes, and when the HTTP
    /// fallback tests WebSocket again (PROTOCOL.md, section 1.1).
    choice: TransportChoice,
    client_id: ClientId,
    current: Current,
    /// The payload the next command sends (`stageJson`, `stageBytes`).
    staged: Option<Payload>,
    /// Why the last command that returned 0 (or `false`) failed, as JSON.
    last_error: String,
    /// Ids taken over from a suspended page ([`Machine::restore`]).
    restored: Vec<u64>,
    /// The synced-map entry the next `mapSet`, `mapDelete` or `mapGet` is
    /// about: room, map, key ([`Machine::set_map_key`]).
    map_key: [String; 3],
}

/// Milliseconds on the driver's clock as the core's instant. The clock
/// starts near 0 (`performance.now()`); anything not a number counts as 0,
/// and the machine treats an instant earlier than one it saw as that one.
fn instant(now_ms: f64) -> Instant {
    if now_ms.is_finite() && now_ms > 0.0 {
        // Saturates at about 584 years, far beyond any page.
        Instant::from_nanos((now_ms * 1e6) as u64)
    } else {
        Instant::ZERO
    }
}

fn ms(at: Instant) -> f64 {
    at.as_nanos() as f64 / 1e6
}

/// The page's options as the core's settings and the transport choice.
fn settings(options: &str) -> Result<options::Settings, JsError> {
    options::settings(options).map_err(|e| JsError::new(&e))
}

#[wasm_bindgen]
impl Machine {
    /// A machine in the `disconnected` state. `options` is the page's
    /// options as JSON (camelCase, durations in milliseconds; `"{}"` for
    /// the defaults), `client_id` 16 random bytes, `seed` a random number
    /// for the backoff's jitter.
    #[wasm_bindgen(constructor)]
    pub fn new(options: &str, client_id: &[u8], seed: u64) -> Result<Machine, JsError> {
        let id: [u8; 16] = client_id
            .try_into()
            .map_err(|_| JsError::new("the client id must be 16 bytes"))?;
        let options::Settings { config, choice } = settings(options)?;
        let client =
            Client::new(config, ClientId(id), seed).map_err(|e| JsError::new(&e.to_string()))?;
        Ok(Machine::around(client, choice, Vec::new()))
    }

    // ---- getters ------------------------------------------------------------

    /// The state's name: `disconnected`, `connecting`, `handshaking`,
    /// `open`, `reconnecting`, `closing`, `closed` or `failed`.
    pub fn state(&self) -> String {
        self.client.state().name().to_owned()
    }

    /// The current session, as 32 hex digits, once a `welcome` named one.
    pub fn session(&self) -> Option<String> {
        self.client.session().map(|s| s.to_hex())
    }

    /// This client instance's id, as 32 hex digits.
    #[wasm_bindgen(js_name = clientId)]
    pub fn client_id(&self) -> String {
        self.client_id.to_hex()
    }

    /// The codec of the open connection (`json`, `msgpack`), if any.
    pub fn codec(&self) -> Option<String> {
        self.client.codec().map(|c| c.name().to_owned())
    }

    /// The latest round-trip time in milliseconds, or -1 before the first.
    pub fn rtt(&self) -> f64 {
        self.client.rtt().map_or(-1.0, |d| d.as_secs_f64() * 1000.0)
    }

    /// Whether a message sent now would go straight into the send window.
    #[wasm_bindgen(js_name = hasRoom)]
    pub fn has_room(&self) -> bool {
        self.client.has_room()
    }

    /// Messages waiting for the window (offline, or the window is full).
    pub fn queued(&self) -> u32 {
        self.client.queued().0 as u32
    }

    /// Messages sent and not yet acknowledged.
    pub fn unacknowledged(&self) -> u32 {
        self.client.unacknowledged().0 as u32
    }

    /// The machine's counters, as JSON.
    pub fn stats(&self) -> String {
        output::stats_json(self.client.stats())
    }

    /// Why the last command that answered 0 or `false` failed, as JSON
    /// (`{"error":"queue_full",...}`).
    #[wasm_bindgen(js_name = lastError)]
    pub fn last_error(&self) -> String {
        self.last_error.clone()
    }

    // ---- inputs -------------------------------------------------------------

    /// The `WebSocket` of `transport` fired `open` (or the fallback's
    /// `open` was answered).
    pub fn opened(&mut self, now: f64, transport: f64) {
        self.client
            .handle_transport_opened(instant(now), TransportId(transport as u64));
    }

    /// A text message arrived on `transport`.
    pub fn text(&mut self, now: f64, transport: f64, text: &str) {
        self.client.handle_message(
            instant(now),
            TransportId(transport as u64),
            Incoming::Text(text),
        );
    }

    /// A binary message arrived on `transport`. The bytes are the
    /// machine's from now on: large payloads are kept as slices of them.
    pub fn binary(&mut self, now: f64, transport: f64, data: Vec<u8>) {
        let data = Bytes::from(data);
        self.client.handle_message(
            instant(now),
            TransportId(transport as u64),
            Incoming::SharedBinary(&data),
        );
    }

    /// The `WebSocket` of `transport` fired `close`. `clean` is the event's
    /// `wasClean`: a close without a close frame (the browser reports 1006)
    /// is reported to the machine as such.
    pub fn closed(&mut self, now: f64, transport: f64, code: u16, reason: &str, clean: bool) {
        let code = (clean && code != CloseCode::ABNORMAL.0).then_some(CloseCode(code));
        self.client.handle_transport_closed(
            instant(now),
            TransportId(transport as u64),
            code,
            reason,
        );
    }

    /// Opening `transport` failed before it could open (the `WebSocket`
    /// constructor threw, or a credential could not be had).
    pub fn failed(&mut self, now: f64, transport: f64, error: &str) {
        self.client.handle_transport_error(
            instant(now),
            TransportId(transport as u64),
            TransportError::Io(error.to_owned()),
        );
    }

    /// The `hello` to put in the URL of `transport`'s request (the query
    /// parameter `kitestring-hello`, percent-encoded), asked right after a
    /// `CONNECT`: the server then answers as its first frame (PROTOCOL.md,
    /// section 4.2), and no `hello` frame is sent. `undefined`: open the
    /// socket without it (a server once left it unanswered); the `hello`
    /// then goes as the first frame.
    #[wasm_bindgen(js_name = urlHello)]
    pub fn url_hello(&mut self, transport: f64) -> Option<String> {
        self.client.url_hello(TransportId(transport as u64))
    }

    /// Which transport a new connection takes (PROTOCOL.md, section 1.1):
    /// 0 a `WebSocket`; 1 a `WebSocket`, and if it fails before it opens
    /// (a page sees no status: it may have been blocked on the way) the
    /// HTTP fallback's `open`; 2 the HTTP fallback, which the page's
    /// options ask for, or which it takes while upgrades are remembered
    /// blocked ([`transport_blocked`](Self::transport_blocked)).
    #[wasm_bindgen(js_name = transportFirst)]
    pub fn transport_first(&self, now: f64) -> u32 {
        match self.choice.first(instant(now)) {
            TransportKind::Http => 2,
            TransportKind::WebSocket => u32::from(self.choice.may_fall_back(true)),
        }
    }

    /// What the driver found about WebSocket upgrades: `blocked` when one
    /// failed and the fallback opened, when a probe is started (none again
    /// before it is done, nor for a while after) and when a probe did not
    /// open (connections go over HTTP for the memory's length); not
    /// `blocked` when a `WebSocket` opened (WebSocket from now on).
    #[wasm_bindgen(js_name = transportBlocked)]
    pub fn transport_blocked(&mut self, now: f64, blocked: bool) {
        if blocked {
            self.choice.blocked(instant(now));
        } else {
            self.choice.unblocked();
        }
    }

    /// While the HTTP fallback carries the connection: when to probe
    /// WebSocket with a bare upgrade (no `hello`, closed at once with
    /// 1000), in milliseconds on the driver's clock; if it opens, the
    /// session moves to a `WebSocket` (`reconnect`). -1: never (the options
    /// allow only the fallback).
    #[wasm_bindgen(js_name = probeAt)]
    pub fn probe_at(&self) -> f64 {
        self.choice.probe_at(TransportKind::Http).map_or(-1.0, ms)
    }

    /// The page's network went away (`offline` event, `online` false) or
    /// came back (`online`): attempts while away do not count toward the
    /// attempt limit, and a client waiting to retry connects at once when
    /// it is back.
    pub fn network(&mut self, now: f64, online: bool) {
        self.client.handle_network(instant(now), online);
    }

    /// The page is going away and will come back (a reload): returns the
    /// session as JSON for the page to keep (`sessionStorage`), and
    /// abandons the connection with 4000 so that the server keeps the
    /// session for its grace period. The machine is closed afterwards.
    /// The snapshot holds the resume key: keep it in the page's storage
    /// only.
    pub fn suspend(&mut self, now: f64) -> String {
        self.client.suspend(instant(now)).to_json()
    }

    /// A machine that resumes the session a previous page suspended
    /// ([`suspend`](Self::suspend)); the other arguments are as for the
    /// constructor's. Its `restored` lists the ids of the messages the
    /// previous page had not seen acknowledged.
    pub fn restore(options: &str, snapshot: &str, seed: u64) -> Result<Machine, JsError> {
        let options::Settings { config, choice } = settings(options)?;
        let snapshot = Snapshot::from_json(snapshot).map_err(|e| JsError::new(&e.to_string()))?;
        let client =
            Client::restore(config, &snapshot, seed).map_err(|e| JsError::new(&e.to_string()))?;
        let restored = snapshot.pending().iter().map(|id| id.0).collect();
        Ok(Machine::around(client, choice, restored))
    }

    /// The ids a restored machine took over from the previous page, as a
    /// JSON array: each will be reported acknowledged or lost.
    pub fn restored(&self) -> String {
        let mut out = Vec::new();
        output::push_list(&mut out, &self.restored, |out, id| {
            output::push_uint(out, *id)
        });
        String::from_utf8(out).unwrap_or_default()
    }

    /// Time passed: call at or after [`deadline`](Self::deadline), and
    /// whenever the page had a chance to run (a message arrived, the page
    /// became visible): timers a hidden page's throttling held back run
    /// then.
    pub fn timeout(&mut self, now: f64) {
        self.client.handle_timeout(instant(now));
    }

    // ---- outputs ------------------------------------------------------------

    /// Makes the next output current and returns its kind ([`kinds`]);
    /// [`kinds::NONE`] when there is nothing left to do.
    pub fn poll(&mut self) -> u32 {
        self.current = Current::from(self.client.poll_output());
        self.current.kind()
    }

    /// When [`timeout`](Self::timeout) must be called next, in milliseconds
    /// on the driver's clock; -1 when no timer is armed.
    pub fn deadline(&self) -> f64 {
        self.client.poll_timeout().map_or(-1.0, |d| ms(d.at))
    }

    // ---- commands -----------------------------------------------------------

    /// Starts connecting (from `disconnected`, `closed` or `failed`).
    pub fn connect(&mut self, now: f64) -> bool {
        let r = self.client.connect(instant(now));
        self.usage(r)
    }

    /// Connects again now: skips the rest of a backoff delay, starts again
    /// from `failed`, or replaces a live connection.
    pub fn reconnect(&mut self, now: f64) -> bool {
        let r = self.client.reconnect(instant(now));
        self.usage(r)
    }

    /// Ends the session (1000). Unacknowledged messages are reported lost.
    pub fn close(&mut self, now: f64) -> bool {
        let r = self.client.close(instant(now));
        self.usage(r)
    }

    /// Takes the payload of the next `send`, `publish`, `request`,
    /// `respond`, `sendLatest` or `mapSet`: JSON text. Returns whether it is one
    /// JSON value (else see [`last_error`](Self::last_error)).
    #[wasm_bindgen(js_name = stageJson)]
    pub fn stage_json(&mut self, text: String) -> bool {
        let r = Payload::json(text.into_bytes()).map_err(|e| Refused::Payload(e.to_string()));
        self.stage(r)
    }

    /// Takes the payload of the next command, as bytes: `kind` 1 for one
    /// MessagePack value, 2 for opaque bytes. Returns whether it is valid.
    #[wasm_bindgen(js_name = stageBytes)]
    pub fn stage_bytes(&mut self, kind: u8, data: Vec<u8>) -> bool {
        let r = match kind {
            1 => Payload::msgpack(data).map_err(|e| Refused::Payload(e.to_string())),
            2 => Ok(Payload::binary(data)),
            other => Err(Refused::Payload(format!("unknown payload kind {other}"))),
        };
        self.stage(r)
    }

    /// Queues the staged payload for exactly-once delivery; `ts` is a
    /// wall-clock timestamp in milliseconds to carry along, or negative for
    /// none. Returns the message's id, or 0 (see
    /// [`last_error`](Self::last_error)).
    pub fn send(&mut self, now: f64, ts: f64) -> f64 {
        let now = instant(now);
        let r = self.staged().and_then(|p| {
            if ts >= 0.0 && ts.is_finite() {
                self.client.send_with_timestamp(now, p, ts as u64)
            } else {
                self.client.send(now, p)
            }
            .map_err(Refused::Send)
        });
        self.id(r)
    }

    /// Publishes the staged payload to a room this client joined. Returns
    /// the message's id, or 0.
    pub fn publish(&mut self, now: f64, room: &str) -> f64 {
        let r = self.staged().and_then(|p| {
            self.client
                .publish(instant(now), room, p)
                .map_err(Refused::Send)
        });
        self.id(r)
    }

    /// Joins a room. Returns the join's id, or 0.
    pub fn join(&mut self, now: f64, room: &str) -> f64 {
        let r = self.client.join(instant(now), room).map_err(Refused::Send);
        self.id(r)
    }

    /// Leaves a room. Returns the leave's id, or 0.
    pub fn leave(&mut self, now: f64, room: &str) -> f64 {
        let r = self.client.leave(instant(now), room).map_err(Refused::Send);
        self.id(r)
    }

    /// The rooms this client asked to be in, as a JSON array.
    pub fn rooms(&self) -> String {
        let rooms: Vec<_> = self.client.rooms().collect();
        let mut out = Vec::new();
        output::push_list(&mut out, &rooms, |out, r| push_json_str(out, r));
        String::from_utf8(out).unwrap_or_default()
    }

    /// Sends the staged payload as a request the server answers; it fails
    /// after `timeout_ms`. Returns its id, or 0.
    pub fn request(&mut self, now: f64, timeout_ms: f64) -> f64 {
        // Saturating: an infinite timeout is the longest one, not a panic
        // (as `from_secs_f64` would have it).
        let timeout = core::time::Duration::from_nanos((timeout_ms.max(0.0) * 1e6) as u64);
        let r = self.staged().and_then(|p| {
            self.client
                .request(instant(now), p, timeout)
                .map_err(Refused::Send)
        });
        self.id(r)
    }

    /// Stops waiting for a request's response; whether it was pending.
    #[wasm_bindgen(js_name = cancelRequest)]
    pub fn cancel_request(&mut self, now: f64, request: f64) -> bool {
        self.client
            .cancel_request(instant(now), MessageId(request as u64))
    }

    /// Answers the server's request `request` (its id, from a message
    /// with `isRequest`) with the staged payload. Returns the response's
    /// id, or 0.
    pub fn respond(&mut self, now: f64, request: u64) -> f64 {
        let r = self.staged().and_then(|p| {
            self.client
                .respond(instant(now), MessageId(request), p)
                .map_err(Refused::Send)
        });
        self.id(r)
    }

    /// Sends the staged payload as the latest value for `key`: at most one
    /// message per key per coalescing interval, the newest value winning.
    /// Returns whether it was taken.
    #[wasm_bindgen(js_name = sendLatest)]
    pub fn send_latest(&mut self, now: f64, key: &str) -> bool {
        let r = self.staged().and_then(|p| {
            self.client
                .send_latest(instant(now), key, p)
                .map_err(Refused::Send)
        });
        self.done(r)
    }

    /// Sends an unsequenced datagram on the open connection. Returns
    /// whether it was taken.
    #[wasm_bindgen(js_name = sendDatagram)]
    pub fn send_datagram(&mut self, now: f64, data: Vec<u8>) -> bool {
        let r = self
            .client
            .send_datagram(instant(now), Bytes::from(data))
            .map_err(Refused::Send);
        self.done(r)
    }

    // ---- synced maps --------------------------------------------------------

    /// Tells the machine the wall-clock time at `now`: `unix_ms` is
    /// `Date.now()`, milliseconds since the Unix epoch. Writes to synced
    /// maps are stamped with it (through the machine's hybrid-logical
    /// clock, so stamps never go backwards even if the page's clock does).
    /// The driver calls it as it makes the machine, and again on every
    /// connection attempt: a page's two clocks drift apart while the
    /// computer sleeps. Not a number, or negative: ignored.
    #[wasm_bindgen(js_name = setWallClock)]
    pub fn set_wall_clock(&mut self, now: f64, unix_ms: f64) {
        if unix_ms.is_finite() && unix_ms >= 0.0 {
            self.client.set_wall_clock(instant(now), unix_ms as u64);
        }
    }

    /// Names the synced-map entry that the next [`map_set`](Self::map_set),
    /// [`map_delete`](Self::map_delete) and [`map_get`](Self::map_get) are
    /// about: `key` of `room`'s map `map` (and the map that
    /// [`map_entries`](Self::map_entries) and
    /// [`map_synced`](Self::map_synced) are about). (One call carries the three
    /// strings, rather than the glue of each of those methods.)
    #[wasm_bindgen(js_name = mapKey)]
    pub fn set_map_key(&mut self, room: String, map: String, key: String) {
        self.map_key = [room, map, key];
    }

    /// Sets the named entry ([`set_map_key`](Self::set_map_key)) to the
    /// staged payload (JSON or MessagePack; opaque bytes are refused): it
    /// reads back at once ([`map_get`](Self::map_get)) and goes to the
    /// server as a message of the session, queued while offline. Returns
    /// the write's id, or 0. A refusal by the server comes as a `refused`
    /// event (`op` `mset`) naming the id, and the key reads as the server
    /// has it again.
    #[wasm_bindgen(js_name = mapSet)]
    pub fn map_set(&mut self, now: f64) -> f64 {
        let staged = self.staged();
        let [room, map, key] = &self.map_key;
        let r = staged.and_then(|p| {
            self.client
                .map_set(instant(now), room, map, key, p)
                .map_err(Refused::Send)
        });
        self.id(r)
    }

    /// Deletes the named entry ([`set_map_key`](Self::set_map_key)), as
    /// [`map_set`](Self::map_set) writes. Returns the write's id, or 0.
    #[wasm_bindgen(js_name = mapDelete)]
    pub fn map_delete(&mut self, now: f64) -> f64 {
        let [room, map, key] = &self.map_key;
        let r = self
            .client
            .map_delete(instant(now), room, map, key)
            .map_err(Refused::Send);
        self.id(r)
    }

    /// What the named entry ([`set_map_key`](Self::set_map_key)) reads as
    /// now (this page's newest unsettled write of it, else what the server
    /// confirmed): the value's kind in the first byte (0 JSON, 1
    /// MessagePack), then its bytes; `undefined` if it holds nothing.
    #[wasm_bindgen(js_name = mapGet)]
    pub fn map_get(&self) -> Option<Vec<u8>> {
        let [room, map, key] = &self.map_key;
        self.client.map_get(room, map, key).map(|p| {
            let mut out = Vec::with_capacity(1 + p.len());
            out.push(kind_byte(p));
            out.extend_from_slice(p.data());
            out
        })
    }

    /// Every entry of the named map ([`set_map_key`](Self::set_map_key),
    /// its key aside) as it reads now, in key order, as one byte string: for each, the key's length (4 bytes,
    /// little-endian), the key (UTF-8), the value's kind (1 byte: 0 JSON,
    /// 1 MessagePack), the value's length (4 bytes, little-endian) and its
    /// bytes.
    #[wasm_bindgen(js_name = mapEntries)]
    pub fn map_entries(&self) -> Vec<u8> {
        let [room, map, _] = &self.map_key;
        let mut out = Vec::new();
        for (key, value) in self.client.map_entries(room, map) {
            out.extend_from_slice(&(key.len() as u32).to_le_bytes());
            out.extend_from_slice(key.as_bytes());
            out.push(kind_byte(&value));
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
            out.extend_from_slice(value.data());
        }
        out
    }

    /// Whether the named map ([`set_map_key`](Self::set_map_key), its key
    /// aside) was received whole on the current session (its snapshot arrived since the session started or last
    /// resumed); until then, what it reads as may be out of date.
    #[wasm_bindgen(js_name = mapSynced)]
    pub fn map_synced(&self) -> bool {
        let [room, map, _] = &self.map_key;
        self.client.map_synced(room, map)
    }

    /// Sends a fresh credential, answering a `tokenexpiring` event.
    #[wasm_bindgen(js_name = sendToken)]
    pub fn send_token(&mut self, now: f64, token: String) -> bool {
        let r = self
            .client
            .send_token(instant(now), token)
            .map_err(Refused::Send);
        self.done(r)
    }
}

/// A synced map value's kind as the page reads it: 0 JSON, 1 MessagePack
/// (the only kinds a map holds).
fn kind_byte(p: &Payload) -> u8 {
    u8::from(p.kind() == kitestring_core::wire::PayloadKind::MsgPack)
}

/// Why a command failed.
enum Refused {
    Payload(String),
    Send(SendError),
}

impl Machine {
    /// A machine around `client`, nothing current or staged.
    fn around(client: Client, choice: TransportChoice, restored: Vec<u64>) -> Machine {
        Machine {
            client_id: client.client_id(),
            client,
            choice,
            current: Current::None,
            staged: None,
            last_error: String::new(),
            restored,
            map_key: Default::default(),
        }
    }

    fn stage(&mut self, r: Result<Payload, Refused>) -> bool {
        match r {
            Ok(p) => {
                self.staged = Some(p);
                true
            }
            Err(e) => {
                self.staged = None;
                self.last_error = refused_json(&e);
                false
            }
        }
    }

    fn staged(&mut self) -> Result<Payload, Refused> {
        self.staged
            .take()
            .ok_or_else(|| Refused::Payload("no payload staged".into()))
    }

    fn usage(&mut self, r: Result<(), kitestring_core::client::UsageError>) -> bool {
        match r {
            Ok(()) => true,
            Err(e) => {
                self.last_error = output::error_json("usage", &e.to_string(), &[]);
                false
            }
        }
    }

    fn id(&mut self, r: Result<MessageId, Refused>) -> f64 {
        match r {
            Ok(id) => id.0 as f64,
            Err(e) => {
                self.last_error = refused_json(&e);
                0.0
            }
        }
    }

    fn done(&mut self, r: Result<(), Refused>) -> bool {
        match r {
            Ok(()) => true,
            Err(e) => {
                self.last_error = refused_json(&e);
                false
            }
        }
    }
}

fn refused_json(e: &Refused) -> String {
    match e {
        Refused::Payload(why) => output::error_json("payload", why, &[]),
        Refused::Send(e) => output::send_error_json(e),
    }
}
