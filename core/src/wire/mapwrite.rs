//! The body of a synced-map write: the payload of a `mset` message
//! (PROTOCOL.md, section 3.6), in its JSON and MessagePack forms.
//!
//! Owns [`MapWriteBody`] (the map, the key, the value or a delete, and the
//! writer's stamp if it gives one), the two forms it takes as a payload,
//! and [`MapWriteError`], what is wrong with a body that cannot be read,
//! down to the short reason a refusal carries. The forms are written by
//! hand, as the envelopes are, so that a client needs no serde serializer
//! (the tests check them against serde's bytes), and read with serde:
//! serde_json, and rmp-serde with the `msgpack-serde` feature (without it,
//! as in the browser package, whose client only writes bodies, a
//! MessagePack body is refused). Reading never trusts a declared length and
//! keeps nothing but the fields it knows. It never decides what a write
//! does to a map: the machines do.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use bytes::Bytes;
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::encode::vec_write;
use super::envelope::RawJson;
use super::error::serializer_error;
use super::json::{push_json_str, push_uint};
use super::payload::json_depth_ok;
use super::{Codec, EncodeError, Payload, PayloadError, PayloadKind, MAX_EPOCH, MAX_TOKEN_LEN};
use crate::hlc::HlcTimestamp;

/// A synced-map write as a `mset` message's payload carries it.
///
/// In JSON: `{"n":map,"k":key,"vj":value,"h":[ms,logical,node]}`, the
/// value as `"vj"` (a JSON value, embedded), `"vm"` (a MessagePack value)
/// or `"vb"` (opaque bytes), these two in base64; in MessagePack the same
/// map, `"vj"` a string holding the JSON text, `"vm"` and `"vb"` `bin`. No
/// value field: a delete. No `"h"`: the server stamps the write.
#[derive(Clone, Debug, PartialEq)]
pub struct MapWriteBody {
    /// The map's name (`"n"`), 1 to 256 bytes.
    pub map: Arc<str>,
    /// The entry's key (`"k"`), 1 to 256 bytes.
    pub key: Arc<str>,
    /// The value (`"vj"`, `"vm"` or `"vb"`); `None`: the entry is deleted.
    pub value: Option<Payload>,
    /// The writer's stamp (`"h"`: `[physical_ms, logical, node]`, the
    /// first and last below 2^53); `None`: the server stamps the write.
    pub stamp: Option<HlcTimestamp>,
}

