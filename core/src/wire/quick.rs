//! The hand-written MessagePack envelope reader, and its check against serde.
//!
//! Owns the fast path of every binary message: reading the envelope the way
//! every Kitestring peer writes it, without serde. It must never accept
//! anything serde would read differently: on anything unusual it gives up
//! and serde reads the body; the fuzz targets check that the two agree on
//! every input.

use std::borrow::Cow;

use serde::Deserialize;

use super::envelope::PackEnvelope;
use super::{DecodeError, MAX_MSGPACK_DEPTH};
#[cfg(any(test, feature = "fuzzing"))]
use super::{BINARY_HEADER_LEN, KIND_MSGPACK};

/// Panics if the quick reader accepts the envelope of `msg`, a binary
/// message, and serde reads it differently or refuses it. Returns whether
/// the quick reader took it.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn assert_quick_envelope_agrees(msg: &[u8]) -> bool {
    let Some(body) = msg
        .get(BINARY_HEADER_LEN..)
        .filter(|_| msg[0] == KIND_MSGPACK)
    else {
        return false;
    };
    let mut quick = PackEnvelope::default();
    if quick_pack_envelope(body, &mut quick).is_none() {
        return false;
    }
    let by_serde = serde_pack_envelope(body)
        .unwrap_or_else(|e| panic!("the quick reader took an envelope serde refuses: {e}"));
    // Equal envelopes serialize to the same bytes, and different ones not.
    let bytes = |env: &PackEnvelope<'_>| rmp_serde::to_vec_named(env).ok();
    assert_eq!(
        bytes(&quick),
        bytes(&by_serde),
        "the quick reader and serde read different envelopes"
    );
    true
}

/// The envelope at the start of `body`, read by serde: any form rmp-serde
/// accepts, and its errors.
pub(super) fn serde_pack_envelope(body: &[u8]) -> Result<PackEnvelope<'_>, DecodeError> {
    // The header's length frames the body; the envelope is the one map at its
    // start (rmp-serde's borrowing reader cannot report where the map ended).
    let mut de = rmp_serde::Deserializer::from_read_ref(body);
    de.set_max_depth(MAX_MSGPACK_DEPTH);
    PackEnvelope::deserialize(&mut de).map_err(|e| DecodeError::MsgPack {
        message: e.to_string(),
    })
}

/// Reads the envelope the way every Kitestring peer writes it, without
/// serde: one map, string keys naming envelope fields, each once, with
/// unsigned integers, booleans, strings and `bin` values, and nothing after
/// the map. `None` as soon as anything else turns up (another key, a nil
/// or negative number, a batch, a duplicate, trailing bytes), with `env`
/// partly filled: serde then reads the body and decides. What this
/// accepts, serde reads to the same envelope; the fuzz targets check that
/// on every input.
#[inline]
pub(super) fn quick_pack_envelope<'a>(body: &'a [u8], env: &mut PackEnvelope<'a>) -> Option<()> {
    use rmp::decode::{read_bin_len, read_bool, read_int, read_map_len, read_str_len};
    #[inline]
    fn take<'a>(rd: &mut &'a [u8], len: u32) -> Option<&'a [u8]> {
        let (b, rest) = rd.split_at_checked(usize::try_from(len).ok()?)?;
        *rd = rest;
        Some(b)
    }
    // Keys are compared as bytes: only ASCII field names are taken, so they
    // need no UTF-8 check.
    #[inline]
    fn key<'a>(rd: &mut &'a [u8]) -> Option<&'a [u8]> {
        let len = read_str_len(rd).ok()?;
        take(rd, len)
    }
    #[inline]
    fn str<'a>(rd: &mut &'a [u8]) -> Option<Cow<'a, str>> {
        let len = read_str_len(rd).ok()?;
        std::str::from_utf8(take(rd, len)?).ok().map(Cow::Borrowed)
    }
    #[inline]
    fn bin<'a>(rd: &mut &'a [u8]) -> Option<&'a serde_bytes::Bytes> {
        let len = read_bin_len(rd).ok()?;
        take(rd, len).map(serde_bytes::Bytes::new)
    }
    #[inline]
    fn uint(rd: &mut &[u8]) -> Option<u64> {
        read_int(rd).ok()
    }
    // Each field once: serde refuses a duplicate.
    macro_rules! once {
        ($field:expr, $value:expr) => {{
            if $field.is_some() {
                return None;
            }
            $field = Some($value);
        }};
    }
    let mut rd = body;
    let fields = read_map_len(&mut rd).ok()?;
    let mut has_type = false;
    for _ in 0..fields {
        match key(&mut rd)? {
            b"t" if !has_type => {
                env.t = str(&mut rd)?;
                has_type = true;
            }
            b"seq" => once!(env.seq, uint(&mut rd)?),
            b"id" => once!(env.id, uint(&mut rd)?),
            b"ack" => once!(env.ack, uint(&mut rd)?),
            b"ts" => once!(env.ts, uint(&mut rd)?),
            b"j" => once!(env.j, str(&mut rd)?),
            b"m" => once!(env.m, bin(&mut rd)?),
            b"b" => once!(env.b, bin(&mut rd)?),
            b"nonce" => once!(env.nonce, uint(&mut rd)?),
            b"from" => once!(env.from, uint(&mut rd)?),
            b"code" => once!(env.code, read_int(&mut rd).ok()?),
            b"retry" => once!(env.retry, uint(&mut rd)?),
            b"r" => once!(env.r, str(&mut rd)?),
            b"op" => once!(env.op, str(&mut rd)?),
            b"rq" => once!(env.rq, read_bool(&mut rd).ok()?),
            b"rs" => once!(env.rs, uint(&mut rd)?),
            b"within" => once!(env.within, uint(&mut rd)?),
            b"token" => once!(env.token, str(&mut rd)?),
            b"dj" => once!(env.dj, uint(&mut rd)?),
            b"dm" => once!(env.dm, uint(&mut rd)?),
            b"db" => once!(env.db, uint(&mut rd)?),
            _ => return None,
        }
    }
    (has_type && rd.is_empty()).then_some(())
}
