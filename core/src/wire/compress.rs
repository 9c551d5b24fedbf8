//! Per-message compression: raw deflate (RFC 1951) of payloads and
//! datagrams, between peers that agreed on it in the handshake
//! (PROTOCOL.md, section 2.2).
//!
//! Owns the capability's name ([`CAP_DEFLATE`]), a sender's settings
//! ([`CompressionConfig`]: the threshold below which nothing is
//! compressed, and the level), the compressor a machine's encoder keeps
//! (`Deflater`, which gives up as soon as its output would not be smaller
//! than the input) and the one inflation every compressed payload goes
//! through on receipt (`inflate`). The codec is miniz_oxide's, behind the
//! `compression` feature; without it nothing is compressed, and a
//! compressed payload is refused like any other on a connection that did
//! not agree on it.
//!
//! It never decides whether a connection compresses (the handshake does)
//! or which form an envelope takes (the `encode` module does), and it never
//! inflates past the length the sender announced, itself checked against
//! the receiver's size limit before a byte is inflated: a decompression
//! bomb costs its receiver at most its maximum message size.

#[cfg(feature = "compression")]
use super::DecodeError;

/// Capability (client `caps`) and feature (server `features`): the peer
/// can inflate raw deflate payloads and datagrams. A client that announces
/// it offers compression; a server that agrees announces it back, and from
/// then on both directions of the connection may compress (PROTOCOL.md,
/// section 2.2).
pub const CAP_DEFLATE: &str = "deflate";

/// Binary header kind: a datagram compressed with raw deflate follows (only
/// between peers that agreed on [`CAP_DEFLATE`]): its inflated length, u32
/// little-endian, then the deflate stream.
pub const KIND_DEFLATE_RAW: u8 = 0x03;

/// Whether this build can compress and inflate (the `compression`
/// feature). A build without it never announces or agrees to
/// [`CAP_DEFLATE`].
pub const COMPRESSION_BUILT: bool = cfg!(feature = "compression");

/// A sender's compression settings ([`ClientConfig::compression`],
/// [`ServerConfig::compression`]). What a connection compresses is decided
/// in the handshake; these say what is worth compressing once it does.
///
/// [`ClientConfig::compression`]: crate::config::ClientConfig::compression
/// [`ServerConfig::compression`]: crate::config::ServerConfig::compression
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressionConfig {
    /// Payloads (and datagrams) shorter than this many bytes go as they
    /// are. Default 1 024: below it deflate saves a few dozen bytes for
    /// the same fixed cost (BENCHMARKS.md, "Compression").
    pub threshold: usize,
    /// The deflate level, 1 (fastest) to 9 (smallest). Default 1: on JSON
    /// it saves most of what 6 saves, at a fraction of the time for large
    /// payloads (BENCHMARKS.md, "Compression").
    pub level: u8,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            threshold: 1024,
            level: 1,
        }
    }
}

/// Bytes of the inflated length in front of a compressed datagram.
#[cfg(feature = "compression")]
pub(super) const RAW_LEN_PREFIX: usize = 4;

/// The compressor a machine's encoder keeps, made on first use: its tables
/// (about 300 KB) are reused by every message after.
#[cfg(feature = "compression")]
pub(super) struct Deflater(Box<miniz_oxide::deflate::core::CompressorOxide>);

#[cfg(feature = "compression")]
impl Deflater {
    pub(super) fn new() -> Deflater {
        Deflater(Box::default())
    }

