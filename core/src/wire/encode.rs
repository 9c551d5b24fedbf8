//! Frames to bytes: every envelope written by hand.
//!
//! Owns every envelope the core writes. `msg` envelopes, on every message's
//! path, are written by hand with exactly the bytes serde would write (the
//! serde forms are kept as the tests' oracle); the other envelopes by one
//! hand-written writer of the serde form per codec (JSON handshakes
//! included), so that neither codec needs a serde serializer. The payload of
//! a `msg` and the value of an `mv` can take each [`Form`]: embedded,
//! detached or deflated. It never decides which buffer a frame is written to
//! (the machines' [`Encoder`](super::Encoder) does) nor whether a payload
//! goes detached ([`detaches`](super::detaches) and the encoder do).

use std::borrow::Cow;

#[cfg(feature = "compression")]
use super::deflated::deflated_key;
#[cfg(any(feature = "server", test))]
use super::envelope::RawJson;
use super::envelope::{JsonEnvelope, PackEnvelope};
use super::error::serializer_error;
use super::header::seal_msgpack;
use super::json::{push_json_str, push_uint};
#[cfg(any(feature = "server", test))]
use super::MapValue;
use super::{EncodeError, Frame, Msg, MsgKind, Payload, PayloadKind, BINARY_HEADER_LEN};

/// Bytes reserved for encoding a handshake frame, so that it takes one
/// allocation: a `hello` is about 200 bytes with its capabilities, a
/// `welcome` about 290 with its features and resume key.
const HANDSHAKE_CAPACITY: usize = 512;

