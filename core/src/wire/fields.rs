//! Envelopes to frames: every field checked, for both codecs and the
//! handshake.
//!
//! Owns what a well-formed envelope may say: the fields each frame type
//! needs, their ranges, room names, map names, keys and stamps, payload
//! forms (and which frames may carry none: an `mv` without one is a
//! deleted entry) and detached payload announcements, batch bounds. A
//! numbered `msg` with a bad field becomes a [`MsgKind::Invalid`] message
//! rather than an error, so the stream does not stall. It never parses
//! bytes: the `decode` and `quick` modules read them into envelopes first
//! (nor the body of a `mset` message: the `mapwrite` module reads that).

use std::borrow::Cow;

use bytes::Bytes;

use super::cap_name;
use super::compress::Inflation;
use super::decode::closes;
#[cfg(feature = "compression")]
use super::deflated::{deflated_of, inflated, Deflated};
use super::envelope::{HandshakeEnvelope, JsonEnvelope, PackEnvelope};
use super::json::json_value;
use super::payload::json_depth_ok;
use super::{
    CapName, ClientId, Codec, DecodeError, Frame, Hello, InvalidMsg, LatestValue, MapSnapshot,
    MapValue, Msg, MsgKind, Payload, PayloadKind, Reject, Resume, ResumeKey, SessionId,
    StreamEntry, StreamPos, Welcome, MAX_BATCH, MAX_EPOCH, MAX_LIST_LEN, MAX_MAP_ENTRIES,
    MAX_TOKEN_BYTES, MAX_TOKEN_LEN,
};
use crate::hlc::HlcTimestamp;

/// [`json_depth_ok`] as a decode check on the field `field`.
pub(super) fn check_json_depth(json: &[u8], field: &'static str) -> Result<(), DecodeError> {
    if json_depth_ok(json) {
        Ok(())
    } else {
        Err(DecodeError::InvalidField {
            field,
            reason: "JSON nested deeper than 64 levels",
        })
    }
}

fn need<T>(v: Option<T>, frame: &'static str, field: &'static str) -> Result<T, DecodeError> {
    v.ok_or(DecodeError::MissingField { frame, field })
}

/// A token's length checked: at most 256 bytes.
fn token_len<'a>(s: Cow<'a, str>, field: &'static str) -> Result<Cow<'a, str>, DecodeError> {
    if s.len() > MAX_TOKEN_LEN {
        return Err(DecodeError::InvalidField {
            field,
            reason: "longer than 256 bytes",
        });
    }
    Ok(s)
}

fn token(s: Cow<'_, str>, field: &'static str) -> Result<String, DecodeError> {
    token_len(s, field).map(Cow::into_owned)
}

/// A handshake list's length checked: at most 32 entries.
fn bounded_list<T>(v: Option<Vec<T>>, field: &'static str) -> Result<Vec<T>, DecodeError> {
    let v = v.unwrap_or_default();
    if v.len() > MAX_LIST_LEN {
        return Err(DecodeError::InvalidField {
            field,
            reason: "more than 32 entries",
        });
    }
    Ok(v)
}

/// A `caps` or `features` list: each name checked as a token, the known
/// ones borrowed ([`CapName`]). The list's own allocation is reused.
fn cap_list(
    v: Option<Vec<Cow<'_, str>>>,
    field: &'static str,
) -> Result<Vec<CapName>, DecodeError> {
    bounded_list(v, field)?
        .into_iter()
        .map(|s| token_len(s, field).map(cap_name))
        .collect()
}

/// A `hello`'s `codecs`, each name checked as a token; the names this
/// build does not know are left out. A `hello` that names none gets JSON,
/// which every peer speaks.
fn codec_list(v: Option<Vec<Cow<'_, str>>>) -> Result<Vec<Codec>, DecodeError> {
    if v.is_none() {
        return Ok(vec![Codec::Json]);
    }
    let mut codecs = Vec::new();
    for name in bounded_list(v, "codecs")? {
        if let Some(codec) = Codec::from_name(&token_len(name, "codecs")?) {
            codecs.push(codec);
        }
    }
    Ok(codecs)
}

