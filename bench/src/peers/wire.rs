//! The load generator's protocol adapters, written by hand over raw
//! tokio-tungstenite messages so that the client's cost is the same kind of
//! code for every server: Kitestring's protocol (PROTOCOL.md: `hello` in the
//! upgrade or as the first frame, with the `stream` capability and a `join`
//! of the room (PROTOCOL.md, section 4), `welcome`, the room's broadcasts as stream entries (`sub`, then `pub`
//! and `skip` with contiguous offsets), `msg` frames acknowledged with
//! `ack` every 32 deliveries or 100 ms, pings), Engine.IO
//! v4 / Socket.IO v5 over WebSocket (`0{...}` open, `40` connect, `42[...]`
//! events, `2` ping answered with `3`), and the floor's raw binary.
//!
//! Every application payload is 32 bytes and carries its sender's sequence
//! number, which [`Session::read`] hands back with what kind of message it
//! was, so the caller can check exactly-once, in-order delivery.

use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use kitestring::Codec;
use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message;

use crate::child::ROOM;

/// Bytes of every application payload.
pub(crate) const PAYLOAD: usize = 32;

/// First byte of a binary payload, or the Socket.IO event name: a room
/// broadcast, or an echo of the client's own message.
const TAG_FANOUT: u8 = b'F';
const TAG_ECHO: u8 = b'E';
/// First byte of the floor's join frame (followed by the room name).
pub(crate) const FLOOR_JOIN: u8 = b'J';

/// Kitestring's acknowledgment rule (PROTOCOL.md, section 5).
const ACK_EVERY: u64 = 32;
const ACK_DELAY: Duration = Duration::from_millis(100);

/// Which protocol a connection speaks.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proto {
    /// Kitestring, with this envelope codec after the handshake.
    Kitestring(Codec),
    /// Engine.IO v4 / Socket.IO v5, WebSocket transport only.
    SocketIo,
    /// The floor's raw binary messages.
    Floor,
}

impl Proto {
    /// The path of the upgrade request.
    pub(crate) fn path(self) -> &'static str {
        match self {
            Proto::SocketIo => "/socket.io/?EIO=4&transport=websocket",
            _ => "/",
        }
    }
}

/// An application message read off a connection: its kind and the sequence
/// number its sender gave it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Got {
    Fanout(u64),
    Echo(u64),
}

/// A binary payload: tag, seven zero bytes, `seq` little-endian, 16 dots.
pub(crate) fn binary_payload(tag: u8, seq: u64) -> Bytes {
    let mut v = Vec::with_capacity(PAYLOAD);
    put_binary_payload(&mut v, tag, seq);
    Bytes::from(v)
}

/// Appends the [`binary_payload`] `tag`, `seq` to `v`.
fn put_binary_payload(v: &mut Vec<u8>, tag: u8, seq: u64) {
    v.push(tag);
    v.extend_from_slice(&[0; 7]);
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend_from_slice(&[b'.'; PAYLOAD - 16]);
}

/// The broadcast payload number `seq` (the child servers send these).
pub(crate) fn fanout_payload(seq: u64) -> Bytes {
    binary_payload(TAG_FANOUT, seq)
}

/// A Socket.IO payload: `seq` in 16 hex digits, padded to 32 characters.
pub(crate) fn text_payload(seq: u64) -> String {
    format!("{seq:016x}................")
}

fn read_binary_payload(b: &[u8]) -> Result<Got, String> {
    if b.len() != PAYLOAD {
        return Err(format!("a payload of {} bytes", b.len()));
    }
    let mut s = [0u8; 8];
    s.copy_from_slice(&b[8..16]);
    let seq = u64::from_le_bytes(s);
    match b[0] {
        TAG_FANOUT => Ok(Got::Fanout(seq)),
        TAG_ECHO => Ok(Got::Echo(seq)),
        t => Err(format!("a payload tagged {t:#04x}")),
    }
}

fn read_text_payload(s: &str) -> Result<u64, String> {
    if s.len() != PAYLOAD {
        return Err(format!("a payload of {} characters", s.len()));
    }
    u64::from_str_radix(&s[..16], 16).map_err(|e| format!("payload `{s}`: {e}"))
}