/// How a `msg` envelope carries its payload (and an `mv` its value).
#[derive(Clone, Copy, Debug)]
pub(super) enum Form<'a> {
    /// In the envelope: `j`, `m` or `b`.
    Embedded,
    /// Its length in its place (`dj`, `dm`, `db`); the payload follows as
    /// the next message (section 2.1).
    Detached,
    /// Deflated (section 2.2): `z`, the payload's length, and `bytes`, the
    /// deflated payload, in the envelope (`zj`, `zm`, `zb`) or, `detached`,
    /// following as the next message, its length in `dj`, `dm` or `db`.
    /// (Only with the `compression` feature.)
    #[cfg(feature = "compression")]
    Deflated { bytes: &'a [u8], detached: bool },
    /// Without the `compression` feature: never made, it only holds the
    /// lifetime.
    #[cfg(not(feature = "compression"))]
    #[allow(dead_code)]
    Never(core::convert::Infallible, core::marker::PhantomData<&'a ()>),
}

pub(super) fn encode_handshake(frame: &Frame, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    // Room for a typical hello or welcome in one allocation.
    out.reserve(HANDSHAKE_CAPACITY);
    match frame {
        // Written straight from the frame, in the field order of
        // `HandshakeEnvelope`, which serde writes (the tests check the text
        // against serde's): the envelope would cost a vector per list (four
        // for a `hello`, one for a `welcome`) on every connection.
        Frame::Hello(h) => write_json_hello(h, out),
        #[cfg(any(feature = "server", test))]
        Frame::Welcome(w) => write_json_welcome(w, out),
        #[cfg(any(feature = "server", test))]
        Frame::Reject(r) => write_json_reject(r, out),
        _ => return Err(EncodeError::Unrepresentable),
    }
    Ok(())
}

/// Writes a `hello`.
fn write_json_hello(h: &super::Hello, out: &mut Vec<u8>) {
    let mut o = JsonObject::new(out);
    o.str("t", Some("hello"));
    o.list("versions", Some(&h.versions), |out, v| {
        push_uint(out, u64::from(*v))
    });
    o.str("client", Some(h.client.hex().as_str()));
    if let Some(r) = &h.resume {
        o.str("session", Some(r.session.hex().as_str()));
        o.uint("delivered", Some(r.delivered));
        o.uint("acked", r.acked);
    }
    o.list("caps", Some(&h.caps), |out, c| push_json_str(out, c));
    o.list("codecs", Some(&h.codecs), |out, c| {
        push_json_str(out, c.name())
    });
    if !h.join.is_empty() {
        o.list("join", Some(&h.join), |out, r| push_json_str(out, r));
    }
    if let Some(key) = h.resume.as_ref().and_then(|r| r.key) {
        o.str("key", Some(key.hex().as_str()));
    }
    o.end();
}

/// Writes a `welcome`.
#[cfg(any(feature = "server", test))]
fn write_json_welcome(w: &super::Welcome, out: &mut Vec<u8>) {
    let mut o = JsonObject::new(out);
    o.str("t", Some("welcome"));
    o.str("session", Some(w.session.hex().as_str()));
    o.uint("delivered", Some(w.delivered));
    o.bool("recovered", w.recovered.then_some(true));
    o.uint("version", Some(u64::from(w.version)));
    o.str("codec", Some(w.codec.name()));
    o.bool("resumed", Some(w.resumed));
    o.str("lost", w.lost.as_deref());
    o.list("features", Some(&w.features), |out, f| {
        push_json_str(out, f)
    });
    o.uint("ping_ms", Some(w.ping_interval_ms));
    o.uint("pong_ms", Some(w.pong_timeout_ms));
    o.uint("max", Some(w.max_message));
    if let Some(key) = w.key {
        o.str("key", Some(key.hex().as_str()));
    }
    o.end();
}

/// Writes a `reject`.
#[cfg(any(feature = "server", test))]
fn write_json_reject(r: &super::Reject, out: &mut Vec<u8>) {
    let mut o = JsonObject::new(out);
    o.str("t", Some("reject"));
    o.list("versions", Some(&r.versions), |out, v| {
        push_uint(out, u64::from(*v))
    });
    o.uint("code", Some(u64::from(r.code)));
    o.str("reason", Some(&r.reason));
    o.str("message", Some(&r.message));
    o.uint("retry", r.retry_after_ms);
    o.end();
}

/// The fields of a `sub` envelope.
macro_rules! fill_sub {
    ($env:ident, $pos:expr) => {{
        $env.t = "sub".into();
        $env.r = Some(Cow::Borrowed(&$pos.room));
        $env.e = Some($pos.epoch);
        $env.seq = Some($pos.offset);
        $env.from = $pos.missed_from;
    }};
}

/// A `subs` envelope of type `$ty`: one `sub` envelope a position.
macro_rules! subs_envelope {
    ($ty:ident, $list:expr) => {{
        let mut env = $ty::default();
        env.t = "subs".into();
        env.f = Some(
            $list
                .iter()
                .map(|pos| {
                    let mut inner = $ty::default();
                    fill_sub!(inner, pos);
                    inner
                })
                .collect(),
        );
        env
    }};
}

/// The envelope fields of a room stream entry, payload aside.
#[cfg(any(feature = "server", test))]
macro_rules! fill_entry {
    ($env:ident, $e:expr) => {{
        $env.t = "pub".into();
        $env.seq = Some($e.offset);
        $env.ts = $e.ts;
        $env.op = $e.kind.op().map(Cow::Borrowed);
        $env.r = Some(Cow::Borrowed(&$e.room));
    }};
}

/// Fills an `lv` envelope but its payload.
#[cfg(any(feature = "server", test))]
macro_rules! fill_latest {
    ($env:ident, $v:expr) => {{
        $env.t = "lv".into();
        $env.seq = Some($v.version);
        $env.e = Some($v.epoch);
        $env.r = Some(Cow::Borrowed(&$v.room));
        $env.k = Some(Cow::Borrowed(&$v.key));
    }};
}

/// Fills an `mv` envelope but its value.
#[cfg(any(feature = "server", test))]
macro_rules! fill_map_value {
    ($env:ident, $v:expr) => {{
        $env.t = "mv".into();
        $env.id = $v.settles;
        $env.ts = Some($v.stamp.physical_ms);
        $env.r = Some(Cow::Borrowed(&$v.room));
        $env.k = Some(Cow::Borrowed(&$v.key));
        $env.n = Some(Cow::Borrowed(&$v.map));
        $env.hl = Some(u64::from($v.stamp.logical));
        $env.hn = Some($v.stamp.node);
    }};
}

/// Sets the one of three fields (`dj`/`dm`/`db`, `zj`/`zm`/`zb`) that
/// stands for a payload of `kind`.
#[cfg(any(feature = "server", test))]
macro_rules! by_kind {
    ($kind:expr, $j:expr, $m:expr, $b:expr, $value:expr) => {
        match $kind {
            PayloadKind::Json => $j = $value,
            PayloadKind::MsgPack => $m = $value,
            PayloadKind::Binary => $b = $value,
        }
    };
}

/// An `mv` envelope of type `$ty`, its value (if any) carried as `$form`
/// says: embedded by `$embed`, or its deflated bytes by `$carry`.
#[cfg(any(feature = "server", test))]
macro_rules! map_value_envelope {
    ($ty:ident, $v:expr, $form:expr, $embed:ident, $carry:expr) => {{
        let mut env = $ty::default();
        fill_map_value!(env, $v);
        if let Some(p) = &$v.value {
            let len = |n: usize| Some(n as u64);
            match $form {
                Form::Embedded => $embed(&mut env, p)?,
                Form::Detached => by_kind!(p.kind, env.dj, env.dm, env.db, len(p.len())),
                #[cfg(feature = "compression")]
                Form::Deflated { bytes, detached } => {
                    env.z = len(p.len());
                    if detached {
                        by_kind!(p.kind, env.dj, env.dm, env.db, len(bytes.len()));
                    } else {
                        by_kind!(p.kind, env.zj, env.zm, env.zb, Some($carry(bytes)));
                    }
                }
                #[cfg(not(feature = "compression"))]
                Form::Never(never, _) => match never {},
            }
        }
        env
    }};
}

/// Fills a `pub` or `lv` envelope but its payload, and evaluates to that
/// payload; returns `Unrepresentable` from the caller for other frames.
#[cfg(any(feature = "server", test))]
macro_rules! fill_room_value {
    ($env:ident, $frame:expr) => {
        match $frame {
            Frame::Pub(e) => {
                fill_entry!($env, e);
                &e.payload
            }
            Frame::Latest(v) => {
                fill_latest!($env, v);
                &v.payload
            }
            _ => return Err(EncodeError::Unrepresentable),
        }
    };
}

/// Fills the fields every non-handshake envelope shares; the payload is
/// filled by the codec-specific caller.
macro_rules! fill_common {
    ($env:ident, $frame:expr) => {
        match $frame {
            Frame::Ping { nonce } => {
                $env.t = "ping".into();
                $env.nonce = Some(*nonce);
            }
            Frame::Pong { nonce } => {
                $env.t = "pong".into();
                $env.nonce = Some(*nonce);
            }
            Frame::Ack { ack } => {
                $env.t = "ack".into();
                $env.ack = Some(*ack);
            }
            Frame::Replay { from } => {
                $env.t = "replay".into();
                $env.from = Some(*from);
            }
            #[cfg(any(feature = "server", test))]
            Frame::GoAway {
                code,
                retry_after_ms,
            } => {
                $env.t = "goaway".into();
                $env.code = Some(*code);
                $env.retry = *retry_after_ms;
            }
            #[cfg(any(feature = "server", test))]
            Frame::Reauth { within_ms } => {
                $env.t = "reauth".into();
                $env.within = Some(*within_ms);
            }
            Frame::Auth { token } => {
                $env.t = "auth".into();
                $env.token = Some(token.as_str().into());
            }
            #[cfg(any(feature = "server", test))]
            Frame::Skip { room, offset } => {
                $env.t = "skip".into();
                $env.seq = Some(*offset);
                $env.r = Some(Cow::Borrowed(room));
            }
            #[cfg(any(feature = "server", test))]
            Frame::Sub(pos) => fill_sub!($env, pos),
            #[cfg(any(feature = "server", test))]
            Frame::MapSnapshot(s) => {
                $env.t = "ms".into();
                $env.seq = Some(s.entries);
                $env.r = Some(Cow::Borrowed(&s.room));
                $env.n = Some(Cow::Borrowed(&s.map));
            }
            _ => return Err(EncodeError::Unrepresentable),
        }
    };
}

/// Puts a payload into a JSON envelope (the serde way).
#[cfg(any(feature = "server", test))]
pub(super) fn json_payload_into<'a>(
    env: &mut JsonEnvelope<'a>,
    p: &'a Payload,
) -> Result<(), EncodeError> {
    let data = &p.data;
    match p.kind {
        PayloadKind::Json => {
            // Checked at construction; a failure here means a bug, reported not panicked.
            let raw = std::str::from_utf8(data).map_err(serializer_error)?;
            env.j = Some(RawJson(raw));
        }
        PayloadKind::MsgPack => env.m = Some(Cow::Owned(crate::base64::encode(data))),
        PayloadKind::Binary => env.b = Some(Cow::Owned(crate::base64::encode(data))),
    }
    Ok(())
}