/// A `hello`'s `join`: at most 32 room names, each 1 to 256 bytes.
fn room_list(v: Option<Vec<Cow<'_, str>>>) -> Result<Vec<std::sync::Arc<str>>, DecodeError> {
    bounded_list(v, "join")?
        .into_iter()
        .map(|r| {
            if r.is_empty() || r.len() > MAX_TOKEN_LEN {
                Err(DecodeError::InvalidField {
                    field: "join",
                    reason: "room names are 1 to 256 bytes",
                })
            } else {
                Ok(std::sync::Arc::from(&*r))
            }
        })
        .collect()
}

/// A `key` field: 32 hex digits when present.
fn resume_key(key: Option<Cow<'_, str>>) -> Result<Option<ResumeKey>, DecodeError> {
    key.map(|k| {
        ResumeKey::from_hex(&k).ok_or(DecodeError::InvalidField {
            field: "key",
            reason: "not 32 hex digits",
        })
    })
    .transpose()
}

/// The detached payload an envelope announces, if any: its kind and length.
pub(super) fn detached_of(
    dj: Option<u64>,
    dm: Option<u64>,
    db: Option<u64>,
) -> Result<Option<(PayloadKind, u64)>, DecodeError> {
    match (dj, dm, db) {
        (None, None, None) => Ok(None),
        (Some(n), None, None) => Ok(Some((PayloadKind::Json, n))),
        (None, Some(n), None) => Ok(Some((PayloadKind::MsgPack, n))),
        (None, None, Some(n)) => Ok(Some((PayloadKind::Binary, n))),
        _ => Err(DecodeError::InvalidField {
            field: "dj",
            reason: "a message carries exactly one payload",
        }),
    }
}

/// The placeholder payload of a `msg` envelope that announces a detached
/// one, checked to announce nothing else.
pub(super) fn detached_payload(
    detached: Option<(PayloadKind, u64)>,
    embedded: bool,
    nested: bool,
) -> Result<Option<Payload>, DecodeError> {
    let Some((kind, _)) = detached else {
        return Ok(None);
    };
    if nested {
        return Err(DecodeError::InvalidField {
            field: "f",
            reason: "a batch holds no detached payloads",
        });
    }
    if embedded {
        return Err(DecodeError::InvalidField {
            field: "dj",
            reason: "a message carries exactly one payload",
        });
    }
    Ok(Some(Payload {
        kind,
        data: Bytes::new(),
    }))
}

/// `part` as its own `Bytes`: a slice of `backing` (no copy) when `part`
/// lies in it and is most of it, a copy otherwise, so that a small payload
/// kept by the application never pins a large frame.
pub(super) fn share(backing: Option<&Bytes>, part: &[u8]) -> Bytes {
    if let Some(b) = backing {
        let start = b.as_ptr() as usize;
        let at = part.as_ptr() as usize;
        let inside = at >= start && at + part.len() <= start + b.len();
        if inside && part.len() >= SHARE_FROM && part.len() >= b.len() / 2 {
            return b.slice_ref(part);
        }
    }
    small_copy(part)
}

/// Payloads from this size up are shared with the frame they came in.
const SHARE_FROM: usize = 1024;

/// A copy of `part` in one allocation that clones share: a sequenced
/// payload is cloned at least once (kept for retransmission, and put in
/// its frame), and a `Bytes` copied from a slice is a plain vector that
/// its first clone turns into a shared one with a second allocation. Up
/// to [`SHARE_FROM`] bytes the copy goes in an array of the next power of
/// two from 32 bytes, with its count beside it; beyond, a plain copy.
pub(crate) fn small_copy(part: &[u8]) -> Bytes {
    match part.len() {
        0 => Bytes::new(),
        1..=32 => Bytes::from_owner(Inline::<32>::new(part)),
        33..=64 => Bytes::from_owner(Inline::<64>::new(part)),
        65..=128 => Bytes::from_owner(Inline::<128>::new(part)),
        129..=256 => Bytes::from_owner(Inline::<256>::new(part)),
        257..=512 => Bytes::from_owner(Inline::<512>::new(part)),
        513..=SHARE_FROM => Bytes::from_owner(Inline::<SHARE_FROM>::new(part)),
        _ => Bytes::copy_from_slice(part),
    }
}