/// One connection's protocol state once its handshake is done.
pub(crate) struct Session {
    proto: Proto,
    /// Kitestring: the last `seq` this client sent (the join is 1).
    sent: u64,
    /// Kitestring: the last `seq` delivered from the server.
    delivered: u64,
    /// Kitestring: the last offset of the room's stream (PROTOCOL.md,
    /// section 3.4), once its `sub` has said where the stream starts.
    room_offset: Option<u64>,
    /// Kitestring: deliveries not acknowledged yet, and when they must be.
    unacked: u64,
    ack_due: Option<Instant>,
    /// Kitestring: the heartbeat the `welcome` asked for.
    ping_every: Duration,
    next_ping: Instant,
    nonce: u64,
    /// Frames to write besides the application's (acks, pongs).
    out: Vec<Message>,
}

impl Session {
    fn new(proto: Proto) -> Session {
        Session {
            proto,
            sent: 0,
            delivered: 0,
            room_offset: None,
            unacked: 0,
            ack_due: None,
            ping_every: Duration::from_secs(20),
            next_ping: Instant::now() + Duration::from_secs(20),
            nonce: 0,
            out: Vec::new(),
        }
    }

    /// The protocol this session speaks.
    pub(crate) fn proto(&self) -> Proto {
        self.proto
    }

