//! The output being read: what [`Machine::poll`] made current, the
//! accessors that read it, and the JSON form of events and errors.
//!
//! Owns the shape in which the machine's outputs reach JavaScript: a kind
//! ([`kinds`]) and fields read one by one for the traffic (frames to write,
//! messages, acknowledgments, datagrams, latest values, synced-map
//! changes), one JSON text for everything rarer. It never decides anything: each output is the core's, as the
//! core queued it, in the core's order. Accessors called for a field the
//! current output does not have return an empty value.
//!
//! [`Machine::poll`]: crate::Machine::poll

use std::sync::Arc;

use bytes::Bytes;
use kitestring_core::client::{
    Cause, ClientStats, Event, FailReason, LostReason, Output, Received, RequestError, State,
    TransportError, TransportId,
};
use kitestring_core::close::CloseCode;
use kitestring_core::reliable::{MessageId, SendError};
use kitestring_core::rooms::Member;
use kitestring_core::wire::{push_json_str, Payload, PayloadKind, Transmit};
use wasm_bindgen::prelude::*;

use crate::Machine;

/// The kinds [`Machine::poll`](crate::Machine::poll) returns.
pub mod kinds {
    /// Nothing left to do: arm the timer and wait.
    pub const NONE: u32 = 0;
    /// Open a `WebSocket` for `transport()`; report `opened` or `closed`.
    pub const CONNECT: u32 = 1;
    /// Write `textOut()` as a text message on `transport()`.
    pub const TEXT: u32 = 2;
    /// Write `bytesOut()` as a binary message on `transport()`.
    pub const BINARY: u32 = 3;
    /// Close `transport()` with `code()` and `reason()`, then report its
    /// `close` event.
    pub const DISCONNECT: u32 = 4;
    /// A message from the server, in order, once.
    pub const MESSAGE: u32 = 10;
    /// The response to this client's request `requestId()`.
    pub const RESPONSE: u32 = 11;
    /// This client's messages `first()` to `last()` were acknowledged.
    pub const ACKED: u32 = 12;
    /// A datagram from the server: `payloadBytes()`.
    pub const DATAGRAM: u32 = 13;
    /// A room's newest value of a key: `room()`, `key()` and the payload
    /// accessors.
    pub const LATEST: u32 = 14;
    /// What an entry of a synced map reads as changed: `room()`, `map()`,
    /// `key()`, and the payload accessors, or `deleted()`.
    pub const MAP_CHANGED: u32 = 15;
    /// A synced map's snapshot arrived whole (after the `MAP_CHANGED`s it
    /// caused): `room()`, `map()`.
    pub const MAP_SYNCED: u32 = 16;
    /// Any other event, as JSON: `eventJson()`.
    pub const EVENT: u32 = 20;
}

/// The output [`Machine::poll`](crate::Machine::poll) made current.
pub(crate) enum Current {
    None,
    Connect(TransportId),
    Transmit(TransportId, Transmit),
    Disconnect(TransportId, CloseCode, &'static str),
    Message(Received),
    Response(MessageId, Received),
    Acked(MessageId, MessageId),
    Datagram(Bytes),
    Latest(Arc<str>, Arc<str>, Payload),
    /// Room, map, key, and what the key reads as (`None`: deleted).
    MapChanged(Arc<str>, Arc<str>, Arc<str>, Option<Payload>),
    MapSynced(Arc<str>, Arc<str>),
    Other(Event),
}

impl From<Option<Output>> for Current {
    fn from(output: Option<Output>) -> Current {
        match output {
            None => Current::None,
            Some(Output::Connect(t)) => Current::Connect(t),
            Some(Output::Transmit(t, m)) => Current::Transmit(t, m),
            Some(Output::Disconnect(t, code, reason)) => Current::Disconnect(t, code, reason),
            Some(Output::Event(e)) => match e {
                Event::Message(m) => Current::Message(m),
                Event::Response { request, response } => Current::Response(request, response),
                Event::Acked { first, last } => Current::Acked(first, last),
                Event::Datagram(d) => Current::Datagram(d),
                Event::Latest { room, key, payload } => Current::Latest(room, key, payload),
                Event::MapChanged {
                    room,
                    map,
                    key,
                    value,
                } => Current::MapChanged(room, map, key, value),
                Event::MapSynced { room, map } => Current::MapSynced(room, map),
                other => Current::Other(other),
            },
        }
    }
}

impl Current {
    pub(crate) fn kind(&self) -> u32 {
        match self {
            Current::None => kinds::NONE,
            Current::Connect(_) => kinds::CONNECT,
            Current::Transmit(_, Transmit::Text(_)) => kinds::TEXT,
            Current::Transmit(_, Transmit::Binary(_)) => kinds::BINARY,
            Current::Disconnect(..) => kinds::DISCONNECT,
            Current::Message(_) => kinds::MESSAGE,
            Current::Response(..) => kinds::RESPONSE,
            Current::Acked(..) => kinds::ACKED,
            Current::Datagram(_) => kinds::DATAGRAM,
            Current::Latest(..) => kinds::LATEST,
            Current::MapChanged(..) => kinds::MAP_CHANGED,
            Current::MapSynced(..) => kinds::MAP_SYNCED,
            Current::Other(_) => kinds::EVENT,
        }
    }