/// Up to `N` bytes held inline, for [`small_copy`].
struct Inline<const N: usize> {
    len: usize,
    buf: [u8; N],
}

impl<const N: usize> Inline<N> {
    fn new(part: &[u8]) -> Self {
        let mut buf = [0; N];
        buf[..part.len()].copy_from_slice(part);
        Inline {
            len: part.len(),
            buf,
        }
    }
}

impl<const N: usize> AsRef<[u8]> for Inline<N> {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// A payload the frame must carry: `None` (no payload field at all) is a
/// missing `j`.
fn required(payload: Result<Option<Payload>, DecodeError>) -> Result<Payload, DecodeError> {
    payload?.ok_or(DecodeError::MissingField {
        frame: "msg",
        field: "j",
    })
}

/// The payload of a JSON envelope, in any of its forms; `None` when it
/// has no payload field at all.
fn json_payload(
    env: &JsonEnvelope<'_>,
    nested: bool,
    zip: Inflation,
) -> Result<Option<Payload>, DecodeError> {
    #[cfg(not(feature = "compression"))]
    let _ = zip;
    let embedded = env.j.is_some() || env.m.is_some() || env.b.is_some();
    let detached = detached_of(env.dj, env.dm, env.db)?;
    #[cfg(feature = "compression")]
    if let Some(d) = deflated_of(
        env.z,
        [env.zj.as_ref(), env.zm.as_ref(), env.zb.as_ref()],
        embedded,
        detached.is_some(),
        zip,
    )? {
        let data = crate::base64::decode(d.bytes.as_bytes()).ok_or(DecodeError::InvalidField {
            field: d.field,
            reason: "not valid base64",
        })?;
        let d = Deflated {
            bytes: &data[..],
            kind: d.kind,
            field: d.field,
            len: d.len,
        };
        return inflated(d, zip).map(Some);
    }
    if let Some(p) = detached_payload(detached, embedded, nested)? {
        return Ok(Some(p));
    }
    if let Some(raw) = env.j {
        if env.m.is_some() || env.b.is_some() {
            return Err(DecodeError::InvalidField {
                field: "j",
                reason: "a message carries exactly one payload",
            });
        }
        check_json_depth(raw.get().as_bytes(), "j")?;
        return Ok(Some(Payload {
            kind: PayloadKind::Json,
            data: Bytes::copy_from_slice(raw.get().as_bytes()),
        }));
    }
    let (kind, field, text) = match (&env.m, &env.b) {
        (Some(m), None) => (PayloadKind::MsgPack, "m", m),
        (None, Some(b)) => (PayloadKind::Binary, "b", b),
        (Some(_), Some(_)) => {
            return Err(DecodeError::InvalidField {
                field: "m",
                reason: "a message carries exactly one payload",
            })
        }
        (None, None) => return Ok(None),
    };
    let data = crate::base64::decode(text.as_bytes()).ok_or(DecodeError::InvalidField {
        field,
        reason: "not valid base64",
    })?;
    Ok(Some(Payload {
        kind,
        data: data.into(),
    }))
}

/// One envelope (or a batch of them) to a frame, either codec.
macro_rules! envelope_frame {
    ($name:ident, $env:ident, $nested:ident, $payload:ident) => {{
        match &*$env.t {
            "batch" => return batch_frame($env.f.as_deref(), $nested, |inner| $name(inner, true)),
            "subs" => return subs_frame($env.f.as_deref(), $nested, |inner| $name(inner, true)),
            _ => {}
        }
        common_frame(
            &$env.t,
            $env.seq,
            $env.id,
            $env.ack,
            $env.ts,
            $env.nonce,
            $env.from,
            $env.code,
            $env.retry,
            Extra {
                epoch: $env.e,
                within: $env.within,
                token: $env.token.as_deref(),
                rq: $env.rq,
                rs: $env.rs,
                room: $env.r.as_deref(),
                op: $env.op.as_deref(),
                key: $env.k.as_deref(),
                map: $env.n.as_deref(),
                logical: $env.hl,
                node: $env.hn,
            },
            || $payload($env),
        )
    }};
}

pub(super) fn json_frame(
    env: &JsonEnvelope<'_>,
    nested: bool,
    zip: Inflation,
) -> Result<Frame, DecodeError> {
    let frame = |inner: &JsonEnvelope<'_>, nested| json_frame(inner, nested, zip);
    let payload = |env: &JsonEnvelope<'_>| json_payload(env, nested, zip);
    envelope_frame!(frame, env, nested, payload)
}

pub(super) fn pack_frame(
    env: &PackEnvelope<'_>,
    nested: bool,
    backing: Option<&Bytes>,
    zip: Inflation,
) -> Result<Frame, DecodeError> {
    let frame = |inner: &PackEnvelope<'_>, nested| pack_frame(inner, nested, backing, zip);
    let payload = |env: &PackEnvelope<'_>| pack_payload(env, nested, backing, zip);
    envelope_frame!(frame, env, nested, payload)
}

/// The envelopes in a frame's `f`: present, at the top level, and `min`
/// to 1 024 of them; `why` names the rules when they are broken.
fn list_of<'e, E>(
    inner: Option<&'e [E]>,
    nested: bool,
    frame: &'static str,
    min: usize,
    why: [&'static str; 2],
) -> Result<&'e [E], DecodeError> {
    if nested {
        return Err(DecodeError::InvalidField {
            field: "f",
            reason: why[0],
        });
    }
    let inner = need(inner, frame, "f")?;
    if inner.len() < min || inner.len() > MAX_BATCH {
        return Err(DecodeError::InvalidField {
            field: "f",
            reason: why[1],
        });
    }
    Ok(inner)
}