    /// Control frames waiting to be written.
    pub(crate) fn take_out(&mut self) -> std::vec::Drain<'_, Message> {
        self.out.drain(..)
    }

    /// The application message carrying echo number `seq`.
    pub(crate) fn echo(&mut self, seq: u64) -> Message {
        match self.proto {
            Proto::Kitestring(codec) => {
                self.sent += 1;
                let ack = self.take_ack();
                kite_msg(codec, self.sent, ack, TAG_ECHO, seq)
            }
            Proto::SocketIo => Message::text(format!("42[\"echo\",\"{}\"]", text_payload(seq))),
            Proto::Floor => Message::Binary(binary_payload(TAG_ECHO, seq)),
        }
    }

    /// The frame that joins [`ROOM`]; none for Kitestring, whose `hello`
    /// asks for the room ([`kite_hello`]), nor for Socket.IO, whose connect
    /// packet does ([`socketio_connect`]).
    pub(crate) fn join(&mut self) -> Option<Message> {
        match self.proto {
            Proto::Kitestring(_) | Proto::SocketIo => None,
            Proto::Floor => {
                let mut v = vec![FLOOR_JOIN];
                v.extend_from_slice(ROOM.as_bytes());
                Some(Message::Binary(Bytes::from(v)))
            }
        }
    }

    /// The cumulative acknowledgment an outgoing `msg` carries; it
    /// acknowledges everything delivered so far.
    fn take_ack(&mut self) -> u64 {
        self.unacked = 0;
        self.ack_due = None;
        self.delivered
    }

    /// When [`on_timer`](Self::on_timer) has work next, if ever.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match self.proto {
            Proto::Kitestring(_) => Some(match self.ack_due {
                Some(a) => a.min(self.next_ping),
                None => self.next_ping,
            }),
            _ => None,
        }
    }

    /// Queues the acknowledgment or ping that is due.
    pub(crate) fn on_timer(&mut self, now: Instant) {
        let Proto::Kitestring(codec) = self.proto else {
            return;
        };
        if self.ack_due.is_some_and(|d| d <= now) {
            let ack = self.take_ack();
            self.out.push(kite_control(codec, "ack", ack));
        }
        if self.next_ping <= now {
            self.nonce += 1;
            self.next_ping = now + self.ping_every;
            self.out.push(kite_control(codec, "ping", self.nonce));
        }
    }

    /// Reads one message: the application message it carried, if any. An
    /// error is a protocol violation or a message this benchmark never
    /// expects (a refusal, a close, a payload of the wrong form).
    pub(crate) fn read(&mut self, m: Message) -> Result<Option<Got>, String> {
        match (self.proto, m) {
            (Proto::Kitestring(Codec::MsgPack), Message::Binary(b)) => {
                let body = unframe(&b)?;
                match read_pack(body) {
                    Some(env) => self.read_kite(env.t, env.seq, env.op, env.nonce, env.b),
                    // What the hand-written reader does not take, serde
                    // reads again to say what is wrong with it.
                    None => {
                        let env: KiteEnv<'_, &serde_bytes::Bytes> =
                            rmp_serde::from_slice(body).map_err(|e| format!("msgpack: {e}"))?;
                        let body = env.b.map(|b| &b[..]);
                        self.read_kite(env.t, env.seq, env.op, env.nonce, body)
                    }
                }
            }
            (Proto::Kitestring(Codec::Json), Message::Text(t)) => {
                let env: KiteEnv<'_, &str> =
                    serde_json::from_str(&t).map_err(|e| format!("json: {e}"))?;
                let body = match env.b {
                    Some(b) => Some(
                        base64::engine::general_purpose::STANDARD
                            .decode(b)
                            .map_err(|e| format!("base64: {e}"))?,
                    ),
                    None => None,
                };
                self.read_kite(env.t, env.seq, env.op, env.nonce, body.as_deref())
            }
            (Proto::SocketIo, Message::Text(t)) => read_socketio(&t, &mut self.out),
            (Proto::Floor, Message::Binary(b)) => read_binary_payload(&b).map(Some),
            (_, Message::Close(c)) => Err(format!("closed by the server: {c:?}")),
            (_, Message::Ping(_) | Message::Pong(_)) => Ok(None),
            (_, m) => Err(format!("an unexpected message: {m:?}")),
        }
    }

    fn read_kite(
        &mut self,
        t: &str,
        seq: Option<u64>,
        op: Option<&str>,
        nonce: Option<u64>,
        body: Option<&[u8]>,
    ) -> Result<Option<Got>, String> {
        let Proto::Kitestring(codec) = self.proto else {
            return Ok(None);
        };
        match t {
            "msg" => {
                let seq = seq.ok_or("a msg without seq")?;
                if seq != self.delivered + 1 {
                    return Err(format!(
                        "msg seq {seq} after {} (exactly once, in order)",
                        self.delivered
                    ));
                }
                self.delivered = seq;
                self.unacked += 1;
                if self.unacked >= ACK_EVERY {
                    let ack = self.take_ack();
                    self.out.push(kite_control(codec, "ack", ack));
                } else if self.ack_due.is_none() {
                    self.ack_due = Some(Instant::now() + ACK_DELAY);
                }
                if let Some(op) = op {
                    return Err(format!("a msg with op `{op}`"));
                }
                let body = body.ok_or("a msg without a binary payload")?;
                read_binary_payload(body).map(Some)
            }
            "ping" => {
                self.out
                    .push(kite_control(codec, "pong", nonce.unwrap_or(0)));
                Ok(None)
            }
            "sub" => {
                self.room_offset = Some(seq.ok_or("a sub without seq")?);
                Ok(None)
            }
            "pub" | "skip" => {
                let offset = seq.ok_or("a stream entry without seq")?;
                let last = self.room_offset.ok_or("a stream entry before its sub")?;
                if offset != last + 1 {
                    return Err(format!(
                        "stream offset {offset} after {last} (exactly once, in order)"
                    ));
                }
                self.room_offset = Some(offset);
                if t == "skip" || op.is_some() {
                    return Ok(None);
                }
                let body = body.ok_or("a stream entry without a binary payload")?;
                read_binary_payload(body).map(Some)
            }
            "ack" | "pong" => Ok(None),
            other => Err(format!("a `{other}` frame")),
        }
    }
}

/// The fields of a server envelope this client looks at; `B` is how the
/// codec carries bytes (MessagePack `bin`, JSON base64).
#[derive(Deserialize)]
struct KiteEnv<'a, B> {
    #[serde(borrow)]
    t: &'a str,
    seq: Option<u64>,
    #[serde(borrow)]
    op: Option<&'a str>,
    nonce: Option<u64>,
    b: Option<B>,
}