/// Why a `mset` payload is not a synced-map write. Each variant names
/// what is wrong; [`reason`](Self::reason) says it in one word for a
/// refusal.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MapWriteError {
    /// The payload is opaque bytes: a body is a JSON or MessagePack one.
    #[error("a `mset` body is a JSON or MessagePack payload, not opaque bytes")]
    NotJsonOrMsgPack,
    /// The payload is not a JSON object or MessagePack map, names a field
    /// twice, or (in a build without the `msgpack-serde` feature) is
    /// MessagePack, which that build does not read.
    #[error("not a `mset` body: {message}")]
    Malformed {
        /// What was found instead.
        message: String,
    },
    /// No map name (`"n"`).
    #[error("a `mset` body without its map's name `n`")]
    MissingMap,
    /// The map name is not a string of 1 to 256 bytes.
    #[error("map name `n`: {reason}")]
    BadMap {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No key (`"k"`).
    #[error("a `mset` body without its key `k`")]
    MissingKey,
    /// The key is not a string of 1 to 256 bytes.
    #[error("key `k`: {reason}")]
    BadKey {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The value cannot be read: of the wrong type, not base64, not one
    /// JSON or MessagePack value, JSON nested too deep.
    #[error("value `{field}`: {reason}")]
    BadValue {
        /// `vj`, `vm` or `vb`.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// More than one value field.
    #[error("a `mset` body carries at most one value, this one `{first}` and `{second}`")]
    TwoValues {
        /// The first of them, in the order `vj`, `vm`, `vb`.
        first: &'static str,
        /// The second.
        second: &'static str,
    },
    /// The stamp (`"h"`) is not three unsigned integers within their
    /// bounds.
    #[error("stamp `h`: {reason}")]
    BadStamp {
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl MapWriteError {
    /// A short machine-readable reason: `bad_body`, `bad_map`, `bad_key`,
    /// `bad_value` or `bad_stamp`.
    pub fn reason(&self) -> &'static str {
        match self {
            MapWriteError::NotJsonOrMsgPack | MapWriteError::Malformed { .. } => "bad_body",
            MapWriteError::MissingMap | MapWriteError::BadMap { .. } => "bad_map",
            MapWriteError::MissingKey | MapWriteError::BadKey { .. } => "bad_key",
            MapWriteError::BadValue { .. } | MapWriteError::TwoValues { .. } => "bad_value",
            MapWriteError::BadStamp { .. } => "bad_stamp",
        }
    }
}

const MAP_NAME_LEN: &str = "map names are 1 to 256 bytes";
const KEY_LEN: &str = "keys are 1 to 256 bytes";
const NOT_A_STRING: &str = "not a string";
const STAMP_SHAPE: &str = "not an array of three unsigned integers";
const STAMP_TIME: &str = "a stamp's time is below 2^53";
const STAMP_LOGICAL: &str = "a stamp's logical counter is at most 2^32 - 1";
const STAMP_NODE: &str = "a stamp's node is below 2^53";
const VALUE_TOO_DEEP: &str = "JSON nested deeper than 64 levels";
/// The body nests its value one level down, so a value of the deepest
/// nesting a JSON payload may have does not fit a JSON body.
const VALUE_TOO_DEEP_FOR_BODY: &str = "JSON nested deeper than 63 levels, in a JSON body";

/// Whether a map name or key has 1 to 256 bytes.
fn token_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_TOKEN_LEN
}

impl MapWriteBody {
    /// The payload of a `mset` message: a JSON payload for `Codec::Json`, a
    /// MessagePack one for `Codec::MsgPack`.
    ///
    /// Fails, as the server would refuse the write, when the map name or
    /// the key is empty or longer than 256 bytes, when the stamp's time or
    /// node is 2^53 or more, or when a JSON value nested 64 levels deep
    /// would go in a JSON body (it nests one level deeper there, past what
    /// a JSON payload may: send it in a MessagePack body).
    pub fn to_payload(&self, codec: Codec) -> Result<Payload, EncodeError> {
        let invalid = |field, reason| Err(EncodeError::InvalidField { field, reason });
        if !token_ok(&self.map) {
            return invalid("n", MAP_NAME_LEN);
        }
        if !token_ok(&self.key) {
            return invalid("k", KEY_LEN);
        }
        if let Some(h) = self.stamp {
            if h.physical_ms >= MAX_EPOCH {
                return invalid("h", STAMP_TIME);
            }
            if h.node >= MAX_EPOCH {
                return invalid("h", STAMP_NODE);
            }
        }
        let (kind, data) = match codec {
            Codec::Json => {
                let data = self.json()?;
                if !json_depth_ok(&data) {
                    return invalid("vj", VALUE_TOO_DEEP_FOR_BODY);
                }
                (PayloadKind::Json, data)
            }
            Codec::MsgPack => (PayloadKind::MsgPack, self.msgpack()?),
        };
        Ok(Payload {
            kind,
            data: data.into(),
        })
    }

    /// The JSON form, as serde_json writes it (the tests check the two
    /// agree): the fields in the order `n`, `k`, the value, `h`.
    fn json(&self) -> Result<Vec<u8>, EncodeError> {
        let value_len = self.value.as_ref().map_or(0, |p| p.len() / 3 * 4 + 8);
        let mut out = Vec::with_capacity(32 + self.map.len() + self.key.len() + value_len);
        out.extend_from_slice(br#"{"n":"#);
        push_json_str(&mut out, &self.map);
        out.extend_from_slice(br#","k":"#);
        push_json_str(&mut out, &self.key);
        if let Some(p) = &self.value {
            match p.kind {
                // Checked to be one JSON value when the payload was made.
                PayloadKind::Json => {
                    std::str::from_utf8(&p.data).map_err(serializer_error)?;
                    out.extend_from_slice(br#","vj":"#);
                    out.extend_from_slice(&p.data);
                }
                PayloadKind::MsgPack | PayloadKind::Binary => {
                    let key: &[u8] = match p.kind {
                        PayloadKind::MsgPack => br#","vm":""#,
                        _ => br#","vb":""#,
                    };
                    out.extend_from_slice(key);
                    crate::base64::encode_into(&mut out, &p.data);
                    out.push(b'"');
                }
            }
        }
        if let Some(h) = self.stamp {
            out.extend_from_slice(br#","h":["#);
            push_uint(&mut out, h.physical_ms);
            out.push(b',');
            push_uint(&mut out, u64::from(h.logical));
            out.push(b',');
            push_uint(&mut out, h.node);
            out.push(b']');
        }
        out.push(b'}');
        Ok(out)
    }

    /// The MessagePack form, as rmp-serde writes it (`to_vec_named`; the
    /// tests check the two agree).
    fn msgpack(&self) -> Result<Vec<u8>, EncodeError> {
        use super::packwrite::{write_array_len, write_bin, write_map_len, write_str, write_uint};
        let value_len = self.value.as_ref().map_or(0, |p| p.len() + 8);
        let mut out = Vec::with_capacity(40 + self.map.len() + self.key.len() + value_len);
        let fields = 2 + u32::from(self.value.is_some()) + u32::from(self.stamp.is_some());
        write_map_len(&mut out, fields).map_err(vec_write)?;
        write_str(&mut out, "n").map_err(vec_write)?;
        write_str(&mut out, &self.map).map_err(vec_write)?;
        write_str(&mut out, "k").map_err(vec_write)?;
        write_str(&mut out, &self.key).map_err(vec_write)?;
        if let Some(p) = &self.value {
            match p.kind {
                PayloadKind::Json => {
                    let text = std::str::from_utf8(&p.data).map_err(serializer_error)?;
                    write_str(&mut out, "vj").map_err(vec_write)?;
                    write_str(&mut out, text).map_err(vec_write)?;
                }
                PayloadKind::MsgPack => {
                    write_str(&mut out, "vm").map_err(vec_write)?;
                    write_bin(&mut out, &p.data).map_err(vec_write)?;
                }
                PayloadKind::Binary => {
                    write_str(&mut out, "vb").map_err(vec_write)?;
                    write_bin(&mut out, &p.data).map_err(vec_write)?;
                }
            }
        }
        if let Some(h) = self.stamp {
            write_str(&mut out, "h").map_err(vec_write)?;
            write_array_len(&mut out, 3).map_err(vec_write)?;
            write_uint(&mut out, h.physical_ms).map_err(vec_write)?;
            write_uint(&mut out, u64::from(h.logical)).map_err(vec_write)?;
            write_uint(&mut out, h.node).map_err(vec_write)?;
        }
        Ok(out)
    }

    /// Reads a `mset` payload (either kind); a typed error says what is
    /// wrong.
    ///
    /// The payload must be a JSON object or a MessagePack map (with string
    /// keys); fields other than `n`, `k`, `vj`, `vm`, `vb` and `h` are
    /// ignored, and a field that is `null` (nil) counts as absent, except
    /// `"vj":null` in a JSON body, which is the JSON value `null`. When
    /// several things are wrong, the first in this order is reported: the
    /// body as a whole, `n`, `k`, the value, `h`.
    pub fn from_payload(p: &Payload) -> Result<MapWriteBody, MapWriteError> {
        match p.kind {
            PayloadKind::Json => read_json(&p.data)?.body(),
            PayloadKind::MsgPack => read_msgpack(&p.data)?.body(),
            PayloadKind::Binary => Err(MapWriteError::NotJsonOrMsgPack),
        }
    }
}

fn malformed(e: impl fmt::Display) -> MapWriteError {
    MapWriteError::Malformed {
        message: e.to_string(),
    }
}

/// The fields of a JSON body.
fn read_json(data: &[u8]) -> Result<Fields<'_, JsonForm>, MapWriteError> {
    let mut de = serde_json::Deserializer::from_slice(data);
    let fields = (&mut de)
        .deserialize_map(BodyVisitor(PhantomData))
        .map_err(malformed)?;
    de.end().map_err(malformed)?;
    Ok(fields)
}

/// The fields of a MessagePack body (rmp-serde is a dev-dependency: the
/// tests have it whatever the features).
#[cfg(any(test, feature = "msgpack-serde"))]
fn read_msgpack(data: &[u8]) -> Result<Fields<'_, PackForm>, MapWriteError> {
    use super::payload::msgpack_value_end;
    // A payload made by `Payload::msgpack` is one value; one decoded from
    // an envelope may not be.
    if msgpack_value_end(data) != Ok(data.len()) {
        return Err(malformed("not one MessagePack value"));
    }
    let mut de = rmp_serde::Deserializer::from_read_ref(data);
    de.set_max_depth(super::MAX_MSGPACK_DEPTH);
    (&mut de)
        .deserialize_map(BodyVisitor(PhantomData))
        .map_err(malformed)
}

/// Without rmp-serde, no MessagePack body is read.
#[cfg(not(any(test, feature = "msgpack-serde")))]
fn read_msgpack(_: &[u8]) -> Result<Fields<'_, PackForm>, MapWriteError> {
    Err(malformed("this build reads no MessagePack bodies"))
}

/// A field as read: absent (or null), of the wrong type, or its value.
enum Lenient<T> {
    Absent,
    Wrong,
    Got(T),
}

/// What a [`Lenient`] field takes; each method's `None`: a value of the
/// wrong type.
trait Take<'de>: Sized {
    fn str(_: Cow<'de, str>) -> Option<Self> {
        None
    }
    fn bytes(_: Cow<'de, [u8]>) -> Option<Self> {
        None
    }
    fn uint(_: u64) -> Option<Self> {
        None
    }
    fn seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Option<Self>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
}

impl<'de> Take<'de> for Cow<'de, str> {
    fn str(s: Cow<'de, str>) -> Option<Self> {
        Some(s)
    }
}

impl<'de> Take<'de> for Cow<'de, [u8]> {
    fn bytes(b: Cow<'de, [u8]>) -> Option<Self> {
        Some(b)
    }
}