pub(super) fn batch_frame<E>(
    inner: Option<&[E]>,
    nested: bool,
    decode: impl Fn(&E) -> Result<Frame, DecodeError>,
) -> Result<Frame, DecodeError> {
    let why = ["batches do not nest", "a batch holds 1 to 1024 messages"];
    let inner = list_of(inner, nested, "batch", 1, why)?;
    let mut msgs = Vec::with_capacity(inner.len());
    for e in inner {
        match decode(e)? {
            Frame::Msg(m) => msgs.push(m),
            _ => {
                return Err(DecodeError::InvalidField {
                    field: "f",
                    reason: "a batch holds only msg frames",
                })
            }
        }
    }
    Ok(Frame::Batch(msgs))
}

/// The payload of a MessagePack envelope, in any of its forms; `None`
/// when it has no payload field at all.
fn pack_payload(
    env: &PackEnvelope<'_>,
    nested: bool,
    backing: Option<&Bytes>,
    zip: Inflation,
) -> Result<Option<Payload>, DecodeError> {
    #[cfg(not(feature = "compression"))]
    let _ = zip;
    let embedded = env.j.is_some() || env.m.is_some() || env.b.is_some();
    let detached = detached_of(env.dj, env.dm, env.db)?;
    #[cfg(feature = "compression")]
    if let Some(d) = deflated_of(
        env.z,
        [env.zj, env.zm, env.zb].map(|b| b.map(|b| &**b)),
        embedded,
        detached.is_some(),
        zip,
    )? {
        return inflated(d, zip).map(Some);
    }
    if let Some(p) = detached_payload(detached, embedded, nested)? {
        return Ok(Some(p));
    }
    match (&env.j, env.m, env.b) {
        (Some(j), None, None) => {
            check_json_depth(j.as_bytes(), "j")?;
            json_value(j.as_bytes()).map_err(|_| DecodeError::InvalidField {
                field: "j",
                reason: "not a JSON value",
            })?;
            Ok(Some(Payload {
                kind: PayloadKind::Json,
                data: share(backing, j.as_bytes()),
            }))
        }
        (None, Some(m), None) => Ok(Some(Payload {
            kind: PayloadKind::MsgPack,
            data: share(backing, m),
        })),
        (None, None, Some(b)) => Ok(Some(Payload {
            kind: PayloadKind::Binary,
            data: share(backing, b),
        })),
        (None, None, None) => Ok(None),
        _ => Err(DecodeError::InvalidField {
            field: "m",
            reason: "a message carries exactly one payload",
        }),
    }
}