/// A server's MessagePack envelope as [`KiteEnv`], read by hand as the
/// other protocols' frames are: keys compared as bytes, every other field
/// skipped. `None` for anything it does not take (a key that is not a
/// string, a field of another type, a duplicate, trailing bytes), which
/// the caller reads again with serde for its error.
fn read_pack(mut rd: &[u8]) -> Option<KiteEnv<'_, &[u8]>> {
    use rmp::decode::{read_bin_len, read_int, read_map_len, read_str_len};
    fn take<'a>(rd: &mut &'a [u8], len: usize) -> Option<&'a [u8]> {
        let (b, rest) = rd.split_at_checked(len)?;
        *rd = rest;
        Some(b)
    }
    fn str<'a>(rd: &mut &'a [u8]) -> Option<&'a str> {
        let len = read_str_len(rd).ok()?;
        std::str::from_utf8(take(rd, len as usize)?).ok()
    }
    fn once<T>(field: &mut Option<T>, value: Option<T>) -> Option<()> {
        if field.is_some() {
            return None;
        }
        *field = Some(value?);
        Some(())
    }
    let mut t = None;
    let mut env = KiteEnv {
        t: "",
        seq: None,
        op: None,
        nonce: None,
        b: None,
    };
    for _ in 0..read_map_len(&mut rd).ok()? {
        let len = read_str_len(&mut rd).ok()?;
        match take(&mut rd, len as usize)? {
            b"t" => once(&mut t, str(&mut rd))?,
            b"seq" => once(&mut env.seq, read_int(&mut rd).ok())?,
            b"op" => once(&mut env.op, str(&mut rd))?,
            b"nonce" => once(&mut env.nonce, read_int(&mut rd).ok())?,
            b"b" => {
                let len = read_bin_len(&mut rd).ok()?;
                once(&mut env.b, take(&mut rd, len as usize))?
            }
            _ => skip_value(&mut rd, 0)?,
        }
    }
    env.t = t?;
    rd.is_empty().then_some(env)
}

/// Steps over one MessagePack value of any type, nested at most 16 deep.
fn skip_value(rd: &mut &[u8], depth: u32) -> Option<()> {
    use rmp::Marker;
    fn be(rd: &mut &[u8], n: usize) -> Option<usize> {
        let (b, rest) = rd.split_at_checked(n)?;
        *rd = rest;
        Some(b.iter().fold(0usize, |acc, &x| acc << 8 | usize::from(x)))
    }
    if depth > 16 {
        return None;
    }
    let marker = rmp::decode::read_marker(rd).ok()?;
    let (bytes, values) = match marker {
        Marker::FixPos(_) | Marker::FixNeg(_) | Marker::Null | Marker::True | Marker::False => {
            (0, 0)
        }
        Marker::U8 | Marker::I8 => (1, 0),
        Marker::U16 | Marker::I16 => (2, 0),
        Marker::U32 | Marker::I32 | Marker::F32 => (4, 0),
        Marker::U64 | Marker::I64 | Marker::F64 => (8, 0),
        Marker::FixStr(n) => (usize::from(n), 0),
        Marker::Str8 | Marker::Bin8 => (be(rd, 1)?, 0),
        Marker::Str16 | Marker::Bin16 => (be(rd, 2)?, 0),
        Marker::Str32 | Marker::Bin32 => (be(rd, 4)?, 0),
        Marker::FixArray(n) => (0, usize::from(n)),
        Marker::Array16 => (0, be(rd, 2)?),
        Marker::Array32 => (0, be(rd, 4)?),
        Marker::FixMap(n) => (0, 2 * usize::from(n)),
        Marker::Map16 => (0, 2 * be(rd, 2)?),
        Marker::Map32 => (0, 2 * be(rd, 4)?),
        Marker::FixExt1 => (2, 0),
        Marker::FixExt2 => (3, 0),
        Marker::FixExt4 => (5, 0),
        Marker::FixExt8 => (9, 0),
        Marker::FixExt16 => (17, 0),
        Marker::Ext8 => (be(rd, 1)? + 1, 0),
        Marker::Ext16 => (be(rd, 2)? + 1, 0),
        Marker::Ext32 => (be(rd, 4)? + 1, 0),
        Marker::Reserved => return None,
    };
    *rd = rd.get(bytes..)?;
    for _ in 0..values {
        skip_value(rd, depth + 1)?;
    }
    Some(())
}

/// The MessagePack body of a binary kind-1 message (PROTOCOL.md, section 1).
fn unframe(b: &[u8]) -> Result<&[u8], String> {
    if b.len() < 6 || b[0] != 0x01 || b[1] != 1 {
        return Err("a binary message that is not a MessagePack envelope".into());
    }
    let mut len = [0u8; 4];
    len.copy_from_slice(&b[2..6]);
    if u32::from_le_bytes(len) as usize != b.len() - 6 {
        return Err("a MessagePack envelope of the wrong length".into());
    }
    Ok(&b[6..])
}