    fn received(&self) -> Option<&Received> {
        match self {
            Current::Message(m) | Current::Response(_, m) => Some(m),
            _ => None,
        }
    }

    /// The payload of a `MESSAGE`, `RESPONSE`, `LATEST` or `MAP_CHANGED`.
    fn payload(&self) -> Option<&Payload> {
        match self {
            Current::Latest(_, _, p) => Some(p),
            Current::MapChanged(_, _, _, p) => p.as_ref(),
            other => other.received().map(|m| &m.payload),
        }
    }
}

#[wasm_bindgen]
impl Machine {
    /// The transport of a `CONNECT`, `TEXT`, `BINARY` or `DISCONNECT`.
    pub fn transport(&self) -> f64 {
        match &self.current {
            Current::Connect(t) | Current::Transmit(t, _) | Current::Disconnect(t, ..) => {
                t.0 as f64
            }
            _ => 0.0,
        }
    }

    /// The text of a `TEXT`.
    #[wasm_bindgen(js_name = textOut)]
    pub fn text_out(&self) -> String {
        match &self.current {
            Current::Transmit(_, Transmit::Text(b)) => std::str::from_utf8(b)
                .map(str::to_owned)
                .unwrap_or_default(),
            _ => String::new(),
        }
    }

    /// The bytes of a `BINARY`.
    #[wasm_bindgen(js_name = bytesOut)]
    pub fn bytes_out(&self) -> Vec<u8> {
        match &self.current {
            Current::Transmit(_, Transmit::Binary(b)) => b.to_vec(),
            _ => Vec::new(),
        }
    }

    /// The close code of a `DISCONNECT`, as a page may send it: codes a
    /// page cannot put in a close frame (1002, 1009, ...) become their
    /// 41xx equivalents (PROTOCOL.md, section 8).
    pub fn code(&self) -> u16 {
        match &self.current {
            Current::Disconnect(_, code, _) => code.for_page().0,
            _ => 0,
        }
    }

    /// The reason of a `DISCONNECT`.
    pub fn reason(&self) -> String {
        match &self.current {
            Current::Disconnect(_, _, reason) => (*reason).to_owned(),
            _ => String::new(),
        }
    }

    /// How a `MESSAGE`'s, `RESPONSE`'s, `LATEST`'s or `MAP_CHANGED`'s
    /// payload is encoded: 0 JSON, 1 MessagePack, 2 bytes.
    #[wasm_bindgen(js_name = payloadKind)]
    pub fn payload_kind(&self) -> u8 {
        match self.current.payload().map(|p| p.kind()) {
            Some(PayloadKind::MsgPack) => 1,
            Some(PayloadKind::Binary) => 2,
            _ => 0,
        }
    }

