//! The MessagePack writers the envelopes need, into a `Vec<u8>`.
//!
//! Owns the markers and lengths: each writes exactly what `rmp::encode`'s
//! function of the same name writes (integers and lengths in their
//! shortest form; the tests check the two agree at every boundary). They
//! cannot fail, so that the writers calling them carry no error paths;
//! their `Result` (never an error) keeps rmp's signatures. Reading stays
//! rmp's.

use std::convert::Infallible;

/// What a writer returns: never an error.
pub(super) type Written = Result<(), Infallible>;

/// A length in the shortest of: the fixed form (`fix`: its marker and the
/// largest length it holds), the 8-bit form (its marker), the 16-bit form
/// (marker `m16`) and the 32-bit form (marker `m16 + 1`).
fn marker_len(out: &mut Vec<u8>, len: u32, fix: Option<(u8, u32)>, m8: Option<u8>, m16: u8) {
    match (fix, m8) {
        (Some((marker, max)), _) if len <= max => out.push(marker | len as u8),
        (_, Some(m8)) if len <= u32::from(u8::MAX) => out.extend_from_slice(&[m8, len as u8]),
        _ if len <= u32::from(u16::MAX) => {
            out.push(m16);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(m16 + 1);
            out.extend_from_slice(&len.to_be_bytes());
        }
    }
}

pub(super) fn write_map_len(out: &mut Vec<u8>, len: u32) -> Written {
    marker_len(out, len, Some((0x80, 15)), None, 0xde);
    Ok(())
}

pub(super) fn write_array_len(out: &mut Vec<u8>, len: u32) -> Written {
    marker_len(out, len, Some((0x90, 15)), None, 0xdc);
    Ok(())
}

/// A string; like rmp's, its length is taken as a `u32`.
pub(super) fn write_str(out: &mut Vec<u8>, s: &str) -> Written {
    marker_len(out, s.len() as u32, Some((0xa0, 31)), Some(0xd9), 0xda);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// Bytes as `bin` (which has no fixed form); like rmp's, the length is
/// taken as a `u32`.
pub(super) fn write_bin(out: &mut Vec<u8>, data: &[u8]) -> Written {
    marker_len(out, data.len() as u32, None, Some(0xc4), 0xc5);
    out.extend_from_slice(data);
    Ok(())
}

pub(super) fn write_uint(out: &mut Vec<u8>, v: u64) -> Written {
    if v < 128 {
        out.push(v as u8);
    } else if v <= u64::from(u8::MAX) {
        out.extend_from_slice(&[0xcc, v as u8]);
    } else if v <= u64::from(u16::MAX) {
        out.push(0xcd);
        out.extend_from_slice(&(v as u16).to_be_bytes());
    } else if v <= u64::from(u32::MAX) {
        out.push(0xce);
        out.extend_from_slice(&(v as u32).to_be_bytes());
    } else {
        out.push(0xcf);
        out.extend_from_slice(&v.to_be_bytes());
    }
    Ok(())
}

pub(super) fn write_bool(out: &mut Vec<u8>, v: bool) -> Written {
    out.push(if v { 0xc3 } else { 0xc2 });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const LENS: [usize; 14] = [
        0, 1, 15, 16, 31, 32, 255, 256, 65_535, 65_536, 65_537, 100, 127, 128,
    ];

    #[test]
    fn agrees_with_rmp() {
        for len in LENS {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            let n = len as u32;
            let _ = write_map_len(&mut ours, n);
            let _ = rmp::encode::write_map_len(&mut theirs, n);
            let _ = write_array_len(&mut ours, n);
            let _ = rmp::encode::write_array_len(&mut theirs, n);
            let s = "x".repeat(len);
            let _ = write_str(&mut ours, &s);
            let _ = rmp::encode::write_str(&mut theirs, &s);
            let _ = write_bin(&mut ours, s.as_bytes());
            let _ = rmp::encode::write_bin(&mut theirs, s.as_bytes());
            assert_eq!(ours, theirs, "length {len}");
        }
        for v in [
            0,
            1,
            127,
            128,
            255,
            256,
            65_535,
            65_536,
            u64::from(u32::MAX),
            u64::from(u32::MAX) + 1,
            u64::MAX,
        ] {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            let _ = write_uint(&mut ours, v);
            let _ = rmp::encode::write_uint(&mut theirs, v);
            assert_eq!(ours, theirs, "{v}");
        }
        for v in [false, true] {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            let _ = write_bool(&mut ours, v);
            let _ = rmp::encode::write_bool(&mut theirs, v);
            assert_eq!(ours, theirs, "{v}");
        }
    }
}