/// A vector of `capacity` bytes starting with the 6-byte header of a
/// MessagePack envelope, its length still 0 ([`framed`] sets it).
fn frame_start(capacity: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(capacity);
    v.extend_from_slice(&[0x01, 1, 0, 0, 0, 0]);
    v
}

/// The envelope [`frame_start`] began, with its length in the header.
fn framed(mut v: Vec<u8>) -> Message {
    let len = (v.len() - 6) as u32;
    v[2..6].copy_from_slice(&len.to_le_bytes());
    Message::Binary(Bytes::from(v))
}

/// A client `msg` carrying the [`binary_payload`] `tag`, `n` (its `id` is
/// its `seq`: unique and increasing).
fn kite_msg(codec: Codec, seq: u64, ack: u64, tag: u8, n: u64) -> Message {
    match codec {
        Codec::Json => {
            let b = base64::engine::general_purpose::STANDARD.encode(binary_payload(tag, n));
            Message::text(format!(
                "{{\"t\":\"msg\",\"seq\":{seq},\"id\":{seq},\"ack\":{ack},\"b\":\"{b}\"}}"
            ))
        }
        _ => {
            let mut v = frame_start(96);
            // Writes into a Vec cannot fail.
            let _ = rmp::encode::write_map_len(&mut v, 5);
            let _ = rmp::encode::write_str(&mut v, "t");
            let _ = rmp::encode::write_str(&mut v, "msg");
            for (k, n) in [("seq", seq), ("id", seq), ("ack", ack)] {
                let _ = rmp::encode::write_str(&mut v, k);
                let _ = rmp::encode::write_uint(&mut v, n);
            }
            let _ = rmp::encode::write_str(&mut v, "b");
            let _ = rmp::encode::write_bin_len(&mut v, PAYLOAD as u32);
            put_binary_payload(&mut v, tag, n);
            framed(v)
        }
    }
}

/// An `ack` (field `ack`) or a `ping`/`pong` (field `nonce`).
fn kite_control(codec: Codec, t: &str, n: u64) -> Message {
    let key = if t == "ack" { "ack" } else { "nonce" };
    match codec {
        Codec::Json => Message::text(format!("{{\"t\":\"{t}\",\"{key}\":{n}}}")),
        _ => {
            let mut v = frame_start(32);
            let _ = rmp::encode::write_map_len(&mut v, 2);
            let _ = rmp::encode::write_str(&mut v, "t");
            let _ = rmp::encode::write_str(&mut v, t);
            let _ = rmp::encode::write_str(&mut v, key);
            let _ = rmp::encode::write_uint(&mut v, n);
            framed(v)
        }
    }
}

/// The `hello` (always JSON), for the `Kitestring-Hello` header or a first
/// frame. `client` is this connection's number, as 32 hex digits.
pub(crate) fn kite_hello(codec: Codec, client: u64) -> String {
    let codec = match codec {
        Codec::Json => "json",
        _ => "msgpack",
    };
    format!(
        "{{\"t\":\"hello\",\"versions\":[1],\"client\":\"{client:032x}\",\"caps\":[\"stream\"],\"codecs\":[\"{codec}\"],\"join\":[\"{ROOM}\"]}}"
    )
}

/// The fields of a `welcome` this client uses.
#[derive(Deserialize)]
struct Welcome {
    t: String,
    codec: Option<String>,
    ping_ms: Option<u64>,
    reason: Option<String>,
}

/// A session opened by the `welcome` `text` (from the header or the first
/// frame).
pub(crate) fn kite_welcome(codec: Codec, text: &str) -> Result<Session, String> {
    let w: Welcome = serde_json::from_str(text).map_err(|e| format!("welcome: {e}"))?;
    if w.t != "welcome" {
        return Err(format!("a `{}` instead of a welcome: {:?}", w.t, w.reason));
    }
    let want = match codec {
        Codec::Json => "json",
        _ => "msgpack",
    };
    if w.codec.as_deref() != Some(want) {
        return Err(format!("welcome with codec {:?}", w.codec));
    }
    let mut s = Session::new(Proto::Kitestring(codec));
    s.ping_every = Duration::from_millis(w.ping_ms.unwrap_or(20_000).max(1));
    s.next_ping = Instant::now() + s.ping_every;
    Ok(s)
}

