//! An accepted socket's way to a connection: the TLS handshake, the HTTP
//! upgrade read and answered by [`http`], the origin policy and the
//! authenticator, and a `hello` carried in the upgrade request run through
//! the core before the `101` goes out.
//!
//! Bounded by the handshake timeout; every refusal gets an HTTP status.
//! Nothing here outlives the upgrade: the connection runs in a task of its
//! own ([`connection`]), so it does not carry the handshake's state.

use std::net::SocketAddr;
use std::sync::Arc;

use async_tungstenite::tungstenite::protocol::Role;
use async_tungstenite::WebSocketStream;
use kitestring_core::server::ConnectionId;
use kitestring_core::wire::{self, SessionId};
use tracing::debug;

use crate::runtime::BoxIo;
use crate::util;
use crate::ws;

use super::auth::{AuthReject, AuthRequest};
use super::conn::{connection, report_closed};
use super::http;
use super::shared::{ServerShared, SlotRef};

/// An accepted socket's task: the upgrade, then the connection in a task
/// of its own, so the handshake's state (TLS, HTTP parsing, about 2 KiB)
/// is freed with this one instead of living on, for as long as the
/// connection does, inside its future. (One task with both futures boxed
/// in turn measured a third of a KiB more per idle connection.)
pub(super) async fn serve_accepted(shared: Arc<ServerShared>, io: BoxIo, peer: Option<SocketAddr>) {
    if let Some((ws, identity, early)) = handshake(shared.clone(), io, peer).await {
        let runtime = shared.runtime.clone();
        runtime.spawn(Box::pin(connection(shared, ws, identity, early)));
    }
}

/// The socket, the identity authentication gave, and the connection the
/// core opened for a `hello` in the upgrade request, if any.
type Upgraded = (crate::ws::Ws, Option<String>, Option<ConnectionId>);

/// TLS handshake (if configured) and HTTP upgrade with authentication.
///
/// The request head is read and answered here ([`http`]), not by
/// tungstenite: every refusal gets an HTTP status (426 for a request that
/// is not a WebSocket upgrade, 400 for a malformed one, 431 for headers
/// over 64 KiB, 403 for a refused origin, 401 and 403 from the
/// authenticator) and is logged at debug level with the peer's address,
/// and bytes the client wrote behind its request (a `hello` frame sent
/// before the `101` arrived) start the WebSocket stream instead of failing
/// the upgrade.
async fn handshake(
    shared: Arc<ServerShared>,
    io: BoxIo,
    peer: Option<SocketAddr>,
) -> Option<Upgraded> {
    let limit = shared.options.handshake_timeout;
    let opts = shared.options.clone();
    // A connection the core opened for a `hello` in the upgrade request,
    // kept outside the upgrade future so a timeout cannot lose it.
    let early = std::sync::OnceLock::new();
    let upgraded = util::timeout(&*shared.runtime, limit, async {
        let mut io: BoxIo = match &opts.tls {
            Some(tls) => match tls.acceptor.accept(io).await {
                Ok(s) => Box::new(s),
                Err(e) => {
                    debug!(?peer, error = %e, "TLS handshake failed");
                    return None;
                }
            },
            None => io,
        };
        let mut buf = Vec::new();
        let answer = match http::read_head(&mut io, &mut buf).await {
            Ok(end) => answer_upgrade(&shared, &buf[..end], &early).map(|(r, id)| (r, id, end)),
            Err(http::HeadError::TooLarge) => Err(http::HttpRefusal::TOO_LARGE),
            Err(http::HeadError::Closed(e)) => {
                debug!(?peer, error = ?e, "connection ended before a complete upgrade request");
                return None;
            }
        };
        match answer {
            Ok((response, identity, end)) => {
                if let Err(e) = http::write_all(&mut io, &response).await {
                    debug!(?peer, error = %e, "writing the 101 failed");
                    return None;
                }
                let config = Some(ws::websocket_config(opts.config.max_message_size));
                let ws = if buf.len() == end {
                    WebSocketStream::from_raw_socket(io, Role::Server, config).await
                } else {
                    // The client did not wait for the `101`: what it sent
                    // behind the request is the WebSocket stream's start.
                    buf.drain(..end);
                    WebSocketStream::from_partially_read(io, buf, Role::Server, config).await
                };
                Some((ws, identity))
            }
            Err(refusal) => {
                debug!(
                    ?peer,
                    status = refusal.status,
                    reason = refusal.reason,
                    "upgrade refused"
                );
                drop(buf);
                let _ = util::timeout(&*shared.runtime, opts.close_timeout, async {
                    if http::write_all(&mut io, &refusal.response()).await.is_ok() {
                        // Unread bytes would turn the close into a reset,
                        // which can destroy the response before it is read.
                        ws::linger(&mut io, http::MAX_HEAD).await;
                    }
                })
                .await;
                None
            }
        }
    })
    .await
    .flatten();
    let early = early.into_inner();
    match upgraded {
        Some((ws, identity)) => Some((ws, identity, early)),
        // The core opened a connection for the upgrade's `hello`, but the
        // `101` never made it out.
        None => {
            if let Some(id) = early {
                report_closed(&shared, id, None);
            }
            None
        }
    }
}

