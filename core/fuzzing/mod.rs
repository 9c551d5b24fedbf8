//! Bodies of the fuzz targets that exercise this crate on its own.
//!
//! Compiled only with the `fuzzing` feature, so that ordinary builds and
//! `cargo test --features fuzzing` keep them compiling and their regression
//! tests running; the files in `fuzz/fuzz_targets/` only forward to the
//! functions here. Every target asserts: a panic here is a finding. Inputs
//! are `(setup, Vec<op>)` values built with [`arbitrary`], and the checks
//! run after every op.
//!
//! This module never changes the machines' behaviour: it drives them through
//! their public API only, as a driver would.
//!
//! It lives beside the crate's sources, in `core/fuzzing/`, one file per
//! family of targets:
//!
//! - `decode.rs`: `decode_json`, `decode_msgpack`, `decode_binary_header`,
//!   `pack_envelope` and `records` (the HTTP fallback's bodies);
//! - `compress.rs`: `inflate`;
//! - `frame.rs`: `frame_roundtrip`;
//! - `handshake.rs`: `handshake`;
//! - `handover.rs`: `session_image`;
//! - `client.rs`: `client_machine`;
//! - `server.rs`: `server_machine`, with `feeds.rs`, the reference for
//!   room feeds;
//! - `stream.rs` and `stream/`: `server_stream`;
//! - `lww.rs`: `lww_merge`;
//! - `seeds.rs`: the seeds of the decode targets' corpora;
//! - `tests.rs`: the regression tests.
//!
//! This file holds what several of them share (the decode limits and
//! [`AllocProbe`], the pieces of the machine targets' inputs, helpers) and
//! re-exports every public item, so that each one is
//! `kitestring_core::fuzzing::Item` whatever file it lives in. It never holds
//! a target of its own.

mod client;
mod compress;
mod decode;
mod feeds;
mod frame;
mod handover;
mod handshake;
mod lww;
mod seeds;
mod server;
mod stream;
#[cfg(test)]
mod tests;

pub use client::{
    client_machine, ClientHarness, ClientOp, ClientSetup, ErrChoice, ServerFrame, Tr,
    KNOWN_REJECT_CODE_ECHO,
};
pub use compress::{inflate, ArbCompressed, INFLATE_MAX};
pub use decode::{
    assert_round_trip, check_decode, decode_binary_header, decode_json, decode_msgpack,
    pack_envelope, records, ArbEnvelope, ArbKey, ArbValue, OtherKey, Width,
};
pub use feeds::FeedModel;
pub use frame::{
    frame_roundtrip, ArbFrame, ArbJson, ArbPayload, KNOWN_JSON_NULL_PAYLOAD,
    KNOWN_JSON_PAYLOAD_WHITESPACE,
};
pub use handover::session_image;
pub use handshake::handshake;
pub use lww::{lww_merge, ArbUpdate, Schedule};
pub use seeds::seed_messages;
pub use server::{server_machine, ClientFrame, ServerHarness, ServerOp, ServerSetup};
pub use stream::{
    server_stream, BadHello, DropKind, Poison, StreamHarness, StreamOp, StreamSetup, WrongDelivered,
};

use arbitrary::Arbitrary;

use crate::close::CloseCode;
use crate::wire::{
    self, Codec, DecodeError, Frame, Incoming, Limits, Payload, Transmit, PROTOCOL_VERSION,
};

// ---------------------------------------------------------------------------
// Decoding limits
// ---------------------------------------------------------------------------

/// The message size limit the decode targets configure. Inputs longer than
/// this must be refused with [`DecodeError::TooLarge`] before any parsing.
pub const FUZZ_MAX_MESSAGE: usize = 2048;

/// Heap the decoder may use per input byte, beyond [`ALLOC_SLACK`]. Parsing
/// builds owned strings, lists of tokens (24 bytes for each entry of at
/// least 3 input bytes, doubled by vector growth) and payload copies, so a
/// small constant factor is expected; anything more would mean an attacker
/// can make the decoder allocate out of proportion to what it sent.
pub const ALLOC_PER_BYTE: usize = 24;

/// Heap the decoder may use whatever the input (error messages and the like).
pub const ALLOC_SLACK: usize = 8 * 1024;

/// Measures heap use around a call. The fuzz crate implements it with a
/// counting global allocator; [`NoProbe`] measures nothing.
pub trait AllocProbe {
    /// Starts a measurement: the peak is reset to the current use.
    fn reset(&self);
    /// The largest number of bytes allocated at once since [`reset`](Self::reset),
    /// above what was allocated at the time of the reset.
    fn peak(&self) -> usize;
}

/// An [`AllocProbe`] that measures nothing (for unit tests).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProbe;