/// Puts a payload into a MessagePack envelope (the serde way).
#[cfg(any(feature = "server", test))]
pub(super) fn pack_payload_into<'a>(
    env: &mut PackEnvelope<'a>,
    p: &'a Payload,
) -> Result<(), EncodeError> {
    let data: &[u8] = &p.data;
    match p.kind {
        PayloadKind::Json => {
            let s = std::str::from_utf8(data).map_err(serializer_error)?;
            env.j = Some(s.into());
        }
        PayloadKind::MsgPack => env.m = Some(serde_bytes::Bytes::new(data)),
        PayloadKind::Binary => env.b = Some(serde_bytes::Bytes::new(data)),
    }
    Ok(())
}

/// The JSON envelope of `v`, its value carried as `form` says (deflated
/// bytes in base64).
#[cfg(any(feature = "server", test))]
pub(super) fn json_map_value<'a>(
    v: &'a MapValue,
    form: Form<'a>,
) -> Result<JsonEnvelope<'a>, EncodeError> {
    // (Only deflated bytes are carried: without `compression`, never.)
    #[cfg(feature = "compression")]
    let carry = |bytes: &[u8]| Cow::Owned(crate::base64::encode(bytes));
    Ok(map_value_envelope!(
        JsonEnvelope,
        v,
        form,
        json_payload_into,
        carry
    ))
}

