//! Body of the `handshake` target: arbitrary text as the first thing a
//! server connection or a client transport receives, as a frame and as the
//! upgrade header.
//!
//! It never goes past the handshake: each machine gets the one message (or
//! header) and its answer is checked, through the same public calls a
//! driver makes.

use crate::config::{ClientConfig, ServerConfig};
use crate::server::{Server, ServerOutput};
use crate::time::Instant;
use crate::wire::{self, Frame, Incoming, Limits, SessionId, PROTOCOL_VERSION};

use super::{
    check_decode, header_frame, limits, AllocProbe, ClientHarness, ClientOp, Tr, FUZZ_MAX_MESSAGE,
};

/// Target `handshake`: arbitrary text is decoded as a handshake frame; a
/// hello (or anything) is then handed to a server connection waiting for its
/// hello, and a welcome or reject to a client waiting for its welcome. The
/// server must answer with a welcome, a reject or a close; the client must
/// end open, failed, reconnecting or closed; both only along legal paths.
pub fn handshake(data: &[u8], probe: &dyn AllocProbe) {
    let text = String::from_utf8_lossy(data);
    let frame = check_decode(Incoming::Text(&text), &limits(), probe);

    // Server side: whatever arrives first on a fresh connection.
    let mut server = match Server::new(ServerConfig {
        max_message_size: FUZZ_MAX_MESSAGE,
        ..ServerConfig::default()
    }) {
        Ok(s) => s,
        Err(e) => panic!("server config: {e}"),
    };
    let conn = server.handle_connection(Instant::ZERO, None, SessionId([9; 16]));
    server.handle_message(Instant::ZERO, conn, Incoming::Text(&text));
    let mut welcomed = false;
    let mut closed = false;
    while let Some(o) = server.poll_output() {
        match o {
            ServerOutput::Transmit(c, t) => {
                assert_eq!(c, conn);
                assert!(!closed, "transmit after disconnect");
                let f = wire::decode(
                    t.as_incoming(),
                    &Limits {
                        max_message: usize::MAX,
                        version: PROTOCOL_VERSION,
                    },
                );
                match f {
                    Ok(Frame::Welcome(_)) => welcomed = true,
                    Ok(Frame::Reject(_)) => {}
                    other => panic!("server answered a hello with {other:?}"),
                }
            }
            ServerOutput::Disconnect(c, code, _) => {
                assert_eq!(c, conn);
                assert!(code.is_sendable(), "server closes with {code:?}");
                closed = true;
            }
            ServerOutput::Event(_) => {}
            ServerOutput::Feed(f) => panic!("a feed output with feeds off: {f:?}"),
            ServerOutput::Cluster(c) => panic!("a cluster output with shared rooms off: {c:?}"),
            ServerOutput::Latest(_, v) => panic!("a latest value with slots off: {v:?}"),
            ServerOutput::Map(u) => panic!("a synced-map update with shared rooms off: {u:?}"),
        }
    }
    if matches!(frame, Some(Frame::Hello(_))) {
        assert!(
            welcomed != closed,
            "a hello must be welcomed or refused (welcomed {welcomed}, closed {closed})"
        );
    }
    assert_eq!(server.session_count(), usize::from(welcomed));

    // Server side, again: the same text in the upgrade request's header.
    // The answer goes in the response, never as a frame.
    let mut server = match Server::new(ServerConfig {
        max_message_size: FUZZ_MAX_MESSAGE,
        ..ServerConfig::default()
    }) {
        Ok(s) => s,
        Err(e) => panic!("server config: {e}"),
    };
    let (conn, answer) = server.handle_upgrade(Instant::ZERO, None, SessionId([9; 16]), &text);
    let mut closed = false;
    while let Some(o) = server.poll_output() {
        match o {
            ServerOutput::Transmit(_, t) => panic!("a frame after an upgrade hello: {t:?}"),
            ServerOutput::Disconnect(c, code, _) => {
                assert_eq!(c, conn);
                assert!(code.is_sendable(), "server closes with {code:?}");
                closed = true;
            }
            ServerOutput::Event(_) => {}
            ServerOutput::Feed(f) => panic!("a feed output with feeds off: {f:?}"),
            ServerOutput::Cluster(c) => panic!("a cluster output with shared rooms off: {c:?}"),
            ServerOutput::Latest(_, v) => panic!("a latest value with slots off: {v:?}"),
            ServerOutput::Map(u) => panic!("a synced-map update with shared rooms off: {u:?}"),
        }
    }
    let mut welcomed = false;
    if let Some(a) = &answer {
        match header_frame(a) {
            Ok(Frame::Welcome(_)) => welcomed = true,
            Ok(Frame::Reject(_)) => assert!(closed, "a reject must be followed by a close"),
            other => panic!("server answered an upgrade hello with {other:?}"),
        }
    }
    if matches!(frame, Some(Frame::Hello(_))) {
        assert!(answer.is_some(), "a hello in the upgrade went unanswered");
    }
    assert_eq!(server.session_count(), usize::from(welcomed));

    // Client side: the same text as the answer to our hello, as a frame...
    let config = ClientConfig::default();
    let mut h = ClientHarness::new(config.clone(), 1);
    h.op(ClientOp::Connect);
    h.op(ClientOp::Opened(Tr::Current));
    let tr = h.transport;
    h.now = Instant::from_millis(1);
    h.max_now = h.now;
    h.feed(tr, Incoming::Text(&text));
    h.drain(false, None);

    // ... and in the response header, after a hello in the upgrade.
    let mut h = ClientHarness::new(config, 1);
    h.op(ClientOp::Connect);
    let tr = h.transport;
    assert!(
        h.client.upgrade_hello(tr).is_some(),
        "the default client offers its hello in the upgrade"
    );
    h.now = Instant::from_millis(1);
    h.max_now = h.now;
    h.fed_reject = matches!(frame, Some(Frame::Reject(_)));
    h.client.handle_upgraded(h.now, tr, Some(&text));
    h.drain(false, None);
}