impl Take<'_> for u64 {
    fn uint(v: u64) -> Option<Self> {
        Some(v)
    }
}

/// A stamp: exactly three unsigned integers.
impl<'de> Take<'de> for [u64; 3] {
    fn seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Option<Self>, A::Error> {
        let mut out = [0u64; 3];
        let mut count = 0usize;
        let mut ok = true;
        while let Some(v) = seq.next_element::<Lenient<u64>>()? {
            match (out.get_mut(count), v) {
                (Some(slot), Lenient::Got(v)) => *slot = v,
                _ => ok = false,
            }
            count = count.saturating_add(1);
        }
        Ok((ok && count == 3).then_some(out))
    }
}

impl<'de, T: Take<'de>> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LenientVisitor(PhantomData))
    }
}

struct LenientVisitor<T>(PhantomData<T>);

/// A value of the wrong type, read to its end (without keeping it).
macro_rules! wrong {
    ($($name:ident($ty:ty)),*) => {
        $(fn $name<E: de::Error>(self, _: $ty) -> Result<Self::Value, E> {
            Ok(Lenient::Wrong)
        })*
    };
}

impl<'de, T: Take<'de>> Visitor<'de> for LenientVisitor<T> {
    type Value = Lenient<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(T::str(Cow::Borrowed(v)).map_or(Lenient::Wrong, Lenient::Got))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(T::str(Cow::Owned(v.to_owned())).map_or(Lenient::Wrong, Lenient::Got))
    }

    fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Self::Value, E> {
        Ok(T::bytes(Cow::Borrowed(v)).map_or(Lenient::Wrong, Lenient::Got))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
        Ok(T::bytes(Cow::Owned(v.to_vec())).map_or(Lenient::Wrong, Lenient::Got))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(T::uint(v).map_or(Lenient::Wrong, Lenient::Got))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Ok(Lenient::Wrong),
        }
    }

    wrong!(
        visit_bool(bool),
        visit_f64(f64),
        visit_u128(u128),
        visit_i128(i128)
    );

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Lenient::Absent)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Lenient::Absent)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        IgnoredAny::deserialize(d).map(|_| Lenient::Wrong)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        Ok(T::seq(seq)?.map_or(Lenient::Wrong, Lenient::Got))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Lenient::Wrong)
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, e: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_enum(e).map(|_| Lenient::Wrong)
    }
}