/// The MessagePack envelope of `v`, its value carried as `form` says
/// (deflated bytes as `bin`).
#[cfg(any(feature = "server", test))]
pub(super) fn pack_map_value<'a>(
    v: &'a MapValue,
    form: Form<'a>,
) -> Result<PackEnvelope<'a>, EncodeError> {
    Ok(map_value_envelope!(
        PackEnvelope,
        v,
        form,
        pack_payload_into,
        serde_bytes::Bytes::new
    ))
}

#[inline]
pub(super) fn encode_json(frame: &Frame, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    match frame {
        // The hot path, written by hand: a JSON payload was validated when
        // the `Payload` was made and is copied in as is, not parsed again.
        Frame::Msg(m) => write_json_msg(m, out, Form::Embedded),
        Frame::Batch(msgs) => {
            out.extend_from_slice(br#"{"t":"batch","f":["#);
            for (i, m) in msgs.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json_msg(m, out, Form::Embedded)?;
            }
            out.extend_from_slice(b"]}");
            Ok(())
        }
        Frame::Subs(list) => {
            let env = subs_envelope!(JsonEnvelope, list);
            write_json_envelope(&env, out);
            Ok(())
        }
        // One arm for both, so that the payload's code is there once.
        #[cfg(any(feature = "server", test))]
        Frame::Pub(_) | Frame::Latest(_) => {
            let mut env = JsonEnvelope::default();
            let payload = fill_room_value!(env, frame);
            json_payload_into(&mut env, payload)?;
            write_json_envelope(&env, out);
            Ok(())
        }
        #[cfg(any(feature = "server", test))]
        Frame::MapValue(v) => {
            write_json_envelope(&json_map_value(v, Form::Embedded)?, out);
            Ok(())
        }
        _ => {
            let mut env = JsonEnvelope::default();
            fill_common!(env, frame);
            write_json_envelope(&env, out);
            Ok(())
        }
    }
}

impl Form<'_> {
    /// Whether the payload is deflated (and `z` is written).
    fn is_deflated(self) -> bool {
        #[cfg(feature = "compression")]
        if let Form::Deflated { .. } = self {
            return true;
        }
        false
    }
}

/// The MessagePack writers (`packwrite`) never fail: their error type has
/// no values, and this (for their `?`) is never called.
pub(super) fn vec_write(never: std::convert::Infallible) -> EncodeError {
    match never {}
}

/// Writes JSON objects as serde_json writes a struct (compact, fields in
/// declaration order, absent ones left out).
struct JsonObject<'o> {
    out: &'o mut Vec<u8>,
    first: bool,
}

impl<'o> JsonObject<'o> {
    fn new(out: &'o mut Vec<u8>) -> Self {
        out.push(b'{');
        JsonObject { out, first: true }
    }

    /// The key of the next field: `"key":`.
    fn key(&mut self, key: &str) -> &mut Vec<u8> {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
        self.out
    }

    fn uint(&mut self, key: &str, v: Option<u64>) {
        if let Some(v) = v {
            push_uint(self.key(key), v);
        }
    }

    fn str(&mut self, key: &str, v: Option<&str>) {
        if let Some(v) = v {
            push_json_str(self.key(key), v);
        }
    }