/// A `subs` frame: each envelope of `f` a `sub`.
fn subs_frame<E>(
    inner: Option<&[E]>,
    nested: bool,
    decode: impl Fn(&E) -> Result<Frame, DecodeError>,
) -> Result<Frame, DecodeError> {
    let why = ["subs do not nest", "at most 1024 positions"];
    let inner = list_of(inner, nested, "subs", 0, why)?;
    let mut list = Vec::with_capacity(inner.len());
    for e in inner {
        match decode(e)? {
            Frame::Sub(pos) if pos.missed_from.is_none() => list.push(pos),
            _ => {
                return Err(DecodeError::InvalidField {
                    field: "f",
                    reason: "subs holds only sub positions, without from",
                })
            }
        }
    }
    Ok(Frame::Subs(list))
}

/// A room name as every frame carries it: 1 to 256 bytes.
fn room_name(room: Option<&str>, frame: &'static str) -> Result<std::sync::Arc<str>, DecodeError> {
    match room {
        None => Err(DecodeError::MissingField { frame, field: "r" }),
        Some(r) if r.is_empty() || r.len() > MAX_TOKEN_LEN => Err(DecodeError::InvalidField {
            field: "r",
            reason: "room names are 1 to 256 bytes",
        }),
        Some(r) => Ok(std::sync::Arc::from(r)),
    }
}

/// A stream offset of an entry: from 1.
fn entry_offset(seq: Option<u64>, frame: &'static str) -> Result<u64, DecodeError> {
    match need(seq, frame, "seq")? {
        0 => Err(DecodeError::InvalidField {
            field: "seq",
            reason: "stream offsets start at 1",
        }),
        o => Ok(o),
    }
}

/// Fields only some frame types use.
struct Extra<'a> {
    epoch: Option<u64>,
    within: Option<u64>,
    token: Option<&'a str>,
    rq: Option<bool>,
    rs: Option<u64>,
    room: Option<&'a str>,
    op: Option<&'a str>,
    key: Option<&'a str>,
    map: Option<&'a str>,
    logical: Option<u64>,
    node: Option<u64>,
}

/// An `lv`'s fields but its payload: (room, key, epoch, version). Shared
/// by both codecs' readers rather than inlined into each.
#[inline(never)]
fn latest_fields(
    seq: Option<u64>,
    extra: &Extra<'_>,
) -> Result<(std::sync::Arc<str>, std::sync::Arc<str>, u64, u64), DecodeError> {
    let epoch = need(extra.epoch, "lv", "e")?;
    if epoch >= MAX_EPOCH {
        return Err(DecodeError::InvalidField {
            field: "e",
            reason: "epochs are below 2^53",
        });
    }
    let version = match need(seq, "lv", "seq")? {
        0 => {
            return Err(DecodeError::InvalidField {
                field: "seq",
                reason: "versions start at 1",
            })
        }
        v => v,
    };
    let key = match need(extra.key, "lv", "k")? {
        k if k.is_empty() || k.len() > MAX_TOKEN_LEN => {
            return Err(DecodeError::InvalidField {
                field: "k",
                reason: "keys are 1 to 256 bytes",
            })
        }
        k => std::sync::Arc::from(k),
    };
    Ok((room_name(extra.room, "lv")?, key, epoch, version))
}

/// A name or key of a synced map (`n`, `k`): 1 to 256 bytes.
fn map_token(
    v: Option<&str>,
    frame: &'static str,
    field: &'static str,
    reason: &'static str,
) -> Result<std::sync::Arc<str>, DecodeError> {
    match need(v, frame, field)? {
        v if v.is_empty() || v.len() > MAX_TOKEN_LEN => {
            Err(DecodeError::InvalidField { field, reason })
        }
        v => Ok(std::sync::Arc::from(v)),
    }
}