/// A body's field name; any other key is skipped with its value.
#[derive(Clone, Copy)]
enum Key {
    N,
    K,
    Vj,
    Vm,
    Vb,
    H,
    Other,
}

impl Key {
    fn of(name: &[u8]) -> Key {
        match name {
            b"n" => Key::N,
            b"k" => Key::K,
            b"vj" => Key::Vj,
            b"vm" => Key::Vm,
            b"vb" => Key::Vb,
            b"h" => Key::H,
            _ => Key::Other,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Key::N => "n",
            Key::K => "k",
            Key::Vj => "vj",
            Key::Vm => "vm",
            Key::Vb => "vb",
            Key::H => "h",
            Key::Other => "",
        }
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(Key::of(v.as_bytes()))
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Key, E> {
                Ok(Key::of(v))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Key, E> {
                Ok(Key::Other)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Key, E> {
                Ok(Key::Other)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Key, E> {
                Ok(Key::Other)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Key, E> {
                Ok(Key::Other)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Key, E> {
                Ok(Key::Other)
            }
        }
        d.deserialize_any(KeyVisitor)
    }
}

/// How one of the two forms carries a value: `vj`, and `vm` and `vb`.
trait Form<'de> {
    /// What `vj` is read as.
    type Json: Deserialize<'de>;
    /// What `vm` and `vb` are read as.
    type Bytes: Deserialize<'de>;

    /// Whether `vj` counts as given.
    fn json_given(v: &Self::Json) -> bool;
    /// The JSON value `vj` carries, or why it carries none.
    fn json(v: Self::Json) -> Result<Payload, &'static str>;
    /// Whether `vm` or `vb` counts as given.
    fn bytes_given(v: &Self::Bytes) -> bool;
    /// The bytes `vm` or `vb` carries, or why it carries none.
    fn bytes(v: Self::Bytes) -> Result<Bytes, &'static str>;
}

/// A JSON value as a payload, its faults as a value's.
fn json_value_payload(text: &str) -> Result<Payload, &'static str> {
    Payload::json(Bytes::copy_from_slice(text.as_bytes())).map_err(|e| match e {
        PayloadError::TooDeep => VALUE_TOO_DEEP,
        _ => "not a JSON value",
    })
}

/// The JSON form: `vj` embedded, `vm` and `vb` in base64.
enum JsonForm {}

impl<'de> Form<'de> for JsonForm {
    // `"vj":null` is the value null: never absent, never of a wrong type.
    type Json = RawJson<'de>;
    type Bytes = Lenient<Cow<'de, str>>;

    fn json_given(_: &RawJson<'de>) -> bool {
        true
    }

    fn json(v: RawJson<'de>) -> Result<Payload, &'static str> {
        json_value_payload(v.get())
    }

    fn bytes_given(v: &Self::Bytes) -> bool {
        !matches!(v, Lenient::Absent)
    }

    fn bytes(v: Self::Bytes) -> Result<Bytes, &'static str> {
        match v {
            Lenient::Got(text) => crate::base64::decode(text.as_bytes())
                .map(Bytes::from)
                .ok_or("not valid base64"),
            _ => Err("not a base64 string"),
        }
    }
}

/// The MessagePack form: `vj` the JSON text as a string, `vm` and `vb`
/// `bin`.
enum PackForm {}

impl<'de> Form<'de> for PackForm {
    type Json = Lenient<Cow<'de, str>>;
    type Bytes = Lenient<Cow<'de, [u8]>>;

    fn json_given(v: &Self::Json) -> bool {
        !matches!(v, Lenient::Absent)
    }

    fn json(v: Self::Json) -> Result<Payload, &'static str> {
        match v {
            Lenient::Got(text) => json_value_payload(&text),
            _ => Err("not a string holding JSON text"),
        }
    }

    fn bytes_given(v: &Self::Bytes) -> bool {
        !matches!(v, Lenient::Absent)
    }

    fn bytes(v: Self::Bytes) -> Result<Bytes, &'static str> {
        match v {
            Lenient::Got(b) => Ok(Bytes::copy_from_slice(&b)),
            _ => Err("not bin"),
        }
    }
}

/// A body's fields as they came, in form `F`.
struct Fields<'de, F: Form<'de>> {
    n: Lenient<Cow<'de, str>>,
    k: Lenient<Cow<'de, str>>,
    vj: Option<F::Json>,
    vm: Option<F::Bytes>,
    vb: Option<F::Bytes>,
    h: Lenient<[u64; 3]>,
    /// A field that came more than once.
    twice: Option<&'static str>,
}

struct BodyVisitor<F>(PhantomData<F>);

impl<'de, F: Form<'de>> Visitor<'de> for BodyVisitor<F> {
    type Value = Fields<'de, F>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map of a `mset` body's fields")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut f = Fields::<'de, F> {
            n: Lenient::Absent,
            k: Lenient::Absent,
            vj: None,
            vm: None,
            vb: None,
            h: Lenient::Absent,
            twice: None,
        };
        let mut seen = 0u8;
        while let Some(key) = map.next_key::<Key>()? {
            let bit = 1u8 << (key as u8);
            if matches!(key, Key::Other) || seen & bit != 0 {
                if !matches!(key, Key::Other) {
                    f.twice = f.twice.or(Some(key.name()));
                }
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            seen |= bit;
            match key {
                Key::N => f.n = map.next_value()?,
                Key::K => f.k = map.next_value()?,
                Key::Vj => f.vj = Some(map.next_value()?),
                Key::Vm => f.vm = Some(map.next_value()?),
                Key::Vb => f.vb = Some(map.next_value()?),
                Key::H => f.h = map.next_value()?,
                Key::Other => {}
            }
        }
        Ok(f)
    }
}

