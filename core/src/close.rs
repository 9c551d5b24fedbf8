//! WebSocket close codes and what each one means for the session.
//!
//! Owns the table that PROTOCOL.md prints: which codes a peer may send and
//! whether the client reconnects, fails, or stops after receiving one. The
//! state machine asks [`CloseCode::disposition`] and never hard-codes a code.

use core::fmt;

/// A WebSocket close code (RFC 6455 section 7.4, plus Kitestring's 4xxx codes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// 1000: normal closure. Sent by a local `close()`; from the server it
    /// ends the session without a reconnect.
    pub const NORMAL: CloseCode = CloseCode(1000);
    /// 1001: going away (server shutdown, connection rotation). Reconnect.
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    /// 1002: protocol error. Reconnect with backoff (a mangling proxy can cause it).
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    /// 1003: unsupported data.
    pub const UNSUPPORTED_DATA: CloseCode = CloseCode(1003);
    /// 1006: abnormal closure: the transport ended without a close frame.
    /// Never sent on the wire; drivers report it for EOF and resets.
    pub const ABNORMAL: CloseCode = CloseCode(1006);
    /// 1007: invalid payload data (undecodable frames).
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    /// 1008: policy violation (rate limit, authorization). Terminal.
    pub const POLICY_VIOLATION: CloseCode = CloseCode(1008);
    /// 1009: message too big.
    pub const MESSAGE_TOO_BIG: CloseCode = CloseCode(1009);
    /// 1011: internal server error. Reconnect.
    pub const INTERNAL_ERROR: CloseCode = CloseCode(1011);
    /// 1012: service restart. Reconnect.
    pub const SERVICE_RESTART: CloseCode = CloseCode(1012);
    /// 1013: try again later. Reconnect, with a longer delay.
    pub const TRY_AGAIN_LATER: CloseCode = CloseCode(1013);
    /// 4000: the client abandons this connection and will resume the session
    /// on a new one (connect timeout, `reconnect()`). The server keeps the session.
    pub const RETRY: CloseCode = CloseCode(4000);
    /// 4001: no protocol version in common. Terminal: retrying cannot help.
    pub const UNSUPPORTED_VERSION: CloseCode = CloseCode(4001);
    /// 4002: the handshake was malformed or out of order.
    pub const BAD_HANDSHAKE: CloseCode = CloseCode(4002);
    /// 4003: no codec in common. Terminal.
    pub const UNSUPPORTED_CODEC: CloseCode = CloseCode(4003);
    /// 4008: the peer stopped answering heartbeats. Reconnect.
    pub const HEARTBEAT_TIMEOUT: CloseCode = CloseCode(4008);
    /// 4009: the client read too slowly and its outbound queue overflowed. Reconnect.
    pub const SLOW_CONSUMER: CloseCode = CloseCode(4009);
    /// 4010: data stayed unacknowledged past the ack timeout: the connection
    /// is stuck and is recycled. Reconnect and resume.
    pub const ACK_TIMEOUT: CloseCode = CloseCode(4010);
    /// 4011: the connection reached its maximum age; resume on a new one.
    pub const ROTATE: CloseCode = CloseCode(4011);
    /// 4401: credentials missing, invalid or expired. Reconnect once with a
    /// fresh token if the driver can get one, otherwise terminal.
    pub const UNAUTHORIZED: CloseCode = CloseCode(4401);
    /// 4403: authenticated but not allowed (including a resume attempt by an
    /// identity that does not own the session). Terminal.
    pub const FORBIDDEN: CloseCode = CloseCode(4403);
    /// 4429: the server cannot take this connection now (too many
    /// requests, authentication unavailable): reconnect no sooner than the
    /// `retry` hint, or the try-again-later delay. The in-band form of HTTP
    /// 429 and 503, for clients that cannot read a status.
    pub const TRY_LATER: CloseCode = CloseCode(4429);

    /// The first of the codes that stand in for 1001 to 1015 when a browser
    /// page closes: a page may only send 1000 and 3000 to 4999 (the WHATWG
    /// `WebSocket.close`), so it sends `4100 + (code - 1000)` instead,
    /// 4102 for 1002 and 4109 for 1009 (PROTOCOL.md, section 8).
    pub const PAGE_BASE: u16 = 4100;

    /// The code a browser page sends in place of this one: a code in 1001
    /// to 1015 becomes its 41xx equivalent; every other code is returned
    /// as it is (1000 and 3000 to 4999 are what a page may send).
    pub fn for_page(self) -> CloseCode {
        match self.0 {
            1001..=1015 => CloseCode(Self::PAGE_BASE + (self.0 - 1000)),
            _ => self,
        }
    }

    /// The code a received one stands for: a page's 4101 to 4115 is 1001 to
    /// 1015 ([`for_page`](Self::for_page)); every other code is itself.
    /// Peers read every close code through this.
    pub fn canonical(self) -> CloseCode {
        match self.0 {
            4101..=4115 => CloseCode(self.0 - Self::PAGE_BASE + 1000),
            _ => self,
        }
    }

    /// What a client does after the peer closed the transport with this code.
    pub fn disposition(self) -> Disposition {
        match self.canonical().0 {
            1000 => Disposition::Stop,
            1008 | 4001 | 4003 | 4403 => Disposition::Fail,
            4401 => Disposition::Reauthenticate,
            1013 | 4429 => Disposition::ReconnectLater,
            _ => Disposition::Reconnect,
        }
    }

    /// Whether a peer is allowed to put this code in a close frame (RFC 6455:
    /// 1005, 1006 and 1015 are reserved for local reporting).
    pub fn is_sendable(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }

    /// A short name for logs (a page's 41xx is named as the code it stands
    /// for).
    pub fn name(self) -> &'static str {
        match self.canonical().0 {
            1000 => "normal",
            1001 => "going away",
            1002 => "protocol error",
            1003 => "unsupported data",
            1005 => "no status",
            1006 => "abnormal closure",
            1007 => "invalid payload",
            1008 => "policy violation",
            1009 => "message too big",
            1010 => "missing extension",
            1011 => "internal error",
            1012 => "service restart",
            1013 => "try again later",
            1014 => "bad gateway",
            4000 => "retry",
            4001 => "unsupported version",
            4002 => "bad handshake",
            4003 => "unsupported codec",
            4008 => "heartbeat timeout",
            4009 => "slow consumer",
            4010 => "ack timeout",
            4011 => "rotate",
            4401 => "unauthorized",
            4403 => "forbidden",
            4429 => "try later",
            _ => "other",
        }
    }
}