/// A session opened by the Engine.IO open packet
/// `0{"sid":...,"pingInterval":25000,...}` (the server pings, the session
/// answers).
pub(crate) fn socketio_open(text: &str) -> Result<Session, String> {
    let open: Option<serde_json::Value> = text
        .strip_prefix('0')
        .and_then(|body| serde_json::from_str(body).ok());
    match open {
        Some(o) if o.get("sid").is_some() => Ok(Session::new(Proto::SocketIo)),
        _ => Err(format!("`{text}` instead of an Engine.IO open packet")),
    }
}

/// Whether `text` is the Socket.IO connect acknowledgment of the main
/// namespace (`40{"sid":...}`); a `44` (connect error) is an error.
pub(crate) fn socketio_connected(text: &str) -> Result<bool, String> {
    if text.starts_with("40") {
        Ok(true)
    } else if text.starts_with("44") {
        Err(format!("connect error: {text}"))
    } else {
        Ok(false)
    }
}

/// The client's Socket.IO connect packet for the main namespace, whose
/// auth payload names the room to join: the servers join the socket in
/// their connection handler. (A `join` event sent right after the connect
/// acknowledgment is not the same: socketioxide sends that acknowledgment
/// before its connection handler has registered the event handlers, and
/// drops events that arrive in between.)
pub(crate) fn socketio_connect() -> String {
    format!("40{{\"join\":\"{ROOM}\"}}")
}
/// Engine.IO v4's ping (from the server) and pong.
pub(crate) const SOCKETIO_PING: &str = "2";
pub(crate) const SOCKETIO_PONG: &str = "3";

/// A floor session: the upgrade is its whole handshake.
pub(crate) fn floor_session() -> Session {
    Session::new(Proto::Floor)
}