    /// Appends `data` compressed at `level` to `out`, if that takes at most
    /// `budget` bytes, and says whether it did; `out` is left as it was
    /// when it did not. The compressor stops as soon as the budget is
    /// spent, so an incompressible payload costs little more than reading it.
    pub(super) fn compress(
        &mut self,
        data: &[u8],
        level: u8,
        budget: usize,
        out: &mut Vec<u8>,
    ) -> bool {
        use miniz_oxide::deflate::core::{compress, TDEFLFlush, TDEFLStatus};
        let start = out.len();
        let c = &mut *self.0;
        c.reset();
        c.set_format_and_level(miniz_oxide::DataFormat::Raw, level.clamp(1, 9));
        out.resize(start + budget, 0);
        let (status, read, written) = compress(c, data, &mut out[start..], TDEFLFlush::Finish);
        if status == TDEFLStatus::Done && read == data.len() {
            out.truncate(start + written);
            true
        } else {
            out.truncate(start);
            false
        }
    }
}

#[cfg(feature = "compression")]
impl core::fmt::Debug for Deflater {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Deflater")
    }
}

/// Inflates `data`, which must be exactly one raw deflate stream of exactly
/// `len` bytes inflated. `len` was checked against the receiver's limit by
/// the caller; nothing is ever inflated past it.
#[cfg(feature = "compression")]
pub(super) fn inflate(data: &[u8], len: usize) -> Result<Vec<u8>, DecodeError> {
    use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
    use miniz_oxide::inflate::TINFLStatus;
    let mut out = vec![0u8; len];
    let mut state = Box::<DecompressorOxide>::default();
    let (status, read, written) = decompress(
        &mut state,
        data,
        &mut out,
        0,
        inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
    );
    let reason = match status {
        TINFLStatus::Done if written != len => "inflates to fewer bytes than `z` announced",
        TINFLStatus::Done if read != data.len() => "bytes after the end of the deflate stream",
        TINFLStatus::Done => return Ok(out),
        TINFLStatus::HasMoreOutput => "inflates to more bytes than `z` announced",
        _ => "not a complete raw deflate stream",
    };
    Err(DecodeError::Compression { reason })
}

/// A compressed payload on a connection that did not agree on compression.
#[cfg(feature = "compression")]
pub(super) const NOT_AGREED: DecodeError = DecodeError::Compression {
    reason: "compression was not agreed on this connection",
};

/// What a receiver allows of compressed payloads: whether its connection
/// agreed on compression, and the most bytes one may inflate to. (Without
/// the `compression` feature: nothing, and no bytes.)
#[derive(Clone, Copy, Debug)]
pub(super) struct Inflation {
    #[cfg(feature = "compression")]
    pub(super) agreed: bool,
    #[cfg(feature = "compression")]
    pub(super) max: usize,
}

impl Inflation {
    /// A connection that did not agree on compression.
    pub(super) const OFF: Inflation = Inflation::new(false, 0);

    /// What a connection that did or did not agree on compression, with
    /// this size limit, takes.
    pub(super) const fn new(agreed: bool, max: usize) -> Inflation {
        #[cfg(not(feature = "compression"))]
        let _ = (agreed, max);
        Inflation {
            #[cfg(feature = "compression")]
            agreed,
            #[cfg(feature = "compression")]
            max,
        }
    }

    /// Inflates a compressed payload of `data` announced to inflate to
    /// `len` bytes (the envelope's `z`): refused unless compression was
    /// agreed, and as too large (1009) before any inflating when `len` is
    /// over the limit.
    #[cfg(feature = "compression")]
    pub(super) fn inflate(self, data: &[u8], len: u64) -> Result<Vec<u8>, DecodeError> {
        if !self.agreed {
            return Err(NOT_AGREED);
        }
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > self.max {
            return Err(DecodeError::TooLarge {
                size: len,
                max: self.max,
            });
        }
        inflate(data, len)
    }
}

