//! Bodies of the decode targets: `decode_json`, `decode_msgpack`,
//! `decode_binary_header` and `pack_envelope`.
//!
//! This file owns [`check_decode`], the checks every decoded message goes
//! through (the size limit first, bounded allocation, the quick MessagePack
//! reader and the stream decoder agreeing with `wire::decode`, a canonical
//! round trip), and [`assert_round_trip`], which the frame and handshake
//! targets use too. It never changes what the decoder does: it hands
//! `wire` messages as a connection would and asserts on the answers.

use arbitrary::Arbitrary;
use bytes::Bytes;

use crate::wire::{
    self, Codec, DecodeError, Frame, Incoming, Limits, Msg, MsgKind, Transmit, BINARY_HEADER_LEN,
    KIND_MSGPACK, PROTOCOL_VERSION,
};

use super::{limits, AllocProbe, ALLOC_PER_BYTE, ALLOC_SLACK, FUZZ_MAX_MESSAGE};

/// Target `decode_json`: arbitrary bytes as a text message (invalid UTF-8 is
/// replaced, as a WebSocket library would refuse it before us).
pub fn decode_json(data: &[u8], probe: &dyn AllocProbe) {
    let text = String::from_utf8_lossy(data);
    check_decode(Incoming::Text(&text), &limits(), probe);
}

/// Target `decode_msgpack`: arbitrary bytes as the body of a binary message
/// behind a valid MessagePack header, so the fuzzer spends its time in the
/// envelope parser rather than on the header.
pub fn decode_msgpack(data: &[u8], probe: &dyn AllocProbe) {
    let mut msg = Vec::with_capacity(BINARY_HEADER_LEN + data.len());
    msg.push(KIND_MSGPACK);
    msg.push(PROTOCOL_VERSION);
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    msg.extend_from_slice(&len.to_le_bytes());
    msg.extend_from_slice(data);
    check_decode(Incoming::Binary(&msg), &limits(), probe);
}

/// Target `decode_binary_header`: arbitrary bytes as a whole binary message,
/// header included.
pub fn decode_binary_header(data: &[u8], probe: &dyn AllocProbe) {
    check_decode(Incoming::Binary(data), &limits(), probe);
}

/// Target `pack_envelope`: a MessagePack envelope map built from arbitrary
/// entries (known and unknown keys, field indexes, every kind of value in
/// every width), sometimes with a wrong entry count, a wider map header or
/// bytes after the map. Most are close to what Kitestring writes, so the
/// hand-written envelope reader and serde are compared right at the border
/// of what the reader takes (see [`check_decode`]).
///
/// Returns whether the hand-written reader took the envelope.
pub fn pack_envelope(env: &ArbEnvelope, probe: &dyn AllocProbe) -> bool {
    let mut body = Vec::new();
    let entries = env.entries.len() + usize::from(env.t.is_some());
    let count = u32::try_from(entries)
        .unwrap_or(u32::MAX)
        .saturating_add_signed(i32::from(env.miscount.unwrap_or(0)));
    match env.header % 4 {
        0 => {
            let _ = rmp::encode::write_map_len(&mut body, count);
        }
        1 => {
            body.push(0xde);
            body.extend_from_slice(&(count as u16).to_be_bytes());
        }
        2 => {
            body.push(0xdf);
            body.extend_from_slice(&count.to_be_bytes());
        }
        _ => {
            let _ = rmp::encode::write_array_len(&mut body, count);
        }
    }
    if let Some((name, width)) = env.t {
        write_str_as(&mut body, b"t", Width::Smallest);
        ArbValue::Name(name, width).write(&mut body);
    }
    for (key, value) in &env.entries {
        key.write(&mut body);
        value.write(&mut body);
    }
    if let Some(trailing) = &env.trailing {
        body.extend_from_slice(trailing);
    }
    let mut msg = Vec::with_capacity(BINARY_HEADER_LEN + body.len());
    msg.push(KIND_MSGPACK);
    msg.push(PROTOCOL_VERSION);
    msg.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
    msg.extend_from_slice(&body);
    check_decode(Incoming::Binary(&msg), &limits(), probe);
    msg.len() <= FUZZ_MAX_MESSAGE && wire::assert_quick_envelope_agrees(&msg)
}