    /// A JSON payload's text.
    #[wasm_bindgen(js_name = payloadText)]
    pub fn payload_text(&self) -> String {
        self.current
            .payload()
            .and_then(|p| std::str::from_utf8(p.data()).ok())
            .map(str::to_owned)
            .unwrap_or_default()
    }

    /// A MessagePack or opaque payload's bytes, or a `DATAGRAM`'s.
    #[wasm_bindgen(js_name = payloadBytes)]
    pub fn payload_bytes(&self) -> Vec<u8> {
        match &self.current {
            Current::Datagram(d) => d.to_vec(),
            other => other
                .payload()
                .map(|p| p.data().to_vec())
                .unwrap_or_default(),
        }
    }

    /// The room a message was broadcast in, if any, or a `LATEST`'s,
    /// `MAP_CHANGED`'s or `MAP_SYNCED`'s.
    pub fn room(&self) -> Option<String> {
        match &self.current {
            Current::Latest(room, _, _)
            | Current::MapChanged(room, ..)
            | Current::MapSynced(room, _) => Some(room.to_string()),
            other => other
                .received()
                .and_then(|m| m.room.as_deref().map(str::to_owned)),
        }
    }

    /// A `LATEST`'s or `MAP_CHANGED`'s key.
    pub fn key(&self) -> String {
        match &self.current {
            Current::Latest(_, key, _) | Current::MapChanged(_, _, key, _) => key.to_string(),
            _ => String::new(),
        }
    }

    /// A `MAP_CHANGED`'s or `MAP_SYNCED`'s map.
    pub fn map(&self) -> String {
        match &self.current {
            Current::MapChanged(_, map, ..) | Current::MapSynced(_, map) => map.to_string(),
            _ => String::new(),
        }
    }

    /// Whether a `MAP_CHANGED`'s entry now holds nothing (deleted, or
    /// this page's write of a new key was refused or lost); its payload
    /// accessors then return nothing.
    pub fn deleted(&self) -> bool {
        matches!(&self.current, Current::MapChanged(_, _, _, None))
    }

    /// The server's id for a message (for a room stream's entry, its
    /// offset).
    #[wasm_bindgen(js_name = messageId)]
    pub fn message_id(&self) -> u64 {
        self.current.received().map_or(0, |m| m.id.0)
    }

    /// A message's sequence number in the session or, for a room stream's
    /// entry, its offset in the room.
    pub fn seq(&self) -> u64 {
        self.current.received().map_or(0, |m| m.seq)
    }

    /// The sender's timestamp in milliseconds, or -1.
    pub fn timestamp(&self) -> f64 {
        self.current
            .received()
            .and_then(|m| m.timestamp)
            .map_or(-1.0, |t| t as f64)
    }

    /// Whether the server expects a response to this message.
    #[wasm_bindgen(js_name = isRequest)]
    pub fn is_request(&self) -> bool {
        self.current.received().is_some_and(|m| m.request)
    }

    /// The request a `RESPONSE` answers (this client's id for it).
    #[wasm_bindgen(js_name = requestId)]
    pub fn request_id(&self) -> f64 {
        match &self.current {
            Current::Response(r, _) => r.0 as f64,
            _ => 0.0,
        }
    }

    /// The first id an `ACKED` covers.
    pub fn first(&self) -> f64 {
        match &self.current {
            Current::Acked(first, _) => first.0 as f64,
            _ => 0.0,
        }
    }

    /// The last id an `ACKED` covers.
    pub fn last(&self) -> f64 {
        match &self.current {
            Current::Acked(_, last) => last.0 as f64,
            _ => 0.0,
        }
    }

    /// An `EVENT` as JSON: an object whose `type` names it.
    #[wasm_bindgen(js_name = eventJson)]
    pub fn event_json(&self) -> String {
        match &self.current {
            Current::Other(e) => event_json(e),
            _ => String::new(),
        }
    }
}

/// A small JSON object writer: the events' shapes are fixed, and a
/// `serde_json::Value` per event would cost code size for nothing.
struct Obj(Vec<u8>);

impl Obj {
    fn new(kind: &str) -> Obj {
        let mut o = Obj(b"{".to_vec());
        o.str("type", kind);
        o
    }