    fn bool(&mut self, key: &str, v: Option<bool>) {
        if let Some(v) = v {
            let text: &[u8] = if v { b"true" } else { b"false" };
            self.key(key).extend_from_slice(text);
        }
    }

    fn list<T>(&mut self, key: &str, v: Option<&[T]>, mut item: impl FnMut(&mut Vec<u8>, &T)) {
        if let Some(v) = v {
            let out = self.key(key);
            out.push(b'[');
            for (i, x) in v.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                item(out, x);
            }
            out.push(b']');
        }
    }

    fn end(self) {
        self.out.push(b'}');
    }
}

/// Writes `env` as serde_json writes it (the tests check the two agree).
pub(super) fn write_json_envelope(env: &JsonEnvelope<'_>, out: &mut Vec<u8>) {
    let mut o = JsonObject::new(out);
    // The fields in `server` blocks are set only by the frames only a
    // server writes (`msg` and `batch` have writers of their own).
    o.str("t", Some(&env.t));
    o.uint("seq", env.seq);
    #[cfg(any(feature = "server", test))]
    o.uint("id", env.id);
    o.uint("ack", env.ack);
    #[cfg(any(feature = "server", test))]
    {
        o.uint("ts", env.ts);
        if let Some(j) = env.j {
            o.key("j").extend_from_slice(j.get().as_bytes());
        }
        o.str("m", env.m.as_deref());
        o.str("b", env.b.as_deref());
    }
    o.uint("nonce", env.nonce);
    o.uint("from", env.from);
    #[cfg(any(feature = "server", test))]
    {
        o.uint("code", env.code.map(u64::from));
        o.uint("retry", env.retry);
    }
    o.str("r", env.r.as_deref());
    #[cfg(any(feature = "server", test))]
    {
        o.str("op", env.op.as_deref());
        o.bool("rq", env.rq);
        o.uint("rs", env.rs);
        o.uint("within", env.within);
    }
    o.str("token", env.token.as_deref());
    o.list("f", env.f.as_deref(), |out, inner| {
        write_json_envelope(inner, out)
    });
    #[cfg(any(feature = "server", test))]
    {
        o.uint("dj", env.dj);
        o.uint("dm", env.dm);
        o.uint("db", env.db);
    }
    o.uint("e", env.e);
    #[cfg(any(feature = "server", test))]
    {
        o.str("k", env.k.as_deref());
        o.str("n", env.n.as_deref());
        o.uint("hl", env.hl);
        o.uint("hn", env.hn);
    }
    #[cfg(all(any(feature = "server", test), feature = "compression"))]
    {
        o.uint("z", env.z);
        o.str("zj", env.zj.as_deref());
        o.str("zm", env.zm.as_deref());
        o.str("zb", env.zb.as_deref());
    }
    o.end();
}