/// Input of the `pack_envelope` target.
#[derive(Arbitrary, Debug)]
pub struct ArbEnvelope {
    /// The `t` entry, first: one of [`PACK_NAMES`].
    t: Option<(u8, Width)>,
    entries: Vec<(ArbKey, ArbValue)>,
    /// Added to the entry count the header declares.
    miscount: Option<i8>,
    /// fixmap or the smallest, map16, map32, or an array.
    header: u8,
    trailing: Option<Vec<u8>>,
}

/// The envelope's field names, and a few others.
const PACK_KEYS: &[&str] = &[
    "t", "seq", "id", "ack", "ts", "j", "m", "b", "nonce", "from", "code", "retry", "r", "op",
    "rq", "rs", "within", "token", "f", "dj", "dm", "db", "", "T", "seq\0", "x", "n", "hl", "hn",
];

/// The frame types and room operations, as `t` and `op` values.
const PACK_NAMES: &[&str] = &[
    "msg", "ack", "ping", "pong", "batch", "replay", "goaway", "reauth", "auth", "hello",
    "welcome", "reject", "join", "leave", "presence", "refused", "{}", "1", "\"a\"", "mv", "ms",
    "mset",
];

/// A map key of the `pack_envelope` target: one of [`PACK_KEYS`] as a str
/// of the given width, unless `other` says otherwise.
#[derive(Arbitrary, Debug)]
pub struct ArbKey {
    known: u8,
    width: Width,
    other: Option<OtherKey>,
}

/// A key that is not a field name as a plain str.
#[derive(Arbitrary, Debug)]
pub enum OtherKey {
    /// Any bytes, as a str.
    Bytes(Vec<u8>),
    /// A field index, as rmp-serde also accepts.
    Index(u8),
}

/// A value of the `pack_envelope` target.
#[derive(Arbitrary, Debug)]
pub enum ArbValue {
    /// nil.
    Nil,
    /// true or false.
    Bool(bool),
    /// An unsigned integer, in the smallest form or a given width.
    Uint(u64, Width),
    /// A signed integer, in the smallest form or a given width.
    Int(i64, Width),
    /// A float.
    Float(f64),
    /// One of [`PACK_NAMES`], as a str of the given width.
    Name(u8, Width),
    /// Any bytes, as a str.
    Str(Vec<u8>),
    /// Any bytes, as a bin of the given width.
    Bin(Vec<u8>, Width),
    /// An array or a map header with that many entries, and nothing in it.
    Array(u8),
    /// See [`ArbValue::Array`].
    Map(u8),
}

/// Which encoding of a value: the smallest, or a given number of bytes.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Width {
    /// The smallest form.
    Smallest,
    /// 8 bits.
    W8,
    /// 16 bits.
    W16,
    /// 32 bits.
    W32,
    /// 64 bits.
    W64,
}