impl fmt::Debug for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.0, self.name())
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl From<u16> for CloseCode {
    fn from(code: u16) -> Self {
        CloseCode(code)
    }
}

/// What the client does after the transport closed with a given code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Disposition {
    /// Reconnect with exponential backoff.
    Reconnect,
    /// Reconnect with backoff, waiting at least the "try again later" delay.
    ReconnectLater,
    /// Reconnect once with a fresh token if the driver can get one; fail otherwise.
    Reauthenticate,
    /// Enter `Failed`: retrying cannot help.
    Fail,
    /// Enter `Closed`: the peer ended the session on purpose.
    Stop,
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn table() {
        use Disposition::*;
        let cases = [
            (1000, Stop),
            (1001, Reconnect),
            (1006, Reconnect),
            (1011, Reconnect),
            (1012, Reconnect),
            (1013, ReconnectLater),
            (1008, Fail),
            (4001, Fail),
            (4003, Fail),
            (4403, Fail),
            (4401, Reauthenticate),
            (4429, ReconnectLater),
            (4008, Reconnect),
            (4999, Reconnect),
        ];
        for (code, want) in cases {
            assert_eq!(CloseCode(code).disposition(), want, "code {code}");
        }
    }

    #[test]
    fn page_codes_stand_for_the_codes_a_page_cannot_send() {
        assert_eq!(CloseCode::PROTOCOL_ERROR.for_page(), CloseCode(4102));
        assert_eq!(CloseCode::MESSAGE_TOO_BIG.for_page(), CloseCode(4109));
        assert_eq!(CloseCode(4102).canonical(), CloseCode::PROTOCOL_ERROR);
        assert_eq!(CloseCode(4109).canonical(), CloseCode::MESSAGE_TOO_BIG);
        for code in [1000, 3000, 4000, 4008, 4100, 4116, 4401, 4999] {
            assert_eq!(CloseCode(code).for_page(), CloseCode(code), "{code}");
        }
        for code in 1001..=1015 {
            let page = CloseCode(code).for_page();
            assert!((3000..=4999).contains(&page.0), "{code}");
            assert_eq!(page.canonical(), CloseCode(code));
            assert_eq!(page.disposition(), CloseCode(code).disposition());
        }
        assert_eq!(CloseCode(4108).disposition(), Disposition::Fail);
    }

    #[test]
    fn reserved_codes_are_not_sendable() {
        for code in [0, 999, 1004, 1005, 1006, 1015, 2000, 5000] {
            assert!(!CloseCode(code).is_sendable(), "{code}");
        }
        for code in [1000, 1001, 1008, 1011, 1013, 4001, 4401] {
            assert!(CloseCode(code).is_sendable(), "{code}");
        }
    }
}
