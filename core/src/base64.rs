//! Base64 for the JSON forms of binary payloads: RFC 4648's standard
//! alphabet, with padding.
//!
//! Owns the encoding of MessagePack and opaque payloads in JSON envelopes
//! (`m`, `b`) and in saved messages, and their decoding, which takes
//! exactly what the `base64` crate's `STANDARD` engine takes: canonical
//! padding, and no bits set after the last byte (the tests and the
//! `decode_json` fuzz target check the two agree). Written here because
//! the crate's general engine weighs about 7 KB in the browser package
//! against 1 KB for these two loops. It never allocates more than the
//! output it returns.

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Appends the base64 text of `data` to `out`.
pub(crate) fn encode_into(out: &mut Vec<u8>, data: &[u8]) {
    out.reserve(data.len().div_ceil(3) * 4);
    let symbol = |v: u32, shift: u32| ALPHABET[((v >> shift) & 63) as usize];
    let mut chunks = data.chunks_exact(3);
    for c in chunks.by_ref() {
        let v = u32::from(c[0]) << 16 | u32::from(c[1]) << 8 | u32::from(c[2]);
        out.extend_from_slice(&[symbol(v, 18), symbol(v, 12), symbol(v, 6), symbol(v, 0)]);
    }
    match *chunks.remainder() {
        [a] => {
            let v = u32::from(a) << 16;
            out.extend_from_slice(&[symbol(v, 18), symbol(v, 12), b'=', b'=']);
        }
        [a, b] => {
            let v = u32::from(a) << 16 | u32::from(b) << 8;
            out.extend_from_slice(&[symbol(v, 18), symbol(v, 12), symbol(v, 6), b'=']);
        }
        _ => {}
    }
}

/// The base64 text of `data`.
pub(crate) fn encode(data: &[u8]) -> String {
    let mut out = Vec::new();
    encode_into(&mut out, data);
    // Only ASCII was written.
    String::from_utf8(out).unwrap_or_default()
}

/// The bytes of base64 `text`, or `None` unless it is canonical: a
/// multiple of four symbols, `=` only as the padding of the last group,
/// and the bits after the last byte zero.
pub(crate) fn decode(text: &[u8]) -> Option<Vec<u8>> {
    fn value(s: u8) -> Option<u32> {
        Some(u32::from(match s {
            b'A'..=b'Z' => s - b'A',
            b'a'..=b'z' => s - b'a' + 26,
            b'0'..=b'9' => s - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    }
    if text.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let groups = text.len() / 4;
    for (i, g) in text.chunks_exact(4).enumerate() {
        let last = i + 1 == groups;
        let pad = match g {
            [_, _, b'=', b'='] if last => 2,
            [_, _, _, b'='] if last => 1,
            _ => 0,
        };
        let mut v = 0u32;
        for &s in &g[..4 - pad] {
            v = v << 6 | value(s)?;
        }
        v <<= 6 * pad as u32;
        let bytes = [(v >> 16) as u8, (v >> 8) as u8, v as u8];
        // The bits after the last byte must be zero.
        if pad > 0 && bytes[3 - pad] != 0 {
            return None;
        }
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn crate_decode(text: &[u8]) -> Option<Vec<u8>> {
        base64::engine::general_purpose::STANDARD.decode(text).ok()
    }

    #[test]
    fn encoding_is_the_crates() {
        let data: Vec<u8> = (0..=255u8).rev().chain(0..=255).collect();
        for n in 0..40 {
            let ours = encode(&data[..n * 13 % 512]);
            let theirs = base64::engine::general_purpose::STANDARD.encode(&data[..n * 13 % 512]);
            assert_eq!(ours, theirs);
            assert_eq!(decode(ours.as_bytes()), Some(data[..n * 13 % 512].to_vec()));
        }
    }

    /// Every text of up to four symbols from an alphabet of the cases
    /// that matter, and many longer ones: the same answer as the crate.
    #[test]
    fn decoding_takes_exactly_what_the_crate_takes() {
        let symbols = b"AQgw/+=aZ9 -";
        let mut text = Vec::new();
        for len in 0..=4u32 {
            for mut n in 0..symbols.len().pow(len) {
                text.clear();
                for _ in 0..len {
                    text.push(symbols[n % symbols.len()]);
                    n /= symbols.len();
                }
                assert_eq!(decode(&text), crate_decode(&text), "{text:?}");
            }
        }
        let mut x = 1u64;
        for _ in 0..20_000 {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1442695040888963407);
            let len = (x >> 60) as usize;
            text.clear();
            for i in 0..len {
                text.push(symbols[((x >> (4 * i % 56)) as usize) % symbols.len()]);
            }
            assert_eq!(decode(&text), crate_decode(&text), "{text:?}");
        }
    }
}