fn write_str_as(out: &mut Vec<u8>, s: &[u8], width: Width) {
    let len = s.len();
    match width {
        Width::W8 if len <= 0xff => out.extend_from_slice(&[0xd9, len as u8]),
        Width::W16 if len <= 0xffff => {
            out.push(0xda);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        Width::W32 | Width::W64 => {
            out.push(0xdb);
            out.extend_from_slice(&(len as u32).to_be_bytes());
        }
        _ => {
            let _ = rmp::encode::write_str_len(out, len as u32);
        }
    }
    out.extend_from_slice(s);
}

impl ArbKey {
    fn write(&self, out: &mut Vec<u8>) {
        match &self.other {
            None => {
                let key = PACK_KEYS[usize::from(self.known) % PACK_KEYS.len()];
                write_str_as(out, key.as_bytes(), self.width);
            }
            Some(OtherKey::Bytes(b)) => write_str_as(out, b, Width::Smallest),
            Some(OtherKey::Index(i)) => {
                let _ = rmp::encode::write_uint(out, u64::from(*i));
            }
        }
    }
}

impl ArbValue {
    fn write(&self, out: &mut Vec<u8>) {
        use rmp::encode as e;
        let _ = match *self {
            ArbValue::Nil => e::write_nil(out).map_err(drop),
            ArbValue::Bool(b) => e::write_bool(out, b).map_err(drop),
            ArbValue::Uint(v, w) => match w {
                Width::Smallest => e::write_uint(out, v).map(drop).map_err(drop),
                Width::W8 => e::write_u8(out, v as u8).map_err(drop),
                Width::W16 => e::write_u16(out, v as u16).map_err(drop),
                Width::W32 => e::write_u32(out, v as u32).map_err(drop),
                Width::W64 => e::write_u64(out, v).map_err(drop),
            },
            ArbValue::Int(v, w) => match w {
                Width::Smallest => e::write_sint(out, v).map(drop).map_err(drop),
                Width::W8 => e::write_i8(out, v as i8).map_err(drop),
                Width::W16 => e::write_i16(out, v as i16).map_err(drop),
                Width::W32 => e::write_i32(out, v as i32).map_err(drop),
                Width::W64 => e::write_i64(out, v).map_err(drop),
            },
            ArbValue::Float(f) => e::write_f64(out, f).map_err(drop),
            ArbValue::Name(i, w) => {
                write_str_as(
                    out,
                    PACK_NAMES[usize::from(i) % PACK_NAMES.len()].as_bytes(),
                    w,
                );
                Ok(())
            }
            ArbValue::Str(ref b) => {
                write_str_as(out, b, Width::Smallest);
                Ok(())
            }
            ArbValue::Bin(ref b, w) => {
                let len = b.len();
                match w {
                    Width::W16 if len <= 0xffff => {
                        out.push(0xc5);
                        out.extend_from_slice(&(len as u16).to_be_bytes());
                    }
                    Width::W32 | Width::W64 => {
                        out.push(0xc6);
                        out.extend_from_slice(&(len as u32).to_be_bytes());
                    }
                    _ => {
                        let _ = e::write_bin_len(out, len as u32);
                    }
                }
                out.extend_from_slice(b);
                Ok(())
            }
            ArbValue::Array(n) => e::write_array_len(out, u32::from(n))
                .map(drop)
                .map_err(drop),
            ArbValue::Map(n) => e::write_map_len(out, u32::from(n)).map(drop).map_err(drop),
        };
    }
}

/// Decodes one message and checks everything the decoder promises: the size
/// limit comes first, no panic, bounded allocation, and whatever decodes
/// re-encodes to a message that decodes to an equal frame.
pub fn check_decode(msg: Incoming<'_>, limits: &Limits, probe: &dyn AllocProbe) -> Option<Frame> {
    probe.reset();
    let result = wire::decode(msg, limits);
    let peak = probe.peak();
    if msg.len() > limits.max_message {
        assert_eq!(
            result,
            Err(DecodeError::TooLarge {
                size: msg.len(),
                max: limits.max_message
            }),
            "an oversized message must be refused before parsing"
        );
        assert!(
            peak <= 256,
            "refusing an oversized message allocated {peak} bytes"
        );
        return None;
    }
    let bound = ALLOC_PER_BYTE * msg.len() + ALLOC_SLACK;
    assert!(
        peak <= bound,
        "decoding {} bytes allocated {peak} bytes at peak (bound {bound})",
        msg.len()
    );
    if let Incoming::Text(text) = msg {
        // Whatever the hand-written JSON readers take, serde reads the same
        // way.
        wire::assert_quick_json_agrees(text);
    }
    if let Incoming::Binary(b) = msg {
        // Whatever envelope the quick MessagePack reader takes, serde reads
        // the same way.
        wire::assert_quick_envelope_agrees(b);
        // Decoding from a shared buffer (payloads sliced, not copied) must
        // give exactly the same frame or error.
        let shared = bytes::Bytes::copy_from_slice(b);
        assert_eq!(
            wire::decode(Incoming::SharedBinary(&shared), limits),
            result,
            "shared and copied decoding disagree"
        );
    }
    check_stream_decoder(msg, limits, &result);
    let frame = result.ok()?;
    let codec = match msg {
        Incoming::Text(_) => Codec::Json,
        Incoming::Binary(_) | Incoming::SharedBinary(_) => Codec::MsgPack,
    };
    assert_round_trip(&frame, codec, limits.version);
    Some(frame)
}

/// A connection's [`wire::Decoder`] agrees with [`wire::decode`] on a first
/// message; where `decode` refuses a detached envelope, the decoder waits
/// for its payload, and a payload of the announced length completes it
/// (or makes it an invalid message, for a `dj` payload that is not JSON).
fn check_stream_decoder(msg: Incoming<'_>, limits: &Limits, result: &Result<Frame, DecodeError>) {
    let mut decoder = wire::Decoder::new();
    let streamed = decoder.decode(msg, limits);
    match (streamed, result) {
        (Ok(Some(a)), Ok(b)) => assert_eq!(&a, b, "the stream decoder disagrees"),
        (Ok(None), Err(DecodeError::InvalidField { field: "dj", .. })) => {
            let Some(len) = decoder.awaiting() else {
                panic!("the decoder waits, but for no payload");
            };
            if len > 1 << 16 {
                return;
            }
            // Digits: a JSON value too, for a `dj` payload.
            let payload = Bytes::from(vec![b'1'; len]);
            match decoder.decode(Incoming::SharedBinary(&payload), limits) {
                // Nothing is not a JSON value: a `dj` payload of no bytes
                // makes the message invalid, to be refused by id.
                Ok(Some(Frame::Msg(m))) if len == 0 && matches!(m.kind, MsgKind::Invalid(_)) => {
                    assert_round_trip(&Frame::Msg(m), Codec::MsgPack, limits.version);
                }
                Ok(Some(Frame::Msg(m))) => {
                    assert_eq!(m.payload.data(), &payload, "the payload changed");
                    assert_round_trip(&Frame::Msg(m), Codec::MsgPack, limits.version);
                }
                Err(DecodeError::InvalidField { field: "dj", .. }) if len == 0 => {}
                other => panic!("a detached payload of {len} bytes gave {other:?}"),
            }
            assert_eq!(decoder.awaiting(), None);
        }
        (
            Err(DecodeError::TooLarge { size, max }),
            Err(DecodeError::InvalidField { field: "dj", .. }),
        ) => {
            assert!(size > max, "refused a detached payload within the limit");
        }
        (Err(a), Err(b)) => assert_eq!(&a, b, "the stream decoder disagrees"),
        (a, b) => panic!("the stream decoder gave {a:?}, decode gave {b:?}"),
    }
}

/// Whether `frame` is or holds a numbered `msg` that did not decode
/// otherwise ([`MsgKind::Invalid`]): the receiver refuses it by id, and
/// nothing ever sends it.
fn holds_invalid(frame: &Frame) -> bool {
    let invalid = |m: &Msg| {
        let yes = matches!(m.kind, MsgKind::Invalid(_));
        assert!(
            !yes || m.seq > 0,
            "an invalid message without its number: {m:?}"
        );
        yes
    };
    match frame {
        Frame::Msg(m) => invalid(m),
        Frame::Batch(ms) => ms.iter().filter(|m| invalid(m)).count() > 0,
        _ => false,
    }
}

/// Checks that `frame` encodes with `codec`, that the encoding decodes to an
/// equal frame, and that encoding that frame again gives the same bytes; a
/// message also with its payload detached, a synced map's entry also with
/// its value compressed. Unknown frames, and messages that decoded as
/// invalid (numbered, to be refused by id), must refuse to encode.
pub fn assert_round_trip(frame: &Frame, codec: Codec, version: u8) {
    let unsendable = matches!(frame, Frame::Unknown(_)) || holds_invalid(frame);
    let encoded = match wire::encode(frame, codec, version) {
        Ok(t) => t,
        Err(e) => {
            assert!(
                unsendable,
                "{frame:?} decoded but does not encode with {codec:?}: {e}"
            );
            return;
        }
    };
    assert!(
        !unsendable,
        "an unknown frame or an invalid message was encoded: {frame:?}"
    );
    let want_text = match frame {
        Frame::Hello(_) | Frame::Welcome(_) | Frame::Reject(_) => true,
        Frame::Raw(_) => false,
        _ => codec == Codec::Json,
    };
    assert_eq!(
        matches!(encoded, Transmit::Text(_)),
        want_text,
        "{frame:?} with {codec:?} went out as {encoded:?}"
    );
    if let Transmit::Text(b) = &encoded {
        assert!(std::str::from_utf8(b).is_ok(), "text transmit is not UTF-8");
    }
    let open = Limits {
        max_message: usize::MAX,
        version,
    };
    let back = match wire::decode(encoded.as_incoming(), &open) {
        Ok(f) => f,
        Err(e) => panic!("{frame:?} encoded with {codec:?} as {encoded:?} does not decode: {e}"),
    };
    assert_eq!(
        &back, frame,
        "round trip through {codec:?} changed the frame"
    );
    match wire::encode(&back, codec, version) {
        Ok(again) => assert_eq!(again, encoded, "encoding is not canonical"),
        Err(e) => panic!("re-encoding failed: {e}"),
    }
    if let Frame::Msg(m) = frame {
        // The same message with its payload detached comes back equal too.
        let pair = match wire::encode_detached(m, codec, version) {
            Ok(pair) => pair,
            Err(e) => panic!("{frame:?} does not encode detached with {codec:?}: {e}"),
        };
        let mut decoder = wire::Decoder::new();
        assert_eq!(
            decoder.decode(pair[0].as_incoming(), &open),
            Ok(None),
            "a detached envelope did not wait for its payload"
        );
        assert_eq!(
            decoder.decode(pair[1].as_incoming(), &open),
            Ok(Some(frame.clone())),
            "round trip detached through {codec:?} changed the frame"
        );
    }
    if let Frame::MapValue(_) = frame {
        // The same entry with its value compressed, whatever its size
        // (and detached when its deflated bytes are large), comes back
        // equal too.
        let every = wire::CompressionConfig {
            threshold: 1,
            level: 1,
        };
        let sent = match wire::encode_compressed(frame, codec, version, &every, true) {
            Ok(sent) => sent,
            Err(e) => panic!("{frame:?} does not encode compressed with {codec:?}: {e}"),
        };
        let mut decoder = wire::Decoder::new();
        decoder.set_compression(true);
        let mut back = None;
        for t in &sent {
            back = match decoder.decode(t.as_incoming(), &open) {
                Ok(f) => f,
                Err(e) => panic!("{frame:?} compressed with {codec:?} does not decode: {e}"),
            };
        }
        assert_eq!(
            back.as_ref(),
            Some(frame),
            "round trip compressed through {codec:?} changed the frame"
        );
    }
}

/// Target `records`: arbitrary bytes as an HTTP fallback body
/// (PROTOCOL.md, section 1.1). Reading never panics and allocates no more
/// than the records it returns (slices of the body); every record read
/// writes back to exactly the bytes it was read from; an error ends the
/// body and names one of the three close codes a WebSocket would give.
pub fn records(data: &[u8], probe: &dyn AllocProbe) {
    use crate::close::CloseCode;
    use crate::wire::records::{push_close, push_record, Record, Records};
    let body = Bytes::copy_from_slice(data);
    let max = FUZZ_MAX_MESSAGE;
    probe.reset();
    let read: Vec<_> = Records::new(body, max).collect();
    assert!(
        probe.peak() <= ALLOC_SLACK + read.len() * 128,
        "records took {} bytes for {} records",
        probe.peak(),
        read.len()
    );
    let mut again = Vec::new();
    for (i, r) in read.iter().enumerate() {
        let kind = data.get(again.len()).copied().unwrap_or(0);
        match r {
            Ok(Record::Text(t)) => {
                assert!(std::str::from_utf8(t).is_ok(), "a text record is UTF-8");
                push_record(&mut again, kind, t);
            }
            Ok(Record::Binary(b) | Record::Open(b)) => push_record(&mut again, kind, b),
            Ok(Record::Close { code, reason }) => push_close(&mut again, *code, reason),
            Err(e) => {
                assert_eq!(i, read.len() - 1, "nothing is read after an error");
                assert!(
                    [
                        CloseCode::PROTOCOL_ERROR,
                        CloseCode::INVALID_PAYLOAD,
                        CloseCode::MESSAGE_TOO_BIG
                    ]
                    .contains(&e.close_code()),
                    "{e:?}"
                );
            }
        }
        if let Ok(rec) = r {
            let len = match rec {
                Record::Text(p) | Record::Binary(p) | Record::Open(p) => p.len(),
                Record::Close { reason, .. } => reason.len() + 2,
            };
            assert!(len <= max, "a record over the limit was read");
        }
    }
    // What was read is the body's start, byte for byte.
    assert_eq!(
        &data[..again.len()],
        &again[..],
        "records write back as read"
    );
    if read.last().is_some_and(|r| r.is_ok()) || read.is_empty() {
        assert_eq!(again.len(), data.len(), "a body read whole");
    }
}