/// Writes a `msg` envelope with the same field order serde would use for
/// an embedded payload; the payload's other forms take its place.
#[inline]
pub(super) fn write_json_msg(
    m: &Msg,
    out: &mut Vec<u8>,
    form: Form<'_>,
) -> Result<(), EncodeError> {
    if let MsgKind::Invalid(_) = m.kind {
        return Err(EncodeError::Unrepresentable);
    }
    // Numbers by hand too: `write!` would bring `fmt` and `io` into the
    // browser package, and costs time on every message.
    let num = |out: &mut Vec<u8>, key: &[u8], v: u64| {
        out.extend_from_slice(key);
        push_uint(out, v);
    };
    num(out, br#"{"t":"msg","seq":"#, m.seq);
    num(out, br#","id":"#, m.id);
    if let Some(ack) = m.ack {
        num(out, br#","ack":"#, ack);
    }
    if let Some(ts) = m.ts {
        num(out, br#","ts":"#, ts);
    }
    let data = &m.payload.data;
    let key = |out: &mut Vec<u8>, key: &str| {
        out.extend_from_slice(b",\"");
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\":");
    };
    match (form, m.payload.kind) {
        (Form::Detached, kind) => {
            key(out, detached_key(kind));
            push_uint(out, data.len() as u64);
        }
        #[cfg(not(feature = "compression"))]
        (Form::Never(never, _), _) => match never {},
        #[cfg(feature = "compression")]
        (Form::Deflated { bytes, detached }, kind) => {
            if detached {
                key(out, detached_key(kind));
                push_uint(out, bytes.len() as u64);
            } else {
                key(out, deflated_key(kind));
                out.push(b'"');
                crate::base64::encode_into(out, bytes);
                out.push(b'"');
            }
            num(out, br#","z":"#, data.len() as u64);
        }
        (Form::Embedded, PayloadKind::Json) => {
            out.extend_from_slice(br#","j":"#);
            out.extend_from_slice(data);
        }
        (Form::Embedded, PayloadKind::MsgPack) => {
            out.extend_from_slice(br#","m":""#);
            crate::base64::encode_into(out, data);
            out.push(b'"');
        }
        (Form::Embedded, PayloadKind::Binary) => {
            out.extend_from_slice(br#","b":""#);
            crate::base64::encode_into(out, data);
            out.push(b'"');
        }
    }
    if let Some(room) = &m.room {
        out.extend_from_slice(br#","r":"#);
        push_json_str(out, room);
    }
    match m.kind {
        MsgKind::Plain => {}
        MsgKind::Request => out.extend_from_slice(br#","rq":true"#),
        MsgKind::Response(to) => num(out, br#","rs":"#, to),
        other => {
            if let Some(to) = other.rs() {
                num(out, br#","rs":"#, to);
            }
            if let Some(op) = other.op() {
                out.extend_from_slice(br#","op":"#);
                push_json_str(out, op);
            }
        }
    }
    out.push(b'}');
    Ok(())
}

#[inline]
pub(super) fn encode_msgpack(
    frame: &Frame,
    version: u8,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    out.reserve(BINARY_HEADER_LEN + 48 + frame_payload_len(frame));
    out.extend_from_slice(&[0; BINARY_HEADER_LEN]);
    match frame {
        // The hot path, written by hand with the same bytes serde writes
        // (checked against it in the tests).
        Frame::Msg(m) => write_pack_msg(m, out, Form::Embedded)?,
        Frame::Batch(msgs) => {
            let len = u32::try_from(msgs.len()).map_err(|_| EncodeError::TooLarge)?;
            super::packwrite::write_map_len(out, 2).map_err(vec_write)?;
            super::packwrite::write_str(out, "t").map_err(vec_write)?;
            super::packwrite::write_str(out, "batch").map_err(vec_write)?;
            super::packwrite::write_str(out, "f").map_err(vec_write)?;
            super::packwrite::write_array_len(out, len).map_err(vec_write)?;
            for m in msgs {
                write_pack_msg(m, out, Form::Embedded)?;
            }
        }
        Frame::Subs(list) => {
            let env = subs_envelope!(PackEnvelope, list);
            write_pack_envelope(&env, out)?;
        }
        #[cfg(any(feature = "server", test))]
        Frame::Pub(_) | Frame::Latest(_) => {
            let mut env = PackEnvelope::default();
            let payload = fill_room_value!(env, frame);
            pack_payload_into(&mut env, payload)?;
            write_pack_envelope(&env, out)?;
        }
        #[cfg(any(feature = "server", test))]
        Frame::MapValue(v) => write_pack_envelope(&pack_map_value(v, Form::Embedded)?, out)?,
        _ => {
            let mut env = PackEnvelope::default();
            fill_common!(env, frame);
            write_pack_envelope(&env, out)?;
        }
    }
    seal_msgpack(out, version)
}

/// Writes a `msg` envelope as the MessagePack map serde would write for an
/// embedded payload: the fields in declaration order, absent ones left
/// out, integers in their shortest form. The payload's other forms take
/// its place.
#[inline]
pub(super) fn write_pack_msg(
    m: &Msg,
    out: &mut Vec<u8>,
    form: Form<'_>,
) -> Result<(), EncodeError> {
    if let MsgKind::Invalid(_) = m.kind {
        return Err(EncodeError::Unrepresentable);
    }
    use super::packwrite::{write_bin, write_bool, write_map_len, write_str, write_uint};
    let extra = match m.kind {
        MsgKind::Plain => 0,
        MsgKind::Request | MsgKind::Response(_) => 1,
        MsgKind::RefusedMessage(_) => 2,
        other => u32::from(other.op().is_some()),
    };
    let len = 4
        + u32::from(m.ack.is_some())
        + u32::from(m.ts.is_some())
        + u32::from(m.room.is_some())
        + u32::from(form.is_deflated())
        + extra;
    write_map_len(out, len).map_err(vec_write)?;
    write_str(out, "t").map_err(vec_write)?;
    write_str(out, "msg").map_err(vec_write)?;
    write_str(out, "seq").map_err(vec_write)?;
    write_uint(out, m.seq).map_err(vec_write)?;
    write_str(out, "id").map_err(vec_write)?;
    write_uint(out, m.id).map_err(vec_write)?;
    if let Some(ack) = m.ack {
        write_str(out, "ack").map_err(vec_write)?;
        write_uint(out, ack).map_err(vec_write)?;
    }
    if let Some(ts) = m.ts {
        write_str(out, "ts").map_err(vec_write)?;
        write_uint(out, ts).map_err(vec_write)?;
    }
    let data: &[u8] = &m.payload.data;
    match (form, m.payload.kind) {
        (Form::Detached, kind) => {
            write_str(out, detached_key(kind)).map_err(vec_write)?;
            write_uint(out, data.len() as u64).map_err(vec_write)?;
        }
        #[cfg(not(feature = "compression"))]
        (Form::Never(never, _), _) => match never {},
        #[cfg(feature = "compression")]
        (Form::Deflated { bytes, detached }, kind) => {
            if detached {
                write_str(out, detached_key(kind)).map_err(vec_write)?;
                write_uint(out, bytes.len() as u64).map_err(vec_write)?;
            } else {
                write_str(out, deflated_key(kind)).map_err(vec_write)?;
                write_bin(out, bytes).map_err(vec_write)?;
            }
            write_str(out, "z").map_err(vec_write)?;
            write_uint(out, data.len() as u64).map_err(vec_write)?;
        }
        (Form::Embedded, PayloadKind::Json) => {
            // Checked at construction; a failure here means a bug, reported not panicked.
            let s = std::str::from_utf8(data).map_err(serializer_error)?;
            write_str(out, "j").map_err(vec_write)?;
            write_str(out, s).map_err(vec_write)?;
        }
        (Form::Embedded, PayloadKind::MsgPack) => {
            write_str(out, "m").map_err(vec_write)?;
            write_bin(out, data).map_err(vec_write)?;
        }
        (Form::Embedded, PayloadKind::Binary) => {
            write_str(out, "b").map_err(vec_write)?;
            write_bin(out, data).map_err(vec_write)?;
        }
    }
    if let Some(room) = &m.room {
        write_str(out, "r").map_err(vec_write)?;
        write_str(out, room).map_err(vec_write)?;
    }
    match m.kind {
        MsgKind::Plain => {}
        MsgKind::Request => {
            write_str(out, "rq").map_err(vec_write)?;
            write_bool(out, true).map_err(vec_write)?;
        }
        MsgKind::Response(to) | MsgKind::RefusedMessage(to) => {
            write_str(out, "rs").map_err(vec_write)?;
            write_uint(out, to).map_err(vec_write)?;
            if let Some(op) = m.kind.op() {
                write_str(out, "op").map_err(vec_write)?;
                write_str(out, op).map_err(vec_write)?;
            }
        }
        other => {
            if let Some(op) = other.op() {
                write_str(out, "op").map_err(vec_write)?;
                write_str(out, op).map_err(vec_write)?;
            }
        }
    }
    Ok(())
}

/// Writes `env` as the MessagePack map rmp-serde writes for it
/// (`to_vec_named`): its present fields in declaration order, integers in
/// their shortest form, text payloads as strings and bytes as `bin`.
pub(super) fn write_pack_envelope(
    env: &PackEnvelope<'_>,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    use super::packwrite::{write_array_len, write_bin, write_map_len, write_str, write_uint};
    fn key_uint(out: &mut Vec<u8>, key: &str, v: Option<u64>) -> Result<(), EncodeError> {
        if let Some(v) = v {
            write_str(out, key).map_err(vec_write)?;
            write_uint(out, v).map_err(vec_write)?;
        }
        Ok(())
    }
    fn key_str(out: &mut Vec<u8>, key: &str, v: Option<&str>) -> Result<(), EncodeError> {
        if let Some(v) = v {
            write_str(out, key).map_err(vec_write)?;
            write_str(out, v).map_err(vec_write)?;
        }
        Ok(())
    }
    fn key_bin(out: &mut Vec<u8>, key: &str, v: Option<&[u8]>) -> Result<(), EncodeError> {
        if let Some(v) = v {
            write_str(out, key).map_err(vec_write)?;
            write_bin(out, v).map_err(vec_write)?;
        }
        Ok(())
    }
    // The fields of the second list are set only by the frames only a
    // server writes (`msg` and `batch` have writers of their own).
    let len = 1 + [
        env.seq.is_some(),
        env.ack.is_some(),
        env.nonce.is_some(),
        env.from.is_some(),
        env.r.is_some(),
        env.token.is_some(),
        env.f.is_some(),
        env.e.is_some(),
    ]
    .iter()
    .filter(|present| **present)
    .count();
    #[cfg(any(feature = "server", test))]
    let len = len
        + [
            env.id.is_some(),
            env.ts.is_some(),
            env.j.is_some(),
            env.m.is_some(),
            env.b.is_some(),
            env.code.is_some(),
            env.retry.is_some(),
            env.op.is_some(),
            env.rq.is_some(),
            env.rs.is_some(),
            env.within.is_some(),
            env.dj.is_some(),
            env.dm.is_some(),
            env.db.is_some(),
            env.k.is_some(),
            env.n.is_some(),
            env.hl.is_some(),
            env.hn.is_some(),
        ]
        .iter()
        .filter(|present| **present)
        .count();
    #[cfg(all(any(feature = "server", test), feature = "compression"))]
    let len = len
        + [
            env.z.is_some(),
            env.zj.is_some(),
            env.zm.is_some(),
            env.zb.is_some(),
        ]
        .iter()
        .filter(|present| **present)
        .count();
    write_map_len(out, len as u32).map_err(vec_write)?;
    key_str(out, "t", Some(&env.t))?;
    key_uint(out, "seq", env.seq)?;
    #[cfg(any(feature = "server", test))]
    key_uint(out, "id", env.id)?;
    key_uint(out, "ack", env.ack)?;
    #[cfg(any(feature = "server", test))]
    {
        key_uint(out, "ts", env.ts)?;
        key_str(out, "j", env.j.as_deref())?;
        key_bin(out, "m", env.m.map(|b| &**b))?;
        key_bin(out, "b", env.b.map(|b| &**b))?;
    }
    key_uint(out, "nonce", env.nonce)?;
    key_uint(out, "from", env.from)?;
    #[cfg(any(feature = "server", test))]
    {
        key_uint(out, "code", env.code.map(u64::from))?;
        key_uint(out, "retry", env.retry)?;
    }
    key_str(out, "r", env.r.as_deref())?;
    #[cfg(any(feature = "server", test))]
    {
        key_str(out, "op", env.op.as_deref())?;
        if let Some(rq) = env.rq {
            write_str(out, "rq").map_err(vec_write)?;
            super::packwrite::write_bool(out, rq).map_err(vec_write)?;
        }
        key_uint(out, "rs", env.rs)?;
        key_uint(out, "within", env.within)?;
    }
    key_str(out, "token", env.token.as_deref())?;
    if let Some(f) = &env.f {
        write_str(out, "f").map_err(vec_write)?;
        let n = u32::try_from(f.len()).map_err(|_| EncodeError::TooLarge)?;
        write_array_len(out, n).map_err(vec_write)?;
        for inner in f {
            write_pack_envelope(inner, out)?;
        }
    }
    #[cfg(any(feature = "server", test))]
    {
        key_uint(out, "dj", env.dj)?;
        key_uint(out, "dm", env.dm)?;
        key_uint(out, "db", env.db)?;
    }
    key_uint(out, "e", env.e)?;
    #[cfg(any(feature = "server", test))]
    {
        key_str(out, "k", env.k.as_deref())?;
        key_str(out, "n", env.n.as_deref())?;
        key_uint(out, "hl", env.hl)?;
        key_uint(out, "hn", env.hn)?;
    }
    #[cfg(all(any(feature = "server", test), feature = "compression"))]
    {
        key_uint(out, "z", env.z)?;
        key_bin(out, "zj", env.zj.map(|b| &**b))?;
        key_bin(out, "zm", env.zm.map(|b| &**b))?;
        key_bin(out, "zb", env.zb.map(|b| &**b))?;
    }
    Ok(())
}

/// The envelope key of a detached payload of `kind`.
fn detached_key(kind: PayloadKind) -> &'static str {
    match kind {
        PayloadKind::Json => "dj",
        PayloadKind::MsgPack => "dm",
        PayloadKind::Binary => "db",
    }
}

#[inline]
fn frame_payload_len(frame: &Frame) -> usize {
    match frame {
        Frame::Msg(m) => m.payload.len(),
        Frame::Batch(msgs) => msgs.iter().map(|m| m.payload.len() + 32).sum(),
        Frame::MapValue(v) => v.value.as_ref().map_or(0, Payload::len),
        _ => 0,
    }
}
