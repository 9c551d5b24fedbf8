//! The envelopes in serde form, shared by both directions and both codecs.
//!
//! Owns the field names and their order on the wire: the structs serde
//! writes and reads (one per payload representation, and the handshake's),
//! and the deserializers that keep hostile input bounded (a batch's declared
//! length is never trusted, batches never nest). Fields are only ever added
//! at the end of those every build has, just before the compression fields
//! (which only builds with the `compression` feature have, and which stay
//! last): the hand-written writers follow this order, and serde also reads
//! a MessagePack envelope written as an array, by position, so a field
//! keeps its index whatever the features.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::MAX_BATCH;

/// One envelope in serde form. Generated twice, for the payload
/// representations each codec uses: JSON embeds JSON payloads as raw JSON and
/// carries other payloads in base64; MessagePack embeds JSON payloads as a
/// string and other payloads as `bin`.
macro_rules! envelope {
    ($name:ident, $j:ty, $x:ty) => {
        #[derive(Serialize, Deserialize, Default)]
        pub(super) struct $name<'a> {
            #[serde(borrow)]
            pub(super) t: Cow<'a, str>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub(super) seq: Option<u64>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub(super) id: Option<u64>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub(super) ack: Option<u64>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub(super) ts: Option<u64>,
            // `"j":null` is a JSON payload of null, not a missing payload.
            #[serde(
                default,
                borrow,
                deserialize_with = "present",
                skip_serializing_if = "Option::is_none"
            )]
            pub(super) j: Option<$j>,
            #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
            pub(super) m: Option<$x>,
            #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
            pub(super) b: Option<$x>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub(super) nonce: Option<u64>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub(super) from: Option<u64>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub(super) code: Option<u16>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub(super) retry: Option<u64>,
            #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
            pub(super) r: Option<Cow<'a, str>>,
            #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
            pub(super) op: Option<Cow<'a, str>>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub(super) rq: Option<bool>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub(super) rs: Option<u64>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub(super) within: Option<u64>,
            #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
            pub(super) token: Option<Cow<'a, str>>,
            // Never trust a declared length: a few bytes must not be able to
            // make the decoder reserve room for a huge batch.
            #[serde(
                default,
                borrow,
                deserialize_with = "bounded_batch",
                skip_serializing_if = "Option::is_none"
            )]
            pub(super) f: Option<Vec<$name<'a>>>,
            // Detached payloads (last, so the fields before keep
            // their indexes): the length of a JSON, MessagePack or
            // opaque payload that follows as the next WebSocket message.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub(super) dj: Option<u64>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub(super) dm: Option<u64>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub(super) db: Option<u64>,
            // Room streams: the stream's epoch (`sub`); latest values:
            // the room's values' epoch (`lv`).
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub(super) e: Option<u64>,
            // Latest values: the value's key (`lv`); synced maps: the
            // entry's key (`mv`).
            #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
            pub(super) k: Option<Cow<'a, str>>,
            // Synced maps (`mv`, `ms`): the map's name, and the parts of an
            // entry's stamp after its physical time (`ts`): the logical
            // counter and the node.
            //
            // Here, before the compression fields rather than after them:
            // serde reads an envelope written as an array by position, and
            // refuses an array longer than the struct. After fields only a
            // build with `compression` has, `n` would be the 25th element in
            // a build without it and the 29th in one with it, and an array
            // would read differently, or not at all, depending on the
            // features. Before them, every field outside the compression
            // block has one index in every build, and that block stays the
            // tail that only builds with the feature read. (The price: the
            // compression fields moved three places further in the array
            // form, which no Kitestring peer writes.)
            #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
            pub(super) n: Option<Cow<'a, str>>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub(super) hl: Option<u64>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub(super) hn: Option<u64>,
            // Compressed payloads (PROTOCOL.md, section 2.2): the length
            // once inflated, and the deflated bytes of a JSON,
            // MessagePack or opaque payload, as `m` and `b` carry bytes.
            // (Only with the `compression` feature: a build without it
            // reads them as unknown fields, as every peer before them did.)
            #[cfg(feature = "compression")]
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub(super) z: Option<u64>,
            #[cfg(feature = "compression")]
            #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
            pub(super) zj: Option<$x>,
            #[cfg(feature = "compression")]
            #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
            pub(super) zm: Option<$x>,
            #[cfg(feature = "compression")]
            #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
            pub(super) zb: Option<$x>,
        }
    };
}

std::thread_local! {
    /// Whether a batch's envelopes are being decoded on this thread: a batch
    /// inside one is refused before any of it is read.
    static IN_BATCH: core::cell::Cell<bool> = const { core::cell::Cell::new(false) };
}

/// Deserializes a batch's envelopes one by one, growing the vector as they
/// actually arrive, refusing more than [`MAX_BATCH`] and refusing a batch
/// inside a batch before reading it.
pub(super) fn bounded_batch<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<T>>, D::Error> {
    struct Bounded<T>(core::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Bounded<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "an array of at most {MAX_BATCH} envelopes")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4));
            while let Some(item) = seq.next_element()? {
                if out.len() == MAX_BATCH {
                    return Err(serde::de::Error::invalid_length(MAX_BATCH + 1, &self));
                }
                out.push(item);
            }
            Ok(out)
        }
    }
    if IN_BATCH.with(|b| b.replace(true)) {
        return Err(serde::de::Error::custom("batches do not nest"));
    }
    let result = d
        .deserialize_seq(Bounded(core::marker::PhantomData))
        .map(Some);
    IN_BATCH.with(|b| b.set(false));
    result
}

/// Deserializes a field that is present as `Some`, even if its value is null.
fn present<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

envelope!(JsonEnvelope, RawJson<'a>, Cow<'a, str>);
envelope!(PackEnvelope, Cow<'a, str>, &'a serde_bytes::Bytes);

/// A JSON value's text as it appeared in an envelope (a `j` payload):
/// serde reads and writes it as serde_json's `RawValue`, the hand-written
/// reader takes it as the value's span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RawJson<'a>(pub(super) &'a str);

impl<'a> RawJson<'a> {
    pub(super) fn get(self) -> &'a str {
        self.0
    }
}

impl Serialize for RawJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let raw: &RawValue = serde_json::from_str(self.0).map_err(serde::ser::Error::custom)?;
        raw.serialize(s)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for RawJson<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&'de RawValue>::deserialize(d).map(|raw| RawJson(raw.get()))
    }
}

/// The handshake frames, always JSON.
#[derive(Serialize, Deserialize, Default)]
pub(super) struct HandshakeEnvelope<'a> {
    #[serde(borrow)]
    pub(super) t: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) versions: Option<Vec<u8>>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub(super) client: Option<Cow<'a, str>>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub(super) session: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) delivered: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) acked: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) recovered: Option<bool>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub(super) caps: Option<Vec<Cow<'a, str>>>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub(super) codecs: Option<Vec<Cow<'a, str>>>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub(super) join: Option<Vec<Cow<'a, str>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) version: Option<u8>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub(super) codec: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) resumed: Option<bool>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub(super) lost: Option<Cow<'a, str>>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub(super) features: Option<Vec<Cow<'a, str>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) ping_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) pong_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) max: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) code: Option<u16>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub(super) reason: Option<Cow<'a, str>>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub(super) message: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) retry: Option<u64>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub(super) key: Option<Cow<'a, str>>,
}