    fn key(&mut self, k: &str) {
        if self.0.len() > 1 {
            self.0.push(b',');
        }
        push_json_str(&mut self.0, k);
        self.0.push(b':');
    }

    fn str(&mut self, k: &str, v: &str) -> &mut Obj {
        self.key(k);
        push_json_str(&mut self.0, v);
        self
    }

    fn opt_str(&mut self, k: &str, v: Option<&str>) -> &mut Obj {
        match v {
            Some(v) => self.str(k, v),
            None => self.raw(k, "null"),
        }
    }

    fn num(&mut self, k: &str, v: f64) -> &mut Obj {
        self.key(k);
        push_num(&mut self.0, v);
        self
    }

    /// A number the page must not round: as a decimal string.
    fn big(&mut self, k: &str, v: u64) -> &mut Obj {
        self.key(k);
        self.0.push(b'"');
        push_uint(&mut self.0, v);
        self.0.push(b'"');
        self
    }

    fn bool(&mut self, k: &str, v: bool) -> &mut Obj {
        self.raw(k, if v { "true" } else { "false" })
    }

    fn raw(&mut self, k: &str, json: &str) -> &mut Obj {
        self.key(k);
        self.0.extend_from_slice(json.as_bytes());
        self
    }

    fn ids(&mut self, k: &str, ids: &[MessageId]) -> &mut Obj {
        self.key(k);
        push_list(&mut self.0, ids, |out, id| push_uint(out, id.0));
        self
    }

    fn members(&mut self, k: &str, members: &[Member]) -> &mut Obj {
        self.key(k);
        push_list(&mut self.0, members, |out, m| {
            out.extend_from_slice(b"{\"client\":");
            push_json_str(out, &m.client);
            if let Some(identity) = &m.identity {
                out.extend_from_slice(b",\"identity\":");
                push_json_str(out, identity);
            }
            out.push(b'}');
        });
        self
    }

    fn done(&mut self) -> String {
        self.0.push(b'}');
        // Every piece written is UTF-8.
        String::from_utf8(core::mem::take(&mut self.0)).unwrap_or_default()
    }
}

/// Appends `items` as a JSON array, each written by `item`.
pub(crate) fn push_list<T>(out: &mut Vec<u8>, items: &[T], item: impl Fn(&mut Vec<u8>, &T)) {
    out.push(b'[');
    for (i, x) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        item(out, x);
    }
    out.push(b']');
}