#[cfg(all(test, feature = "compression"))]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const ON: Inflation = Inflation {
        agreed: true,
        max: 1 << 20,
    };

    fn json(n: usize) -> Vec<u8> {
        let mut s = String::from("[");
        let mut i = 0;
        while s.len() < n {
            s.push_str(&format!(
                r#"{{"id":{i},"user":"u{}","text":"hello"}},"#,
                i % 7
            ));
            i += 1;
        }
        s.pop();
        s.push(']');
        s.into_bytes()
    }

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        assert!(Deflater::new().compress(data, 6, data.len(), &mut out));
        out
    }

    #[test]
    fn a_payload_comes_back_as_it_was_and_json_shrinks() {
        let mut d = Deflater::new();
        for n in [0, 1, 100, 1024, 16 * 1024, 300 * 1024] {
            let data = json(n);
            for level in [1, 6, 9] {
                let mut out = vec![0xEE];
                assert!(d.compress(&data, level, data.len() + 16, &mut out), "{n}");
                assert_eq!(out[0], 0xEE, "appended, not overwritten");
                if n >= 1024 {
                    assert!(out.len() * 2 < data.len(), "{n} at {level}: {}", out.len());
                }
                let back = ON.inflate(&out[1..], data.len() as u64).unwrap();
                assert_eq!(back, data);
            }
        }
    }

    #[test]
    fn what_does_not_fit_the_budget_is_left_alone() {
        // Incompressible bytes: nothing shrinks them.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut out = vec![1, 2, 3];
        assert!(!Deflater::new().compress(&noise, 6, noise.len() - 1, &mut out));
        assert_eq!(out, [1, 2, 3]);
        // Compressible, but over a tight budget.
        let data = json(4096);
        assert!(!Deflater::new().compress(&data, 6, 10, &mut out));
        assert_eq!(out, [1, 2, 3]);
    }

    #[test]
    fn a_bomb_inflates_no_further_than_announced_and_the_limit() {
        // 8 MiB of zeros in a few KiB.
        let zeros = vec![0u8; 8 << 20];
        let bomb = deflate(&zeros);
        assert!(bomb.len() < 16 * 1024, "{}", bomb.len());
        // Announced honestly: over the limit, refused before inflating.
        assert_eq!(
            ON.inflate(&bomb, zeros.len() as u64),
            Err(DecodeError::TooLarge {
                size: 8 << 20,
                max: 1 << 20
            })
        );
        assert!(matches!(
            ON.inflate(&bomb, u64::MAX),
            Err(DecodeError::TooLarge { .. })
        ));
        // Announced small: inflating stops at the announced length.
        assert_eq!(
            ON.inflate(&bomb, 1000),
            Err(DecodeError::Compression {
                reason: "inflates to more bytes than `z` announced"
            })
        );
    }

    #[test]
    fn corrupt_or_mislabelled_streams_are_typed_errors() {
        let data = json(2000);
        let good = deflate(&data);
        let n = data.len() as u64;
        let reason = |r: Result<Vec<u8>, DecodeError>| match r {
            Err(DecodeError::Compression { reason }) => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            reason(ON.inflate(&good, n + 1)),
            "inflates to fewer bytes than `z` announced"
        );
        assert_eq!(
            reason(ON.inflate(&good, n - 1)),
            "inflates to more bytes than `z` announced"
        );
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(
            reason(ON.inflate(&trailing, n)),
            "bytes after the end of the deflate stream"
        );
        assert_eq!(
            reason(ON.inflate(&good[..good.len() / 2], n)),
            "not a complete raw deflate stream"
        );
        // A zlib stream (RFC 1950) is not a raw one.
        let zlib = miniz_oxide::deflate::compress_to_vec_zlib(&data, 6);
        assert!(ON.inflate(&zlib, n).is_err());
        // Reserved block type 3.
        assert!(ON.inflate(&[0x07, 0, 0, 0], 4).is_err());
        assert!(ON.inflate(&[], 0).is_err());
        // Corruption anywhere: an error or other bytes, never a panic.
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x5A;
            if let Ok(back) = ON.inflate(&bad, n) {
                assert_eq!(back.len(), data.len());
            }
        }
        // Not agreed: refused whatever the bytes.
        assert_eq!(Inflation::OFF.inflate(&good, n), Err(NOT_AGREED));
    }
}