impl AllocProbe for NoProbe {
    fn reset(&self) {}
    fn peak(&self) -> usize {
        0
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A handshake header's value (`hello` or its answer), which must be
/// printable ASCII, decoded.
fn header_frame(value: &str) -> Result<Frame, DecodeError> {
    assert!(
        value.bytes().all(|b| (0x20..0x7f).contains(&b)),
        "a handshake header is not printable ASCII: {value}"
    );
    wire::decode(Incoming::Text(value), &limits())
}

fn limits() -> Limits {
    Limits {
        max_message: FUZZ_MAX_MESSAGE,
        version: PROTOCOL_VERSION,
    }
}

fn codec_of(msgpack: bool) -> Codec {
    if msgpack {
        Codec::MsgPack
    } else {
        Codec::Json
    }
}

/// Decodes what a machine sent: it must always decode, except for the
/// known `null` payload bug ([`KNOWN_JSON_NULL_PAYLOAD`]), where the frame
/// is read with a `0` payload instead so its numbers still count.
fn decode_own(t: &Transmit, who: &str) -> Option<Frame> {
    let open = Limits {
        max_message: usize::MAX,
        version: PROTOCOL_VERSION,
    };
    match wire::decode(t.as_incoming(), &open) {
        Ok(f) => Some(f),
        Err(DecodeError::MissingField { field: "j", .. })
            if KNOWN_JSON_NULL_PAYLOAD
                && matches!(t, Transmit::Text(b) if b.ends_with(br#""j":null}"#)) =>
        {
            let text = std::str::from_utf8(t.data()).ok()?;
            let patched = format!("{}0}}", text.strip_suffix("null}")?);
            wire::decode(Incoming::Text(&patched), &open).ok()
        }
        Err(e) => panic!("the {who} sent an undecodable {t:?}: {e}"),
    }
}

// ---------------------------------------------------------------------------
// Pieces of the client and server machine targets
// ---------------------------------------------------------------------------

/// A number relative to what the machine has seen, so that sequence
/// numbers and acks land near the interesting values.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Num {
    /// `base + 1 + d` (the next one when `d` is 0).
    Next(i8),
    /// Exactly `base`.
    Base,
    /// Any value.
    Any(u64),
}

impl Num {
    fn resolve(self, base: u64) -> u64 {
        match self {
            Num::Next(d) => {
                let d = i64::from(d);
                let v = i128::from(base) + 1 + i128::from(d);
                u64::try_from(v.max(0)).unwrap_or(u64::MAX)
            }
            Num::Base => base,
            Num::Any(v) => v,
        }
    }
}

/// A close code, biased to the ones with meaning.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Code {
    /// 1000.
    Normal,
    /// 1001.
    GoingAway,
    /// 1006.
    Abnormal,
    /// 1008.
    Policy,
    /// 1013.
    TryLater,
    /// 4000.
    Retry,
    /// 4001.
    UnsupportedVersion,
    /// 4003.
    UnsupportedCodec,
    /// 4011.
    Rotate,
    /// 4401.
    Unauthorized,
    /// 4403.
    Forbidden,
    /// Anything.
    Other(u16),
}

impl Code {
    /// The code.
    pub fn code(self) -> CloseCode {
        match self {
            Code::Normal => CloseCode::NORMAL,
            Code::GoingAway => CloseCode::GOING_AWAY,
            Code::Abnormal => CloseCode::ABNORMAL,
            Code::Policy => CloseCode::POLICY_VIOLATION,
            Code::TryLater => CloseCode::TRY_AGAIN_LATER,
            Code::Retry => CloseCode::RETRY,
            Code::UnsupportedVersion => CloseCode::UNSUPPORTED_VERSION,
            Code::UnsupportedCodec => CloseCode::UNSUPPORTED_CODEC,
            Code::Rotate => CloseCode::ROTATE,
            Code::Unauthorized => CloseCode::UNAUTHORIZED,
            Code::Forbidden => CloseCode::FORBIDDEN,
            Code::Other(c) => CloseCode(c),
        }
    }
}

/// A payload the fuzzer picks for a send.
#[derive(Arbitrary, Clone, Debug)]
pub enum PayloadChoice {
    /// `size` opaque bytes.
    Binary(u16),
    /// A JSON string of about `size` bytes.
    JsonString(u16),
    /// One of a few JSON literals (`null`, `0`, `{}`, ` 1 `, ...).
    JsonLiteral(u8),
    /// Any payload.
    Any(ArbPayload),
}

const JSON_LITERALS: &[&str] = &[
    "null",
    "0",
    "true",
    "false",
    "{}",
    "[]",
    "\"s\"",
    " 1 ",
    "[null]",
    "{\"a\":null}",
    "-0",
    "1e3",
];

impl PayloadChoice {
    /// The payload, if the choice makes a valid one.
    pub fn payload(&self) -> Option<Payload> {
        match self {
            PayloadChoice::Binary(n) => Some(Payload::binary(vec![0xa5; usize::from(*n)])),
            PayloadChoice::JsonString(n) => {
                let s = format!("\"{}\"", "x".repeat(usize::from(*n)));
                Payload::json(s.into_bytes()).ok()
            }
            PayloadChoice::JsonLiteral(i) => {
                let lit = JSON_LITERALS[usize::from(*i) % JSON_LITERALS.len()];
                Payload::json(lit.as_bytes().to_vec()).ok()
            }
            PayloadChoice::Any(p) => p.to_payload(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Outstanding,
    Acked,
    Lost,
    Failed,
}
