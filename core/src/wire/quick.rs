//! The hand-written MessagePack envelope reader, and its check against serde.
//!
//! Owns the fast path of every binary message: reading the envelope the way
//! every Kitestring peer writes it, without serde. It must never accept
//! anything serde would read differently: on anything unusual it gives up
//! and serde reads the body (feature `msgpack-serde`, on by default; without
//! it, as in the browser package, the message is refused); the fuzz targets
//! check that the two agree on every input.

use std::borrow::Cow;

#[cfg(any(test, feature = "msgpack-serde"))]
use serde::Deserialize;

use super::envelope::PackEnvelope;
use super::MAX_BATCH;
#[cfg(any(test, feature = "msgpack-serde"))]
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
/// accepts, and its errors (rmp-serde is a dev-dependency: the tests
/// have it whatever the features).
#[cfg(any(test, feature = "msgpack-serde"))]
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
/// unsigned integers, booleans, strings and `bin` values, a batch's `f` an
/// array of at most [`MAX_BATCH`] such maps (none with an `f` of its own),
/// and nothing after the map. `None` as soon as anything else turns up
/// (another key, a nil or negative number, a nested batch, a duplicate,
/// trailing bytes), with `env` partly filled: serde then reads the body
/// and decides (or, without the `msgpack-serde` feature, the message is
/// refused). What this accepts, serde reads to the same envelope; the
/// fuzz targets check that on every input.
#[inline]
pub(super) fn quick_pack_envelope<'a>(body: &'a [u8], env: &mut PackEnvelope<'a>) -> Option<()> {
    let mut rd = body;
    quick_map(&mut rd, env, false)?;
    rd.is_empty().then_some(())
}

/// Reads one envelope map from the front of `rd`; `nested`: inside a
/// batch, where another batch is refused.
fn quick_map<'a>(rd: &mut &'a [u8], env: &mut PackEnvelope<'a>, nested: bool) -> Option<()> {
    use rmp::decode::{
        read_array_len, read_bin_len, read_bool, read_int, read_map_len, read_str_len,
    };
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
    let fields = read_map_len(rd).ok()?;
    let mut has_type = false;
    for _ in 0..fields {
        match key(rd)? {
            b"t" if !has_type => {
                env.t = str(rd)?;
                has_type = true;
            }
            b"seq" => once!(env.seq, uint(rd)?),
            b"id" => once!(env.id, uint(rd)?),
            b"ack" => once!(env.ack, uint(rd)?),
            b"ts" => once!(env.ts, uint(rd)?),
            b"j" => once!(env.j, str(rd)?),
            b"m" => once!(env.m, bin(rd)?),
            b"b" => once!(env.b, bin(rd)?),
            b"nonce" => once!(env.nonce, uint(rd)?),
            b"from" => once!(env.from, uint(rd)?),
            b"code" => once!(env.code, read_int(rd).ok()?),
            b"retry" => once!(env.retry, uint(rd)?),
            b"r" => once!(env.r, str(rd)?),
            b"op" => once!(env.op, str(rd)?),
            b"rq" => once!(env.rq, read_bool(rd).ok()?),
            b"rs" => once!(env.rs, uint(rd)?),
            b"within" => once!(env.within, uint(rd)?),
            b"token" => once!(env.token, str(rd)?),
            b"f" if !nested && env.f.is_none() => {
                let len = usize::try_from(read_array_len(rd).ok()?).ok()?;
                if len > MAX_BATCH {
                    return None;
                }
                // Grown as the envelopes arrive: a declared length is not
                // trusted with memory.
                let mut inner = Vec::with_capacity(len.min(4));
                for _ in 0..len {
                    let mut one = PackEnvelope::default();
                    quick_map(rd, &mut one, true)?;
                    inner.push(one);
                }
                env.f = Some(inner);
            }
            b"dj" => once!(env.dj, uint(rd)?),
            b"dm" => once!(env.dm, uint(rd)?),
            b"db" => once!(env.db, uint(rd)?),
            b"e" => once!(env.e, uint(rd)?),
            b"k" => once!(env.k, str(rd)?),
            b"n" => once!(env.n, str(rd)?),
            b"hl" => once!(env.hl, uint(rd)?),
            b"hn" => once!(env.hn, uint(rd)?),
            #[cfg(feature = "compression")]
            b"z" => once!(env.z, uint(rd)?),
            #[cfg(feature = "compression")]
            b"zj" => once!(env.zj, bin(rd)?),
            #[cfg(feature = "compression")]
            b"zm" => once!(env.zm, bin(rd)?),
            #[cfg(feature = "compression")]
            b"zb" => once!(env.zb, bin(rd)?),
            _ => return None,
        }
    }
    has_type.then_some(())
}