/// Appends `v` in decimal.
pub(crate) fn push_uint(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Appends `v` as a JSON number, to the nanosecond when it is a number of
/// milliseconds (six decimals at most), without the float formatting the
/// module would otherwise carry; not finite: `null`.
fn push_num(out: &mut Vec<u8>, v: f64) {
    if !v.is_finite() {
        out.extend_from_slice(b"null");
        return;
    }
    if v < 0.0 {
        out.push(b'-');
    }
    let v = v.abs();
    if v >= 1e13 {
        // Beyond 300 years of milliseconds: whole numbers (exact up to
        // 2^53, which is all a page reads exactly anyway).
        push_uint(out, v.round() as u64);
        return;
    }
    // Millionths, rounded: exact for every duration in nanoseconds.
    let millionths = (v * 1e6).round() as u64;
    push_uint(out, millionths / 1_000_000);
    let mut frac = millionths % 1_000_000;
    if frac != 0 {
        let mut places = 6;
        while frac % 10 == 0 {
            frac /= 10;
            places -= 1;
        }
        out.push(b'.');
        let start = out.len();
        push_uint(out, frac);
        let pad = places - (out.len() - start);
        out.splice(start..start, core::iter::repeat_n(b'0', pad));
    }
}

fn ms(d: core::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// An event other than the traffic's, as JSON.
pub(crate) fn event_json(e: &Event) -> String {
    match e {
        Event::StateChanged { old, new } => {
            let mut o = Obj::new("statechange");
            o.str("old", old.name()).str("state", new.name());
            state_fields(&mut o, new);
            o.done()
        }
        Event::Connected {
            session,
            resumed,
            recovered,
            version,
            codec,
        } => Obj::new("connected")
            .str("session", &session.to_hex())
            .bool("resumed", *resumed)
            .bool("recovered", *recovered)
            .num("version", f64::from(*version))
            .str("codec", codec.name())
            .done(),
        Event::Presence { room, presence } => Obj::new("presence")
            .str("room", room)
            .bool("snapshot", presence.snapshot)
            .members("joined", &presence.joined)
            .members("left", &presence.left)
            .done(),
        Event::Refused { id, room, refusal } => {
            let mut o = Obj::new("refused");
            match id {
                Some(id) => o.num("id", id.0 as f64),
                None => o.raw("id", "null"),
            };
            o.opt_str("room", room.as_deref())
                .str("op", &refusal.op)
                .str("reason", &refusal.reason)
                .opt_str("code", refusal.code.as_deref())
                .done()
        }
        Event::SessionLost {
            reason,
            unconfirmed,
            unsent,
        } => {
            let (why, detail) = lost_reason(reason);
            Obj::new("sessionlost")
                .str("reason", why)
                .opt_str("detail", detail)
                .ids("unconfirmed", unconfirmed)
                .ids("unsent", unsent)
                .done()
        }
        Event::RequestFailed { request, error } => Obj::new("requestfailed")
            .num("request", request.0 as f64)
            .str("error", request_error(*error))
            .done(),
        Event::LateResponse { request } => Obj::new("lateresponse")
            .num("request", request.0 as f64)
            .done(),
        Event::Missed { room, from, to } => {
            let mut o = Obj::new("missed");
            o.str("room", room).big("from", *from);
            match to {
                Some(to) => o.big("to", *to),
                None => o.raw("to", "null"),
            };
            o.done()
        }
        Event::LatestFailed { key, error } => Obj::new("latestfailed")
            .str("key", key)
            .raw("error", &send_error_json(error))
            .done(),
        Event::SendFailed { id, error } => Obj::new("sendfailed")
            .num("id", id.0 as f64)
            .raw("error", &send_error_json(error))
            .done(),
        Event::TokenExpiring { within } => {
            Obj::new("tokenexpiring").num("within", ms(*within)).done()
        }
        Event::Rtt(rtt) => Obj::new("rtt").num("rtt", ms(*rtt)).done(),
        Event::DecodeFailed(error) => Obj::new("decodefailed")
            .str("error", &error.to_string())
            .done(),
        Event::Resync => Obj::new("resync").done(),
        Event::MapOverflow { room, map } => Obj::new("mapoverflow")
            .str("room", room)
            .str("map", map)
            .done(),
        // The traffic's events never get here; an event a later core adds
        // still reaches the page, by name.
        _ => Obj::new("other").done(),
    }
}

fn state_fields(o: &mut Obj, state: &State) {
    match state {
        State::Connecting { attempt } | State::Handshaking { attempt } => {
            o.num("attempt", f64::from(*attempt));
        }
        State::Reconnecting { attempt, at, cause } => {
            o.num("attempt", f64::from(*attempt))
                .num("at", at.as_nanos() as f64 / 1e6)
                .raw("cause", &cause_json(cause));
        }
        State::Closed { code } => {
            o.num("code", f64::from(code.0));
        }
        State::Failed { reason } => {
            o.raw("failure", &fail_json(reason));
        }
        _ => {}
    }
}

fn cause_json(cause: &Cause) -> String {
    match cause {
        Cause::PeerClosed { code, reason } => Obj::new("closed")
            .num("code", f64::from(code.0))
            .str("reason", reason)
            .done(),
        Cause::Transport(e) => transport_json(e),
        Cause::ConnectTimeout => Obj::new("connect_timeout").done(),
        Cause::HeartbeatTimeout => Obj::new("heartbeat_timeout").done(),
        Cause::AckTimeout => Obj::new("ack_timeout").done(),
        Cause::Rejected { code, reason } => Obj::new("rejected")
            .num("code", f64::from(code.0))
            .str("reason", reason)
            .done(),
        Cause::GoAway { code } => Obj::new("goaway").num("code", f64::from(code.0)).done(),
        Cause::Protocol(what) => Obj::new("protocol").str("reason", what).done(),
        Cause::Requested => Obj::new("requested").done(),
        _ => Obj::new("other").done(),
    }
}

fn transport_json(e: &TransportError) -> String {
    match e {
        TransportError::Http {
            status,
            retry_after,
        } => {
            let mut o = Obj::new("http");
            o.num("status", f64::from(*status));
            if let Some(r) = retry_after {
                o.num("retryAfter", ms(*r));
            }
            o.done()
        }
        TransportError::Io(why) | TransportError::Tls(why) | TransportError::WebSocket(why) => {
            Obj::new("transport").str("reason", why).done()
        }
        _ => Obj::new("transport").done(),
    }
}

fn fail_json(reason: &FailReason) -> String {
    match reason {
        FailReason::TooManyAttempts { attempts, last } => Obj::new("too_many_attempts")
            .num("attempts", f64::from(*attempts))
            .raw("last", &cause_json(last))
            .done(),
        FailReason::UnsupportedVersion { .. } => Obj::new("unsupported_version").done(),
        FailReason::UnsupportedCodec => Obj::new("unsupported_codec").done(),
        FailReason::Unauthorized => Obj::new("unauthorized").done(),
        FailReason::Forbidden => Obj::new("forbidden").done(),
        FailReason::Terminal { code, reason } => Obj::new("terminal")
            .num("code", f64::from(code.0))
            .str("reason", reason)
            .done(),
        FailReason::HttpStatus(status) => Obj::new("http").num("status", f64::from(*status)).done(),
        _ => Obj::new("other").done(),
    }
}

fn lost_reason(reason: &LostReason) -> (&'static str, Option<&str>) {
    match reason {
        LostReason::NotResumed(why) => ("not_resumed", Some(why)),
        LostReason::Closed => ("closed", None),
        LostReason::Overflow => ("overflow", None),
        LostReason::Inconsistent => ("inconsistent", None),
        _ => ("other", None),
    }
}

fn request_error(e: RequestError) -> &'static str {
    match e {
        RequestError::TimedOut => "timed_out",
        RequestError::SessionLost => "session_lost",
        RequestError::Closed => "closed",
        _ => "other",
    }
}

/// An error as JSON: `{"type":"error","error":kind,"message":...}` and
/// the numbers that go with it.
pub(crate) fn error_json(kind: &str, message: &str, numbers: &[(&str, f64)]) -> String {
    let mut o = Obj::new("error");
    o.str("error", kind).str("message", message);
    for (k, v) in numbers {
        o.num(k, *v);
    }
    o.done()
}

/// A refused send as JSON, its kind named for programs.
pub(crate) fn send_error_json(e: &SendError) -> String {
    let message = e.to_string();
    match e {
        SendError::QueueFull { messages, bytes } => error_json(
            "queue_full",
            &message,
            &[("messages", *messages as f64), ("bytes", *bytes as f64)],
        ),
        SendError::TooLarge { size, max } => error_json(
            "too_large",
            &message,
            &[("size", *size as f64), ("max", *max as f64)],
        ),
        SendError::NotConnected(_) => error_json("not_connected", &message, &[]),
        SendError::NotOpen => error_json("not_open", &message, &[]),
        SendError::SessionFailed => error_json("session_failed", &message, &[]),
        SendError::BadRoom => error_json("bad_room", &message, &[]),
        SendError::TooManyRequests { max } => {
            error_json("too_many_requests", &message, &[("max", *max as f64)])
        }
        SendError::BadKey => error_json("bad_key", &message, &[]),
        SendError::TooManyKeys { max } => {
            error_json("too_many_keys", &message, &[("max", *max as f64)])
        }
        SendError::NotMember => error_json("not_member", &message, &[]),
        SendError::Unsupported(_) => error_json("unsupported", &message, &[]),
        _ => error_json("other", &message, &[]),
    }
}

/// The machine's counters as JSON.
pub(crate) fn stats_json(s: &ClientStats) -> String {
    let d = &s.delivery;
    let t = &s.traffic;
    Obj::new("stats")
        .num("connects", s.connects as f64)
        .num("opens", s.opens as f64)
        .num("resumes", s.resumes as f64)
        .num("sessionsLost", s.sessions_lost as f64)
        .num("messagesSent", d.messages_sent as f64)
        .num("retransmitted", d.retransmitted as f64)
        .num("messagesReceived", d.messages_received as f64)
        .num("duplicates", d.duplicates as f64)
        .num("gaps", d.gaps as f64)
        .num("framesIn", t.frames_in as f64)
        .num("framesOut", t.frames_out as f64)
        .num("bytesIn", t.bytes_in as f64)
        .num("bytesOut", t.bytes_out as f64)
        .num("decodeFailures", t.decode_failures as f64)
        .num("refused", s.refused as f64)
        .num("mapSnapshots", s.map_snapshots as f64)
        .num("mapValues", s.map_values as f64)
        .num("mapOverflows", s.map_overflows as f64)
        .done()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_json_objects_named_by_type() {
        let e = Event::SessionLost {
            reason: LostReason::NotResumed("unknown_session".into()),
            unconfirmed: vec![MessageId(3), MessageId(4)],
            unsent: vec![],
        };
        let v: serde_json::Value = serde_json::from_str(&event_json(&e)).unwrap();
        assert_eq!(v["type"], "sessionlost");
        assert_eq!(v["detail"], "unknown_session");
        assert_eq!(v["unconfirmed"], serde_json::json!([3, 4]));
        let e = Event::Missed {
            room: "r\"1".into(),
            from: u64::MAX - 1,
            to: None,
        };
        let v: serde_json::Value = serde_json::from_str(&event_json(&e)).unwrap();
        assert_eq!(v["room"], "r\"1");
        assert_eq!(v["from"], (u64::MAX - 1).to_string(), "offsets stay exact");
    }

    #[test]
    fn map_events_and_errors_are_named() {
        let e = Event::MapOverflow {
            room: "settings".into(),
            map: "a\"pp".into(),
        };
        let v: serde_json::Value = serde_json::from_str(&event_json(&e)).unwrap();
        assert_eq!(v["type"], "mapoverflow");
        assert_eq!(v["room"], "settings");
        assert_eq!(v["map"], "a\"pp");
        for (e, kind) in [
            (SendError::NotMember, "not_member"),
            (SendError::BadKey, "bad_key"),
            (SendError::Unsupported("bytes"), "unsupported"),
        ] {
            let v: serde_json::Value = serde_json::from_str(&send_error_json(&e)).unwrap();
            assert_eq!(v["error"], kind);
        }
    }

    #[test]
    fn numbers_are_written_without_float_formatting() {
        let text = |v: f64| {
            let mut out = Vec::new();
            push_num(&mut out, v);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(text(0.0), "0");
        assert_eq!(text(3.0), "3");
        assert_eq!(text(1500.25), "1500.25");
        assert_eq!(text(0.000_001), "0.000001");
        assert_eq!(text(12.050_3), "12.0503");
        assert_eq!(text(-2.5), "-2.5");
        assert_eq!(text(f64::NAN), "null");
        assert_eq!(text(9_007_199_254_740_991.0), "9007199254740991");
        let presence = Event::Presence {
            room: "r".into(),
            presence: kitestring_core::rooms::Presence {
                snapshot: true,
                joined: vec![Member {
                    client: "c".into(),
                    identity: Some("é\n".into()),
                }],
                left: vec![],
            },
        };
        let v: serde_json::Value = serde_json::from_str(&event_json(&presence)).unwrap();
        assert_eq!(
            v["joined"],
            serde_json::json!([{"client": "c", "identity": "é\n"}])
        );
        assert_eq!(v["left"], serde_json::json!([]));
    }
}