impl<'de, F: Form<'de>> Fields<'de, F> {
    /// The write the fields make, or the first thing wrong with them.
    fn body(self) -> Result<MapWriteBody, MapWriteError> {
        if let Some(field) = self.twice {
            return Err(malformed(format_args!("field `{field}` more than once")));
        }
        let map = match self.n {
            Lenient::Absent => return Err(MapWriteError::MissingMap),
            Lenient::Wrong => {
                return Err(MapWriteError::BadMap {
                    reason: NOT_A_STRING,
                })
            }
            Lenient::Got(n) if !token_ok(&n) => {
                return Err(MapWriteError::BadMap {
                    reason: MAP_NAME_LEN,
                })
            }
            Lenient::Got(n) => Arc::from(&*n),
        };
        let key = match self.k {
            Lenient::Absent => return Err(MapWriteError::MissingKey),
            Lenient::Wrong => {
                return Err(MapWriteError::BadKey {
                    reason: NOT_A_STRING,
                })
            }
            Lenient::Got(k) if !token_ok(&k) => {
                return Err(MapWriteError::BadKey { reason: KEY_LEN })
            }
            Lenient::Got(k) => Arc::from(&*k),
        };
        let vj = self.vj.filter(F::json_given);
        let vm = self.vm.filter(F::bytes_given);
        let vb = self.vb.filter(F::bytes_given);
        let given = [
            ("vj", vj.is_some()),
            ("vm", vm.is_some()),
            ("vb", vb.is_some()),
        ];
        let mut names = given.iter().filter(|(_, g)| *g).map(|(name, _)| *name);
        if let (Some(first), Some(second)) = (names.next(), names.next()) {
            return Err(MapWriteError::TwoValues { first, second });
        }
        let bad = |field| move |reason| MapWriteError::BadValue { field, reason };
        let value = match (vj, vm, vb) {
            (Some(v), _, _) => Some(F::json(v).map_err(bad("vj"))?),
            (_, Some(v), _) => {
                let bytes = F::bytes(v).map_err(bad("vm"))?;
                Some(Payload::msgpack(bytes).map_err(|_| bad("vm")("not one MessagePack value"))?)
            }
            (_, _, Some(v)) => Some(Payload::binary(F::bytes(v).map_err(bad("vb"))?)),
            (None, None, None) => None,
        };
        let stamp = match self.h {
            Lenient::Absent => None,
            Lenient::Wrong => {
                return Err(MapWriteError::BadStamp {
                    reason: STAMP_SHAPE,
                })
            }
            Lenient::Got([physical_ms, logical, node]) => {
                let bad = |reason| MapWriteError::BadStamp { reason };
                if physical_ms >= MAX_EPOCH {
                    return Err(bad(STAMP_TIME));
                }
                let logical = u32::try_from(logical).map_err(|_| bad(STAMP_LOGICAL))?;
                if node >= MAX_EPOCH {
                    return Err(bad(STAMP_NODE));
                }
                Some(HlcTimestamp {
                    physical_ms,
                    logical,
                    node,
                })
            }
        };
        Ok(MapWriteBody {
            map,
            key,
            value,
            stamp,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde::Serialize;

    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const STAMP: HlcTimestamp = HlcTimestamp {
        physical_ms: 1_700_000_000_000,
        logical: 4,
        node: 77,
    };

    fn body(value: Option<Payload>, stamp: Option<HlcTimestamp>) -> MapWriteBody {
        MapWriteBody {
            map: "meta".into(),
            key: "title".into(),
            value,
            stamp,
        }
    }

    fn values() -> Vec<Option<Payload>> {
        vec![
            Some(Payload::json(&br#"{"a":[1,"\u00e9"],"b":null}"#[..]).unwrap()),
            Some(Payload::null()),
            Some(Payload::json(&br#""Q3""#[..]).unwrap()),
            Some(Payload::msgpack(rmp_serde::to_vec(&(1, "two")).unwrap()).unwrap()),
            Some(Payload::binary(&b"\x00\xff bytes"[..])),
            Some(Payload::binary(vec![0xa5; 300])),
            Some(Payload::binary(Vec::new())),
            None,
        ]
    }

    /// The JSON form as serde_json writes it: the oracle of the
    /// hand-written writer.
    #[derive(Serialize)]
    struct JsonOracle<'a> {
        n: &'a str,
        k: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        vj: Option<RawJson<'a>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        vm: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        vb: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        h: Option<[u64; 3]>,
    }

    /// The MessagePack form as rmp-serde writes it (`to_vec_named`).
    #[derive(Serialize)]
    struct PackOracle<'a> {
        n: &'a str,
        k: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        vj: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        vm: Option<&'a serde_bytes::Bytes>,
        #[serde(skip_serializing_if = "Option::is_none")]
        vb: Option<&'a serde_bytes::Bytes>,
        #[serde(skip_serializing_if = "Option::is_none")]
        h: Option<[u64; 3]>,
    }

    fn of_kind<'a, T>(
        v: &'a Option<Payload>,
        kind: PayloadKind,
        f: impl Fn(&'a Payload) -> T,
    ) -> Option<T> {
        v.as_ref().filter(|p| p.kind() == kind).map(f)
    }

    fn text(p: &Payload) -> &str {
        std::str::from_utf8(p.data()).unwrap()
    }

    fn bin(p: &Payload) -> &serde_bytes::Bytes {
        serde_bytes::Bytes::new(p.data())
    }

    fn serde_bytes_of(b: &MapWriteBody, codec: Codec) -> Vec<u8> {
        let h = b
            .stamp
            .map(|h| [h.physical_ms, u64::from(h.logical), h.node]);
        match codec {
            Codec::Json => serde_json::to_vec(&JsonOracle {
                n: &b.map,
                k: &b.key,
                vj: of_kind(&b.value, PayloadKind::Json, |p| RawJson(text(p))),
                vm: of_kind(&b.value, PayloadKind::MsgPack, |p| {
                    crate::base64::encode(p.data())
                }),
                vb: of_kind(&b.value, PayloadKind::Binary, |p| {
                    crate::base64::encode(p.data())
                }),
                h,
            })
            .unwrap(),
            Codec::MsgPack => rmp_serde::to_vec_named(&PackOracle {
                n: &b.map,
                k: &b.key,
                vj: of_kind(&b.value, PayloadKind::Json, text),
                vm: of_kind(&b.value, PayloadKind::MsgPack, bin),
                vb: of_kind(&b.value, PayloadKind::Binary, bin),
                h,
            })
            .unwrap(),
        }
    }

    /// Every kind of value and a delete, with and without a stamp, in
    /// both forms: written as serde writes them, read back as they were.
    #[test]
    fn bodies_round_trip_in_both_forms() {
        let stamps = [
            None,
            Some(STAMP),
            Some(HlcTimestamp::MIN),
            Some(HlcTimestamp {
                physical_ms: MAX_EPOCH - 1,
                logical: u32::MAX,
                node: MAX_EPOCH - 1,
            }),
        ];
        for value in values() {
            for stamp in stamps {
                for codec in [Codec::Json, Codec::MsgPack] {
                    let b = body(value.clone(), stamp);
                    let p = b.to_payload(codec).unwrap();
                    let kind = match codec {
                        Codec::Json => PayloadKind::Json,
                        _ => PayloadKind::MsgPack,
                    };
                    assert_eq!(p.kind(), kind);
                    assert_eq!(&p.data()[..], &serde_bytes_of(&b, codec)[..], "{b:?}");
                    // A valid payload of its kind.
                    match codec {
                        Codec::Json => assert!(Payload::json(p.data().clone()).is_ok()),
                        _ => assert!(Payload::msgpack(p.data().clone()).is_ok()),
                    }
                    assert_eq!(MapWriteBody::from_payload(&p), Ok(b), "{codec:?}");
                }
            }
        }
        // Names and keys of any UTF-8, at their longest.
        let long = "\u{e9}".repeat(MAX_TOKEN_LEN / 2);
        let b = MapWriteBody {
            map: long.as_str().into(),
            key: "quo\"te\\ \u{1}".into(),
            value: None,
            stamp: None,
        };
        for codec in [Codec::Json, Codec::MsgPack] {
            let p = b.to_payload(codec).unwrap();
            assert_eq!(MapWriteBody::from_payload(&p), Ok(b.clone()));
        }
    }

    #[test]
    fn the_json_form_is_readable() {
        let text = |b: &MapWriteBody| {
            let p = b.to_payload(Codec::Json).unwrap();
            String::from_utf8(p.data().to_vec()).unwrap()
        };
        let q3 = Some(Payload::json(&br#""Q3""#[..]).unwrap());
        assert_eq!(
            text(&body(q3, Some(STAMP))),
            r#"{"n":"meta","k":"title","vj":"Q3","h":[1700000000000,4,77]}"#
        );
        assert_eq!(text(&body(None, None)), r#"{"n":"meta","k":"title"}"#);
        let bin = Some(Payload::binary(&b"\x00\x01"[..]));
        assert_eq!(
            text(&body(bin, None)),
            r#"{"n":"meta","k":"title","vb":"AAE="}"#
        );
    }

    /// Parses `text`, a JSON body, as a JSON payload.
    fn json(text: &str) -> Payload {
        Payload::json(text.as_bytes().to_vec()).unwrap()
    }

    /// The same fields as a MessagePack body (JSON strings stay strings:
    /// `vj`'s text, and base64 where `bin` belongs, which the MessagePack
    /// form refuses).
    fn pack(text: &str) -> Payload {
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        Payload::msgpack(rmp_serde::to_vec_named(&v).unwrap()).unwrap()
    }

    #[test]
    fn malformed_bodies_are_refused_with_what_is_wrong() {
        use MapWriteError::*;
        let long = "x".repeat(MAX_TOKEN_LEN + 1);
        let bad_value = |field, reason| BadValue { field, reason };
        let stamp = |reason| BadStamp { reason };
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        // Refused the same way in both forms.
        let both: Vec<(String, MapWriteError)> = vec![
            (r#"{"k":"a"}"#.into(), MissingMap),
            (r#"{"n":null,"k":"a"}"#.into(), MissingMap),
            (
                r#"{"n":"","k":"a"}"#.into(),
                BadMap {
                    reason: MAP_NAME_LEN,
                },
            ),
            (
                format!(r#"{{"n":"{long}","k":"a"}}"#),
                BadMap {
                    reason: MAP_NAME_LEN,
                },
            ),
            (
                r#"{"n":7,"k":"a"}"#.into(),
                BadMap {
                    reason: NOT_A_STRING,
                },
            ),
            (
                r#"{"n":["m"],"k":"a"}"#.into(),
                BadMap {
                    reason: NOT_A_STRING,
                },
            ),
            (r#"{"n":"m"}"#.into(), MissingKey),
            (r#"{"n":"m","k":""}"#.into(), BadKey { reason: KEY_LEN }),
            (
                format!(r#"{{"n":"m","k":"{long}"}}"#),
                BadKey { reason: KEY_LEN },
            ),
            (
                r#"{"n":"m","k":{"a":1}}"#.into(),
                BadKey {
                    reason: NOT_A_STRING,
                },
            ),
            // The map before the key, the key before the value.
            (r#"{"k":"","vj":1,"vb":1}"#.into(), MissingMap),
            (r#"{"n":"m","vj":1,"vb":1}"#.into(), MissingKey),
            (
                r#"{"n":"m","k":"a","vm":"AA==","vb":"AA=="}"#.into(),
                TwoValues {
                    first: "vm",
                    second: "vb",
                },
            ),
            (
                r#"{"n":"m","k":"a","vm":true,"vj":1,"h":7}"#.into(),
                TwoValues {
                    first: "vj",
                    second: "vm",
                },
            ),
            (r#"{"n":"m","k":"a","h":[1,2]}"#.into(), stamp(STAMP_SHAPE)),
            (
                r#"{"n":"m","k":"a","h":[1,2,3,4]}"#.into(),
                stamp(STAMP_SHAPE),
            ),
            (
                r#"{"n":"m","k":"a","h":[1,-2,3]}"#.into(),
                stamp(STAMP_SHAPE),
            ),
            (
                r#"{"n":"m","k":"a","h":[1,2.5,3]}"#.into(),
                stamp(STAMP_SHAPE),
            ),
            (
                r#"{"n":"m","k":"a","h":[1,"2",3]}"#.into(),
                stamp(STAMP_SHAPE),
            ),
            (
                r#"{"n":"m","k":"a","h":{"0":1}}"#.into(),
                stamp(STAMP_SHAPE),
            ),
            (r#"{"n":"m","k":"a","h":1}"#.into(), stamp(STAMP_SHAPE)),
            (
                r#"{"n":"m","k":"a","h":[9007199254740992,0,0]}"#.into(),
                stamp(STAMP_TIME),
            ),
            (
                r#"{"n":"m","k":"a","h":[0,4294967296,0]}"#.into(),
                stamp(STAMP_LOGICAL),
            ),
            (
                r#"{"n":"m","k":"a","h":[0,0,9007199254740992]}"#.into(),
                stamp(STAMP_NODE),
            ),
            (
                r#"{"n":"m","k":"a","h":[0,0,18446744073709551615]}"#.into(),
                stamp(STAMP_NODE),
            ),
        ];
        for (text, want) in &both {
            assert_eq!(
                MapWriteBody::from_payload(&json(text)).as_ref(),
                Err(want),
                "{text}"
            );
            assert_eq!(
                MapWriteBody::from_payload(&pack(text)).as_ref(),
                Err(want),
                "{text}"
            );
        }
        let json_only: Vec<(String, MapWriteError)> = vec![
            (
                r#"{"n":"m","k":"a","vm":"!!"}"#.into(),
                bad_value("vm", "not valid base64"),
            ),
            (
                r#"{"n":"m","k":"a","vb":"A"}"#.into(),
                bad_value("vb", "not valid base64"),
            ),
            (
                r#"{"n":"m","k":"a","vb":5}"#.into(),
                bad_value("vb", "not a base64 string"),
            ),
            (
                r#"{"n":"m","k":"a","vm":"kgE="}"#.into(),
                bad_value("vm", "not one MessagePack value"),
            ),
            // `"vj":null` is a value, so this is two.
            (
                r#"{"n":"m","k":"a","vj":null,"vb":"AA=="}"#.into(),
                TwoValues {
                    first: "vj",
                    second: "vb",
                },
            ),
        ];
        for (text, want) in &json_only {
            assert_eq!(
                MapWriteBody::from_payload(&json(text)).as_ref(),
                Err(want),
                "{text}"
            );
        }
        // A JSON payload is never that deep, but one made without the
        // checks is refused all the same.
        let too_deep = Payload {
            kind: PayloadKind::Json,
            data: format!(r#"{{"n":"m","k":"a","vj":{deep}}}"#).into(),
        };
        assert_eq!(
            MapWriteBody::from_payload(&too_deep),
            Err(bad_value("vj", VALUE_TOO_DEEP))
        );
        let pack_only: Vec<(String, MapWriteError)> = vec![
            (
                r#"{"n":"m","k":"a","vm":"AA=="}"#.into(),
                bad_value("vm", "not bin"),
            ),
            (
                r#"{"n":"m","k":"a","vj":1}"#.into(),
                bad_value("vj", "not a string holding JSON text"),
            ),
            (
                r#"{"n":"m","k":"a","vj":"[1,"}"#.into(),
                bad_value("vj", "not a JSON value"),
            ),
            (
                r#"{"n":"m","k":"a","vj":"1 2"}"#.into(),
                bad_value("vj", "not a JSON value"),
            ),
            (
                format!(r#"{{"n":"m","k":"a","vj":"{deep}"}}"#),
                bad_value("vj", VALUE_TOO_DEEP),
            ),
        ];
        for (text, want) in &pack_only {
            assert_eq!(
                MapWriteBody::from_payload(&pack(text)).as_ref(),
                Err(want),
                "{text}"
            );
        }
        // Not a body at all.
        for text in [r#"["m","a"]"#, "null", "7", r#""m""#] {
            for p in [json(text), pack(text)] {
                assert!(
                    matches!(MapWriteBody::from_payload(&p), Err(Malformed { .. })),
                    "{text}"
                );
            }
        }
        assert_eq!(
            MapWriteBody::from_payload(&Payload::binary(&b"{}"[..])),
            Err(NotJsonOrMsgPack)
        );
        // A field twice.
        let twice = MapWriteBody::from_payload(&json(r#"{"n":"m","k":"a","n":"m"}"#));
        assert_eq!(
            twice,
            Err(Malformed {
                message: "field `n` more than once".into()
            })
        );
        // A MessagePack payload from an envelope may hold more than one
        // value; `bin` where strings belong; a nested body too deep.
        let mut trailing = pack(r#"{"n":"m","k":"a"}"#).data().to_vec();
        trailing.push(0xc0);
        let trailing = Payload {
            kind: PayloadKind::MsgPack,
            data: trailing.into(),
        };
        assert!(matches!(
            MapWriteBody::from_payload(&trailing),
            Err(Malformed { .. })
        ));
        let mut bin_name = Vec::new();
        rmp::encode::write_map_len(&mut bin_name, 2).unwrap();
        rmp::encode::write_str(&mut bin_name, "n").unwrap();
        rmp::encode::write_bin(&mut bin_name, b"m").unwrap();
        rmp::encode::write_str(&mut bin_name, "k").unwrap();
        rmp::encode::write_str(&mut bin_name, "a").unwrap();
        assert_eq!(
            MapWriteBody::from_payload(&Payload::msgpack(bin_name).unwrap()),
            Err(BadMap {
                reason: NOT_A_STRING
            })
        );
        // Each refusal's reason, in one word.
        let reasons = [
            (NotJsonOrMsgPack, "bad_body"),
            (
                Malformed {
                    message: String::new(),
                },
                "bad_body",
            ),
            (MissingMap, "bad_map"),
            (BadMap { reason: "" }, "bad_map"),
            (MissingKey, "bad_key"),
            (BadKey { reason: "" }, "bad_key"),
            (bad_value("vj", ""), "bad_value"),
            (
                TwoValues {
                    first: "vj",
                    second: "vm",
                },
                "bad_value",
            ),
            (stamp(""), "bad_stamp"),
        ];
        for (e, reason) in reasons {
            assert_eq!(e.reason(), reason, "{e}");
        }
    }

    /// Unknown fields are skipped, `null` is an absent field (but for
    /// `"vj":null`, the value null), keys may be escaped, and whitespace
    /// is anywhere.
    #[test]
    fn bodies_are_read_as_any_writer_writes_them() {
        let read = |p: Payload| MapWriteBody::from_payload(&p).unwrap();
        let text = r#" { "x" : {"n":[1]}, "\u006e" : "meta", "k":"title", "vm":null, "vb":null,
            "h":null, "y":[{"vj":1}], "vj" : null } "#;
        assert_eq!(read(json(text)), body(Some(Payload::null()), None));
        let text = r#"{"n":"meta","k":"title","vj":null,"h":[1700000000000,4,77],"z":1}"#;
        assert_eq!(read(pack(text)), body(None, Some(STAMP)));
        // Keys that are not strings, in MessagePack, are unknown fields.
        let mut odd = Vec::new();
        rmp::encode::write_map_len(&mut odd, 4).unwrap();
        rmp::encode::write_uint(&mut odd, 0).unwrap();
        rmp::encode::write_str(&mut odd, "x").unwrap();
        rmp::encode::write_nil(&mut odd).unwrap();
        rmp::encode::write_str(&mut odd, "x").unwrap();
        rmp::encode::write_str(&mut odd, "n").unwrap();
        rmp::encode::write_str(&mut odd, "meta").unwrap();
        rmp::encode::write_str(&mut odd, "k").unwrap();
        rmp::encode::write_str(&mut odd, "title").unwrap();
        assert_eq!(read(Payload::msgpack(odd).unwrap()), body(None, None));
    }

    /// What the server would refuse is not written.
    #[test]
    fn bodies_that_would_be_refused_are_not_written() {
        let invalid = |field, reason| Err(EncodeError::InvalidField { field, reason });
        let with = |map: &str, key: &str, stamp| MapWriteBody {
            map: map.into(),
            key: key.into(),
            value: None,
            stamp,
        };
        let long = "x".repeat(MAX_TOKEN_LEN + 1);
        let over = |physical_ms, node| {
            Some(HlcTimestamp {
                physical_ms,
                logical: 0,
                node,
            })
        };
        for codec in [Codec::Json, Codec::MsgPack] {
            let write = |b: MapWriteBody| b.to_payload(codec);
            assert_eq!(write(with("", "k", None)), invalid("n", MAP_NAME_LEN));
            assert_eq!(write(with(&long, "k", None)), invalid("n", MAP_NAME_LEN));
            assert_eq!(write(with("m", "", None)), invalid("k", KEY_LEN));
            assert_eq!(write(with("m", &long, None)), invalid("k", KEY_LEN));
            assert_eq!(
                write(with("m", "k", over(MAX_EPOCH, 0))),
                invalid("h", STAMP_TIME)
            );
            assert_eq!(
                write(with("m", "k", over(0, u64::MAX))),
                invalid("h", STAMP_NODE)
            );
        }
        // A JSON value as deep as a payload may be fits a MessagePack
        // body, not a JSON one, where it nests one level deeper.
        let deep = format!("{}{}", "[".repeat(64), "]".repeat(64));
        let b = body(Some(Payload::json(deep.into_bytes()).unwrap()), None);
        assert_eq!(
            b.to_payload(Codec::Json),
            invalid("vj", VALUE_TOO_DEEP_FOR_BODY)
        );
        let p = b.to_payload(Codec::MsgPack).unwrap();
        assert_eq!(MapWriteBody::from_payload(&p), Ok(b));
    }
}