/// A map's name (`n`) in frame `frame`.
fn map_name(extra: &Extra<'_>, frame: &'static str) -> Result<std::sync::Arc<str>, DecodeError> {
    map_token(extra.map, frame, "n", "map names are 1 to 256 bytes")
}

/// An `mv`, but its value (`None` here). Shared by both codecs' readers
/// rather than inlined into each.
#[inline(never)]
fn map_value_fields(
    ts: Option<u64>,
    id: Option<u64>,
    extra: &Extra<'_>,
) -> Result<MapValue, DecodeError> {
    let room = room_name(extra.room, "mv")?;
    let map = map_name(extra, "mv")?;
    let key = map_token(extra.key, "mv", "k", "keys are 1 to 256 bytes")?;
    let physical_ms = need(ts, "mv", "ts")?;
    if physical_ms >= MAX_EPOCH {
        return Err(DecodeError::InvalidField {
            field: "ts",
            reason: "a stamp's time is below 2^53",
        });
    }
    let logical =
        u32::try_from(need(extra.logical, "mv", "hl")?).map_err(|_| DecodeError::InvalidField {
            field: "hl",
            reason: "a stamp's logical counter is at most 2^32 - 1",
        })?;
    let node = need(extra.node, "mv", "hn")?;
    if node >= MAX_EPOCH {
        return Err(DecodeError::InvalidField {
            field: "hn",
            reason: "a stamp's node is below 2^53",
        });
    }
    let stamp = HlcTimestamp {
        physical_ms,
        logical,
        node,
    };
    Ok(MapValue {
        room,
        map,
        key,
        stamp,
        value: None,
        settles: id,
    })
}