/// Checks an upgrade request (its form, the origin, the authenticator) and
/// runs a `hello` it carries through the core: the `101` response and the
/// identity, or the refusal.
fn answer_upgrade(
    shared: &ServerShared,
    head: &[u8],
    early: &std::sync::OnceLock<ConnectionId>,
) -> Result<(Vec<u8>, Option<String>), http::HttpRefusal> {
    let opts = &shared.options;
    let mut headers = [httparse::EMPTY_HEADER; http::MAX_HEADERS];
    let (req, all) = http::parse(head, &mut headers)?;
    if !opts.origins.allows(req.origin, Some(req.host)) {
        return Err(http::HttpRefusal::new(403, "origin not allowed"));
    }
    let mut identity = None;
    if let Some(auth) = &opts.auth {
        let headers = http::header_map(all)?;
        let view = AuthRequest {
            path: req.path,
            query: req.query,
            headers: &headers,
        };
        match auth(&view) {
            Ok(id) => identity = id,
            Err(AuthReject::Forbidden) => return Err(http::HttpRefusal::new(403, "forbidden")),
            Err(AuthReject::Unauthorized) => {
                return Err(http::HttpRefusal::new(401, "unauthorized"))
            }
        }
    }
    let mut welcome = None;
    // A `hello` over the size a client may put in the header is not used:
    // the `101` carries no answer and the client sends its `hello` as a
    // frame (PROTOCOL.md, section 4.1).
    if let Some(hello) = req.hello.filter(|h| h.len() <= wire::MAX_HELLO_HEADER) {
        if let Some((id, answer)) = early_hello(shared, identity.clone(), hello) {
            let _ = early.set(id);
            welcome = answer;
        }
    }
    Ok((
        http::switching_protocols(req.key, welcome.as_deref()),
        identity,
    ))
}

/// Runs a `hello` from the upgrade request through the core, before the
/// `101` goes out: the connection is open at once, and its answer goes in
/// the response. `None` while shutting down or without randomness for a
/// session id: the connection then takes the ordinary path.
fn early_hello(
    shared: &ServerShared,
    identity: Option<String>,
    hello: &[u8],
) -> Option<(ConnectionId, Option<String>)> {
    // Not UTF-8: the core reports it undecodable, like a bad first frame.
    let hello = std::str::from_utf8(hello).unwrap_or("\u{fffd}");
    let fresh = util::random16().ok()?;
    shared.run(None, |st, now| {
        if st.shutdown.is_some() || st.stopped {
            return None;
        }
        let (id, answer) = st
            .server
            .handle_upgrade(now, identity, SessionId(fresh), hello);
        // Before the core's outputs are drained, so they find the slot.
        st.conns.insert(id, SlotRef::default());
        Some((id, answer))
    })
}