/// One Engine.IO / Socket.IO text packet: a ping is answered, an event
/// `fanout` or `echo` with one string is an application message.
fn read_socketio(t: &str, out: &mut Vec<Message>) -> Result<Option<Got>, String> {
    if t == SOCKETIO_PING {
        out.push(Message::text(SOCKETIO_PONG));
        return Ok(None);
    }
    let Some(event) = t.strip_prefix("42") else {
        if t.starts_with('1') || t.starts_with("41") {
            return Err(format!("disconnected by the server: `{t}`"));
        }
        return Ok(None);
    };
    let (name, data): (&str, &str) =
        serde_json::from_str(event).map_err(|e| format!("event `{t}`: {e}"))?;
    let seq = read_text_payload(data)?;
    match name.as_bytes().first() {
        Some(b'f') if name == "fanout" => Ok(Some(Got::Fanout(seq))),
        Some(b'e') if name == "echo" => Ok(Some(Got::Echo(seq))),
        _ => Err(format!("an event `{name}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(codec: Codec) {
        // What a Kitestring server would send back: the client's own frame
        // carries the same fields.
        let mut s = Session::new(Proto::Kitestring(codec));
        let m = s.echo(7);
        assert_eq!(s.read(m), Ok(Some(Got::Echo(7))));
        assert_eq!(s.delivered, 1);
    }

    #[test]
    fn kitestring_frames_read_back() {
        roundtrip(Codec::MsgPack);
        roundtrip(Codec::Json);
    }

    /// A server envelope with the fields this client reads and, around
    /// them, fields of every other MessagePack type.
    fn server_envelope(extra: bool, dup: bool) -> Vec<u8> {
        use rmp::encode::*;
        let mut v = Vec::new();
        let n = 4 + if extra { 9 } else { 0 } + u32::from(dup);
        write_map_len(&mut v, n).unwrap();
        if extra {
            write_str(&mut v, "ack").unwrap();
            write_uint(&mut v, u64::MAX).unwrap();
            write_str(&mut v, "neg").unwrap();
            write_sint(&mut v, -70_000).unwrap();
            write_str(&mut v, "f").unwrap();
            write_f64(&mut v, 1.5).unwrap();
            write_str(&mut v, "nil").unwrap();
            write_nil(&mut v).unwrap();
            write_str(&mut v, "long").unwrap();
            write_str(&mut v, &"x".repeat(300)).unwrap();
            write_str(&mut v, "bin").unwrap();
            write_bin(&mut v, &[7; 70_000]).unwrap();
            write_str(&mut v, "list").unwrap();
            write_array_len(&mut v, 2).unwrap();
            write_bool(&mut v, true).unwrap();
            write_map_len(&mut v, 1).unwrap();
            write_str(&mut v, "k").unwrap();
            write_array_len(&mut v, 0).unwrap();
            write_str(&mut v, "ext").unwrap();
            write_ext_meta(&mut v, 3, 5).unwrap();
            v.extend_from_slice(&[1, 2, 3]);
            write_str(&mut v, "fixext").unwrap();
            write_ext_meta(&mut v, 4, 1).unwrap();
            v.extend_from_slice(&[9; 4]);
        }
        write_str(&mut v, "t").unwrap();
        write_str(&mut v, "msg").unwrap();
        write_str(&mut v, "seq").unwrap();
        write_uint(&mut v, 300).unwrap();
        write_str(&mut v, "nonce").unwrap();
        write_uint(&mut v, 9).unwrap();
        write_str(&mut v, "b").unwrap();
        write_bin(&mut v, &binary_payload(TAG_ECHO, 5)).unwrap();
        if dup {
            write_str(&mut v, "seq").unwrap();
            write_uint(&mut v, 301).unwrap();
        }
        v
    }

    #[test]
    fn the_hand_written_reader_agrees_with_serde() {
        for extra in [false, true] {
            let v = server_envelope(extra, false);
            let by_hand = read_pack(&v).expect("read by hand");
            let serde: KiteEnv<'_, &serde_bytes::Bytes> = rmp_serde::from_slice(&v).unwrap();
            assert_eq!(by_hand.t, serde.t);
            assert_eq!((by_hand.seq, by_hand.nonce), (serde.seq, serde.nonce));
            assert_eq!((by_hand.seq, by_hand.nonce), (Some(300), Some(9)));
            assert_eq!(by_hand.op, serde.op);
            assert_eq!(by_hand.b, serde.b.map(|b| &b[..]));
            // Cut anywhere, it is refused rather than misread.
            for end in 0..v.len() {
                assert!(read_pack(&v[..end]).is_none(), "cut at {end}");
            }
            // So is a byte too many.
            let mut longer = v.clone();
            longer.push(0xc0);
            assert!(read_pack(&longer).is_none());
        }
        // A duplicate field is refused, as serde refuses it.
        let v = server_envelope(true, true);
        assert!(read_pack(&v).is_none());
        assert!(rmp_serde::from_slice::<KiteEnv<'_, &serde_bytes::Bytes>>(&v).is_err());
        // And so is a field of the wrong type, which serde names.
        let mut v = Vec::new();
        rmp::encode::write_map_len(&mut v, 2).unwrap();
        rmp::encode::write_str(&mut v, "t").unwrap();
        rmp::encode::write_str(&mut v, "msg").unwrap();
        rmp::encode::write_str(&mut v, "seq").unwrap();
        rmp::encode::write_str(&mut v, "1").unwrap();
        assert!(read_pack(&v).is_none());
        let mut framed = vec![0x01, 1];
        framed.extend_from_slice(&(v.len() as u32).to_le_bytes());
        framed.extend_from_slice(&v);
        let mut s = Session::new(Proto::Kitestring(Codec::MsgPack));
        let err = s.read(Message::Binary(framed.into())).unwrap_err();
        assert!(err.starts_with("msgpack:"), "{err}");
    }

    #[test]
    fn socketio_packets() {
        let mut out = Vec::new();
        let ev = format!("42[\"fanout\",\"{}\"]", text_payload(42));
        assert_eq!(read_socketio(&ev, &mut out), Ok(Some(Got::Fanout(42))));
        assert_eq!(read_socketio("2", &mut out), Ok(None));
        assert_eq!(out, vec![Message::text("3")]);
        assert!(read_socketio("41", &mut out).is_err());
    }

    #[test]
    fn binary_payloads() {
        assert_eq!(
            read_binary_payload(&fanout_payload(u64::MAX)),
            Ok(Got::Fanout(u64::MAX))
        );
        assert!(read_binary_payload(&[0; 31]).is_err());
    }
}