#[allow(clippy::too_many_arguments)]
fn common_frame(
    t: &str,
    seq: Option<u64>,
    id: Option<u64>,
    ack: Option<u64>,
    ts: Option<u64>,
    nonce: Option<u64>,
    from: Option<u64>,
    code: Option<u16>,
    retry: Option<u64>,
    extra: Extra<'_>,
    payload: impl FnOnce() -> Result<Option<Payload>, DecodeError>,
) -> Result<Frame, DecodeError> {
    Ok(match t {
        "ping" => Frame::Ping {
            nonce: need(nonce, "ping", "nonce")?,
        },
        "pong" => Frame::Pong {
            nonce: need(nonce, "pong", "nonce")?,
        },
        "msg" => {
            let seq = need(seq, "msg", "seq")?;
            if seq == 0 {
                return Err(DecodeError::InvalidField {
                    field: "seq",
                    reason: "sequence numbers start at 1",
                });
            }
            let id = need(id, "msg", "id")?;
            match msg_body(&extra, payload) {
                Ok((kind, room, payload)) => Frame::Msg(Msg {
                    seq,
                    id,
                    ack,
                    ts,
                    kind,
                    room,
                    payload,
                }),
                // A size over the limit closes the connection (1009), and
                // so does a compressed payload that cannot be taken (1002).
                Err(e) if closes(&e) => return Err(e),
                // Numbered but unusable: the receiver consumes its number and
                // refuses it by id (PROTOCOL.md, section 9).
                Err(e) => Frame::Msg(Msg::invalid(seq, id, ack, InvalidMsg::of(&e))),
            }
        }
        "ack" => Frame::Ack {
            ack: need(ack, "ack", "ack")?,
        },
        "pub" => {
            let offset = entry_offset(seq, "pub")?;
            let room = room_name(extra.room, "pub")?;
            let kind = match extra.op {
                None => MsgKind::Plain,
                Some("presence") => MsgKind::Presence,
                Some(_) => {
                    return Err(DecodeError::InvalidField {
                        field: "op",
                        reason: "a stream entry is a message or presence",
                    })
                }
            };
            Frame::Pub(StreamEntry {
                room,
                offset,
                kind,
                ts,
                payload: required(payload())?,
            })
        }
        "lv" => {
            let (room, key, epoch, version) = latest_fields(seq, &extra)?;
            Frame::Latest(LatestValue {
                room,
                key,
                epoch,
                version,
                payload: required(payload())?,
            })
        }
        "mv" => {
            let mut v = map_value_fields(ts, id, &extra)?;
            // No payload field at all: the entry was deleted.
            v.value = payload()?;
            Frame::MapValue(v)
        }
        "ms" => {
            let room = room_name(extra.room, "ms")?;
            let map = map_name(&extra, "ms")?;
            let entries = need(seq, "ms", "seq")?;
            if entries > MAX_MAP_ENTRIES {
                return Err(DecodeError::InvalidField {
                    field: "seq",
                    reason: "a map's snapshot holds at most 65 536 entries",
                });
            }
            Frame::MapSnapshot(MapSnapshot { room, map, entries })
        }
        "skip" => Frame::Skip {
            offset: entry_offset(seq, "skip")?,
            room: room_name(extra.room, "skip")?,
        },
        "sub" => {
            let epoch = need(extra.epoch, "sub", "e")?;
            if epoch >= MAX_EPOCH {
                return Err(DecodeError::InvalidField {
                    field: "e",
                    reason: "epochs are below 2^53",
                });
            }
            let offset = need(seq, "sub", "seq")?;
            if from.is_some_and(|f| f == 0 || f > offset) {
                return Err(DecodeError::InvalidField {
                    field: "from",
                    reason: "missed entries run from 1 to the position",
                });
            }
            Frame::Sub(StreamPos {
                room: room_name(extra.room, "sub")?,
                epoch,
                offset,
                missed_from: from,
            })
        }
        "replay" => {
            let from = need(from, "replay", "from")?;
            if from == 0 {
                return Err(DecodeError::InvalidField {
                    field: "from",
                    reason: "sequence numbers start at 1",
                });
            }
            Frame::Replay { from }
        }
        "goaway" => Frame::GoAway {
            code: need(code, "goaway", "code")?,
            retry_after_ms: retry,
        },
        "reauth" => Frame::Reauth {
            within_ms: need(extra.within, "reauth", "within")?,
        },
        "auth" => {
            let token = need(extra.token, "auth", "token")?;
            if token.len() > MAX_TOKEN_BYTES {
                return Err(DecodeError::InvalidField {
                    field: "token",
                    reason: "longer than 16 KiB",
                });
            }
            Frame::Auth {
                token: token.to_owned(),
            }
        }
        "" => {
            return Err(DecodeError::InvalidField {
                field: "t",
                reason: "empty frame type",
            })
        }
        "batch" => {
            return Err(DecodeError::InvalidField {
                field: "t",
                reason: "batch handled by the envelope decoder",
            })
        }
        "hello" | "welcome" | "reject" => {
            return Err(DecodeError::InvalidField {
                field: "t",
                reason: "handshake frames are JSON text only",
            })
        }
        other => Frame::Unknown(token(Cow::Borrowed(other), "t")?),
    })
}

/// What a `msg` carries besides its numbers: its kind, room and payload,
/// checked. Inlined: it is on every message's path.
#[inline(always)]
fn msg_body(
    extra: &Extra<'_>,
    payload: impl FnOnce() -> Result<Option<Payload>, DecodeError>,
) -> Result<(MsgKind, Option<std::sync::Arc<str>>, Payload), DecodeError> {
    let kind = match (extra.rq, extra.rs, extra.op) {
        (None | Some(false), None, None) => MsgKind::Plain,
        (Some(true), None, None) => MsgKind::Request,
        (None | Some(false), Some(to), None) => MsgKind::Response(to),
        (None | Some(false), Some(to), Some("refused")) => MsgKind::RefusedMessage(to),
        (None | Some(false), None, Some(op)) => match op {
            "join" => MsgKind::Join,
            "leave" => MsgKind::Leave,
            "presence" => MsgKind::Presence,
            "refused" => MsgKind::Refused,
            "mset" => MsgKind::MapWrite,
            _ => {
                return Err(DecodeError::InvalidField {
                    field: "op",
                    reason: "unknown room operation",
                })
            }
        },
        _ => {
            return Err(DecodeError::InvalidField {
                field: "rs",
                reason: "a message has at most one of rq, rs and op",
            })
        }
    };
    let room = match extra.room {
        Some(r) if r.is_empty() || r.len() > MAX_TOKEN_LEN => {
            return Err(DecodeError::InvalidField {
                field: "r",
                reason: "room names are 1 to 256 bytes",
            })
        }
        r => r.map(std::sync::Arc::from),
    };
    if kind.needs_room() && room.is_none() {
        return Err(DecodeError::MissingField {
            frame: "msg",
            field: "r",
        });
    }
    Ok((kind, room, required(payload())?))
}

