//! Identifiers: of client instances, sessions, messages and rooms.
//!
//! Owns the id types and the hex form client and session ids take on the
//! wire. It never makes an id: session ids come from the driver as bytes, a
//! client's id from its driver, message ids from the machines that number
//! their messages.

use std::fmt;

/// A 128-bit identifier written as 32 lowercase hex digits on the wire.
macro_rules! id128 {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 16]);

        impl $name {
            /// The id as 32 lowercase hex digits.
            pub fn to_hex(&self) -> String {
                self.hex().as_str().to_owned()
            }

            /// The id's hex digits on the stack, for encoders that only
            /// borrow them.
            pub(crate) fn hex(&self) -> Hex32 {
                Hex32::of(&self.0)
            }

            /// Parses 32 hex digits (either case).
            pub fn from_hex(s: &str) -> Option<Self> {
                let bytes = s.as_bytes();
                if bytes.len() != 32 {
                    return None;
                }
                let mut out = [0u8; 16];
                for (i, pair) in bytes.chunks_exact(2).enumerate() {
                    out[i] = (hex_val(pair[0])? << 4) | hex_val(pair[1])?;
                }
                Some($name(out))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // The first 8 digits are enough to tell ids apart in logs.
                write!(f, "{}({}…)", stringify!($name), &self.hex().as_str()[..8])
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.hex().as_str())
            }
        }
    };
}

/// 16 bytes as 32 lowercase hex digits, held on the stack.
#[derive(Clone, Copy)]
pub(crate) struct Hex32([u8; 32]);

impl Hex32 {
    pub(crate) fn of(bytes: &[u8; 16]) -> Hex32 {
        let mut out = [0u8; 32];
        for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
            pair[0] = HEX[usize::from(b >> 4)];
            pair[1] = HEX[usize::from(b & 0xf)];
        }
        Hex32(out)
    }

    pub(crate) fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever written.
        core::str::from_utf8(&self.0).unwrap_or_default()
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

id128!(
    /// A session's identifier: 128 random bits from a cryptographic source,
    /// chosen by the server and kept across reconnects.
    SessionId
);
id128!(
    /// A client instance's identifier: 128 bits the client's driver chooses.
    ClientId
);

/// A room name shared by every message broadcast in it (cloning is a
/// reference count, not a copy).
pub(crate) type RoomName = std::sync::Arc<str>;

/// A message identifier, unique per sending machine and increasing in send
/// order. Together with the sender's identity it is an idempotency key.
/// Id 0 is reserved for messages the machine sends on its own (rejoining
/// rooms after a lost session); they never appear in acknowledgment or loss
/// reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(pub u64);

impl MessageId {
    /// The id of messages the machine sends on its own.
    pub const SYSTEM: MessageId = MessageId(0);
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn ids_round_trip_through_hex() {
        let id = SessionId([0xab; 16]);
        assert_eq!(SessionId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(SessionId::from_hex("AB").map(|_| ()), None);
        assert_eq!(ClientId::from_hex(&"G".repeat(32)), None);
    }
}
