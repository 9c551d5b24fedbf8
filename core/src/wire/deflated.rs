//! Envelopes whose payloads are deflated (PROTOCOL.md, section 2.2), in
//! both directions: the batch and room entry writers that carry deflated
//! payloads, and the checks of an envelope's compression fields (`z`,
//! `zj`, `zm`, `zb`) against its other payload fields, with the inflation
//! of what they carry. Only with the `compression` feature.
//!
//! It never deflates (the encoder's compressor does, `compress`), never
//! decides whether a payload is worth deflating (the encoder does), and
//! never inflates but through `compress::Inflation`, which bounds it.

use super::compress::{Inflation, NOT_AGREED};
use super::encode::{vec_write, write_json_msg, write_pack_msg, Form};
use super::fields::check_json_depth;
use super::json::json_value;
use super::{DecodeError, EncodeError, Msg, Payload, PayloadKind};
#[cfg(any(feature = "server", test))]
use {
    super::encode::{write_json_envelope, write_pack_envelope},
    super::envelope::{JsonEnvelope, PackEnvelope},
    super::{Codec, StreamEntry},
    std::borrow::Cow,
};

/// A `batch` envelope of `msgs`, each carried as `form` says.
pub(super) fn write_json_batch<'a>(
    msgs: &[Msg],
    form: impl Fn(usize) -> Form<'a>,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    out.extend_from_slice(br#"{"t":"batch","f":["#);
    for (i, m) in msgs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json_msg(m, out, form(i))?;
    }
    out.extend_from_slice(b"]}");
    Ok(())
}

/// A `batch` envelope of `msgs` in MessagePack, each carried as `form`
/// says, after the binary header's place.
pub(super) fn write_pack_batch<'a>(
    msgs: &[Msg],
    form: impl Fn(usize) -> Form<'a>,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let len = u32::try_from(msgs.len()).map_err(|_| EncodeError::TooLarge)?;
    super::packwrite::write_map_len(out, 2).map_err(vec_write)?;
    super::packwrite::write_str(out, "t").map_err(vec_write)?;
    super::packwrite::write_str(out, "batch").map_err(vec_write)?;
    super::packwrite::write_str(out, "f").map_err(vec_write)?;
    super::packwrite::write_array_len(out, len).map_err(vec_write)?;
    for (i, m) in msgs.iter().enumerate() {
        write_pack_msg(m, out, form(i))?;
    }
    Ok(())
}

/// A `pub` envelope whose payload is deflated (section 2.2): `bytes`, of
/// the payload's `len` bytes, in `zj`, `zm` or `zb`.
#[cfg(any(feature = "server", test))]
pub(super) fn write_deflated_entry(
    e: &StreamEntry,
    bytes: &[u8],
    codec: Codec,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let len = Some(e.payload.len() as u64);
    match codec {
        Codec::Json => {
            let mut env = JsonEnvelope {
                t: "pub".into(),
                seq: Some(e.offset),
                ts: e.ts,
                op: e.kind.op().map(Cow::Borrowed),
                r: Some(Cow::Borrowed(&e.room)),
                z: len,
                ..JsonEnvelope::default()
            };
            let text = Some(Cow::Owned(crate::base64::encode(bytes)));
            match e.payload.kind {
                PayloadKind::Json => env.zj = text,
                PayloadKind::MsgPack => env.zm = text,
                PayloadKind::Binary => env.zb = text,
            }
            write_json_envelope(&env, out);
        }
        Codec::MsgPack => {
            let mut env = PackEnvelope {
                t: "pub".into(),
                seq: Some(e.offset),
                ts: e.ts,
                op: e.kind.op().map(Cow::Borrowed),
                r: Some(Cow::Borrowed(&e.room)),
                z: len,
                ..PackEnvelope::default()
            };
            let bin = Some(serde_bytes::Bytes::new(bytes));
            match e.payload.kind {
                PayloadKind::Json => env.zj = bin,
                PayloadKind::MsgPack => env.zm = bin,
                PayloadKind::Binary => env.zb = bin,
            }
            write_pack_envelope(&env, out)?;
        }
    }
    Ok(())
}

/// The envelope key of a deflated payload of `kind`, in the envelope.
pub(super) fn deflated_key(kind: PayloadKind) -> &'static str {
    match kind {
        PayloadKind::Json => "zj",
        PayloadKind::MsgPack => "zm",
        PayloadKind::Binary => "zb",
    }
}

/// The compressed payload an envelope carries in `zj`, `zm` or `zb`, if
/// any, with its kind and field, its compression fields checked against
/// the payload's other forms (PROTOCOL.md, section 2.2). `Ok(None)` for
/// an uncompressed payload, or a detached one the decoder inflates when
/// it arrives.
pub(super) fn deflated_of<X>(
    z: Option<u64>,
    [zj, zm, zb]: [Option<X>; 3],
    embedded: bool,
    detached: bool,
    zip: Inflation,
) -> Result<Option<Deflated<X>>, DecodeError> {
    let form = match (zj, zm, zb) {
        (None, None, None) => None,
        (Some(x), None, None) => Some((PayloadKind::Json, "zj", x)),
        (None, Some(x), None) => Some((PayloadKind::MsgPack, "zm", x)),
        (None, None, Some(x)) => Some((PayloadKind::Binary, "zb", x)),
        _ => return Err(two_payloads()),
    };
    if z.is_none() && form.is_none() {
        return Ok(None);
    }
    if !zip.agreed {
        return Err(NOT_AGREED);
    }
    let Some(z) = z else {
        return Err(DecodeError::Compression {
            reason: "a compressed payload without `z`, its inflated length",
        });
    };
    // Refused before anything is read or inflated.
    if usize::try_from(z).map_or(true, |z| z > zip.max) {
        return Err(DecodeError::TooLarge {
            size: usize::try_from(z).unwrap_or(usize::MAX),
            max: zip.max,
        });
    }
    match form {
        Some(_) if embedded || detached => Err(two_payloads()),
        Some((kind, field, x)) => Ok(Some(Deflated {
            kind,
            field,
            bytes: x,
            len: z,
        })),
        None if detached => Ok(None),
        None => Err(DecodeError::Compression {
            reason: "`z` on a message without a compressed payload",
        }),
    }
}

/// A compressed payload in an envelope: what it inflates to, from which
/// field, its compressed bytes (`X`: as the codec carries them) and its
/// announced length.
pub(super) struct Deflated<X> {
    pub(super) kind: PayloadKind,
    pub(super) field: &'static str,
    pub(super) bytes: X,
    pub(super) len: u64,
}

fn two_payloads() -> DecodeError {
    DecodeError::InvalidField {
        field: "zj",
        reason: "a message carries exactly one payload",
    }
}

/// The payload a deflated payload inflates to, a JSON one checked as
/// one embedded would be.
pub(super) fn inflated(d: Deflated<&[u8]>, zip: Inflation) -> Result<Payload, DecodeError> {
    let data = zip.inflate(d.bytes, d.len)?;
    if d.kind == PayloadKind::Json {
        check_json_depth(&data, d.field)?;
        json_value(&data).map_err(|_| DecodeError::InvalidField {
            field: d.field,
            reason: "not a JSON value",
        })?;
    }
    Ok(Payload {
        kind: d.kind,
        data: data.into(),
    })
}