pub(super) fn handshake_frame(env: HandshakeEnvelope<'_>) -> Result<Frame, DecodeError> {
    let versions = |v: Option<Vec<u8>>, frame: &'static str| -> Result<Vec<u8>, DecodeError> {
        bounded_list(Some(need(v, frame, "versions")?), "versions")
    };
    Ok(match &*env.t {
        "hello" => {
            let client = need(env.client, "hello", "client")?;
            let client = ClientId::from_hex(&client).ok_or(DecodeError::InvalidField {
                field: "client",
                reason: "not 32 hex digits",
            })?;
            let resume = match (env.session, env.delivered) {
                (Some(s), Some(delivered)) => Some(Resume {
                    session: SessionId::from_hex(&s).ok_or(DecodeError::InvalidField {
                        field: "session",
                        reason: "not 32 hex digits",
                    })?,
                    delivered,
                    key: resume_key(env.key)?,
                    acked: env.acked,
                }),
                (None, None) => None,
                (Some(_), None) => {
                    return Err(DecodeError::MissingField {
                        frame: "hello",
                        field: "delivered",
                    })
                }
                (None, Some(_)) => {
                    return Err(DecodeError::MissingField {
                        frame: "hello",
                        field: "session",
                    })
                }
            };
            Frame::Hello(Hello {
                versions: versions(env.versions, "hello")?,
                client,
                resume,
                caps: cap_list(env.caps, "caps")?,
                codecs: codec_list(env.codecs)?,
                join: room_list(env.join)?,
            })
        }
        "welcome" => {
            let codec = need(env.codec, "welcome", "codec")?;
            let session = need(env.session, "welcome", "session")?;
            Frame::Welcome(Welcome {
                version: need(env.version, "welcome", "version")?,
                codec: Codec::from_name(&codec).ok_or(DecodeError::InvalidField {
                    field: "codec",
                    reason: "unknown codec",
                })?,
                session: SessionId::from_hex(&session).ok_or(DecodeError::InvalidField {
                    field: "session",
                    reason: "not 32 hex digits",
                })?,
                resumed: env.resumed.unwrap_or(false),
                lost: env.lost.map(|l| token(l, "lost")).transpose()?,
                delivered: env.delivered.unwrap_or(0),
                features: cap_list(env.features, "features")?.into(),
                ping_interval_ms: need(env.ping_ms, "welcome", "ping_ms")?,
                pong_timeout_ms: need(env.pong_ms, "welcome", "pong_ms")?,
                max_message: need(env.max, "welcome", "max")?,
                key: resume_key(env.key)?,
                recovered: env.recovered.unwrap_or(false),
            })
        }
        "reject" => Frame::Reject(Reject {
            code: need(env.code, "reject", "code")?,
            reason: token(need(env.reason, "reject", "reason")?, "reason")?,
            message: env
                .message
                .map(|m| m.chars().take(MAX_TOKEN_LEN).collect())
                .unwrap_or_default(),
            versions: env.versions.unwrap_or_default(),
            retry_after_ms: env.retry,
        }),
        _ => {
            return Err(DecodeError::InvalidField {
                field: "t",
                reason: "not a handshake frame",
            })
        }
    })
}
