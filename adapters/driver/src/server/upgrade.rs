//! An accepted socket's way to a connection: the TLS handshake, the HTTP
//! upgrade read and answered by [`http`], then [`admit`]: the origin
//! policy, the authenticator (awaited here when it is asynchronous, bounded
//! by the authentication timeout) and a `hello` carried in the upgrade
//! request run through the core before the `101` goes out. [`admit`] is
//! the one admission path: requests that a hyper-based server read
//! (`super::hyper`) go through it too.
//!
//! Bounded by the handshake timeout; every refusal gets an HTTP status.
//! Nothing here outlives the upgrade: the connection runs after it, in the
//! same task but in a future of its own ([`connection`]), so it does not
//! carry the handshake's state. Nothing here runs an authenticator under
//! the server's lock.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use async_tungstenite::tungstenite::protocol::Role;
use async_tungstenite::WebSocketStream;
use kitestring_core::server::{ConnectionId, UpgradeRefusal};
use kitestring_core::wire::{self, SessionId};
use tracing::{debug, Instrument};

use crate::runtime::{BoxFuture, BoxIo};
use crate::util;
use crate::ws;

use super::auth::{AuthReject, AuthRequest, Authenticator, Verdict};
use super::cluster::ClaimFailed;
use super::conn::{connection, report_closed};
use super::feed::{lock_feed, FollowOp};
use super::http;
use super::shared::{lock_slot, ServerShared, SlotRef};
use super::Refusals;

/// An accepted socket's task: the upgrade, then the connection, in one
/// task. Each stage is a future boxed on its own, so the handshake's state
/// (TLS, HTTP parsing, the authenticator: 2.4 KB) is freed when the upgrade
/// ends instead of living on, for as long as the connection does, inside
/// the task's future: an idle connection carries [`Accepted`]'s three words
/// beside its own future. (The upgrade once ended by spawning the
/// connection's task: a second task's scheduling per connection; an
/// `async fn` awaiting both boxed in turn measured a third of a KiB more
/// per idle connection.)
pub(super) fn serve_accepted(
    shared: Arc<ServerShared>,
    io: BoxIo,
    peer: Option<SocketAddr>,
) -> BoxFuture<'static, ()> {
    Box::pin(Accepted::Upgrading(Box::pin(upgrade(shared, io, peer))))
}

/// The upgrade of an accepted socket; what serves it afterwards, if
/// anything does.
async fn upgrade(
    shared: Arc<ServerShared>,
    io: BoxIo,
    peer: Option<SocketAddr>,
) -> Option<BoxFuture<'static, ()>> {
    let span = tracing::debug_span!("kitestring_upgrade", ?peer, via = "listener");
    let upgraded = handshake(shared.clone(), io, peer).instrument(span).await;
    match upgraded? {
        Handshake::Upgraded((ws, identity, early)) => Some(connection(shared, ws, identity, early)),
        // Boxed: only connections of the fallback carry hyper's state.
        Handshake::Http(io, read) => {
            Some(Box::pin(super::hyper::serve_http(shared, io, read, peer)))
        }
    }
}

/// The stage an accepted socket's task is in ([`serve_accepted`]).
enum Accepted {
    /// Reading and answering the upgrade.
    Upgrading(BoxFuture<'static, Option<BoxFuture<'static, ()>>>),
    /// Serving the connection the upgrade opened.
    Serving(BoxFuture<'static, ()>),
    /// Done.
    Ended,
}

impl Future for Accepted {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // Every stage is boxed, so `Accepted` is `Unpin`.
        let this = self.get_mut();
        loop {
            match this {
                Accepted::Upgrading(upgrade) => match upgrade.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(next) => {
                        // The upgrade's state is freed here, before the
                        // connection's first poll.
                        *this = next.map_or(Accepted::Ended, Accepted::Serving);
                    }
                },
                Accepted::Serving(serve) => {
                    ready!(serve.as_mut().poll(cx));
                    *this = Accepted::Ended;
                }
                Accepted::Ended => return Poll::Ready(()),
            }
        }
    }
}

/// What an accepted socket's first request led to.
// Lives for one hand-over: boxing the WebSocket would cost every
// connection an allocation for nothing.
#[allow(clippy::large_enum_variant)]
enum Handshake {
    /// A WebSocket.
    Upgraded(Upgraded),
    /// A request of the HTTP fallback: the socket and what was read from
    /// it, for hyper to serve.
    Http(BoxIo, Vec<u8>),
}

/// Whether a request head is the HTTP fallback's (its query has
/// `kitestring-http`) and the fallback is on.
fn is_fallback(shared: &ServerShared, head: &[u8]) -> bool {
    if shared.options.http_fallback.is_none() {
        return false;
    }
    let mut headers = [httparse::EMPTY_HEADER; 0];
    let mut req = httparse::Request::new(&mut headers);
    // Only the request line is needed: too many headers is expected here.
    let _ = req.parse(head);
    let Some(target) = req.path else {
        return false;
    };
    let query = target.split_once('?').map(|(_, q)| q);
    http::fallback_ask(req.method.unwrap_or(""), query).is_some()
}

/// The socket, the identity authentication gave, and the connection the
/// core opened for a `hello` in the upgrade request, if any.
type Upgraded = (crate::ws::Ws, Option<String>, Option<Early>);

/// A connection the core opened while it admitted an upgrade (for a
/// `hello` in the request, or to refuse it in-band), and its slot: the
/// connection's task starts with them instead of looking them up.
pub(super) type Early = (ConnectionId, SlotRef);

/// TLS handshake (if configured) and HTTP upgrade with authentication.
///
/// The request head is read and answered here ([`http`]), not by
/// tungstenite: every refusal gets an HTTP status (426 for a request that
/// is not a WebSocket upgrade, 400 for a malformed one, 431 for headers
/// over 64 KiB, 403 for a refused origin, 401, 403 and 503 from the
/// authenticator, 503 also when an asynchronous one outlives the
/// authentication timeout) and is logged at debug level with the peer's
/// address,
/// and bytes the client wrote behind its request (a `hello` frame sent
/// before the `101` arrived) start the WebSocket stream instead of failing
/// the upgrade.
async fn handshake(
    shared: Arc<ServerShared>,
    io: BoxIo,
    peer: Option<SocketAddr>,
) -> Option<Handshake> {
    let limit = shared.options.handshake_timeout;
    let opts = shared.options.clone();
    // A connection the core opened for a `hello` in the upgrade request,
    // kept outside the upgrade future so a timeout cannot lose it.
    let early = OnceLock::new();
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
            Ok(end) if is_fallback(&shared, &buf[..end]) => {
                return Some(Err((io, buf)));
            }
            Ok(end) => answer_upgrade(&shared, &buf[..end], peer, &early)
                .await
                .map(|(r, id)| (r, id, end)),
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
                Some(Ok((ws, identity)))
            }
            Err(refusal) => {
                refused(peer, &refusal);
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
        Some(Ok((ws, identity))) => Some(Handshake::Upgraded((ws, identity, early))),
        Some(Err((io, read))) => Some(Handshake::Http(io, read)),
        // The core opened a connection for the upgrade's `hello`, but the
        // `101` never made it out.
        None => {
            if let Some((id, _)) = early {
                report_closed(&shared, id, None);
            }
            None
        }
    }
}

/// Logs and counts a refused upgrade.
pub(super) fn refused(peer: Option<SocketAddr>, refusal: &http::HttpRefusal) {
    debug!(
        ?peer,
        status = refusal.status,
        reason = refusal.reason,
        "upgrade refused"
    );
    metrics::counter!("kitestring_upgrades_refused_total", "status" => refusal.status_label())
        .increment(1);
}

/// Checks an upgrade request read by this server's own reader (its form,
/// then [`admit`]): the `101` response and the identity, or the refusal.
async fn answer_upgrade(
    shared: &ServerShared,
    head: &[u8],
    peer: Option<SocketAddr>,
    early: &OnceLock<Early>,
) -> Result<(Vec<u8>, Option<String>), http::HttpRefusal> {
    // The header lines are parsed into an array on this function's stack,
    // not held across the authenticator's await.
    let (req, auth) = read_request(shared, head, peer)?;
    let admitted = admit(shared, &req, || auth.ok_or(AUTH_REQUEST_MISSING), early).await?;
    let mut response = http::switching_protocols(req.key, admitted.welcome.as_deref());
    if let Some(slot) = &admitted.slot {
        take_queued(slot, &mut response);
    }
    Ok((response, admitted.identity))
}

/// Appends to the `101` response, as WebSocket frames, what the core
/// queued for its connection while it ran the request's `hello` (the
/// answers to the `hello`'s joins, a resumed session's retransmissions),
/// so that they go out in the response's write rather than in a write of
/// their own right after it. Only frames that come before every room feed
/// entry the connection must write first: the rest stay in the slot, for
/// the connection task, in order.
fn take_queued(slot: &SlotRef, response: &mut Vec<u8>) {
    let mut slot = lock_slot(slot);
    if slot.out.is_empty() || slot.closing {
        return;
    }
    // A frame stamped `s` goes after the feed entries stamped up to `s`;
    // entries of a feed this connection follows count as stamped at least
    // `start`. Frames stamped below every such entry may go now.
    let cutoff = slot
        .follows
        .iter()
        .filter_map(|op| match op {
            FollowOp::Follow {
                feed, next, start, ..
            } if lock_feed(feed).last() >= *next => Some(*start),
            _ => None,
        })
        .min()
        .unwrap_or(u64::MAX);
    while let Some((stamp, message)) = slot.out.front() {
        if *stamp >= cutoff || !ws::append_frame(message, response) {
            break;
        }
        slot.out.pop_front();
    }
}

/// Never happens: [`read_request`] builds the request whenever an
/// authenticator is configured, and [`admit`] asks only then.
const AUTH_REQUEST_MISSING: http::HttpRefusal =
    http::HttpRefusal::new(500, "no request for the authenticator");

/// Parses a request head: the checked request, and what the authenticator
/// will see of it if one is configured.
fn read_request<'b>(
    shared: &ServerShared,
    head: &'b [u8],
    peer: Option<SocketAddr>,
) -> Result<(http::Upgrade<'b>, Option<AuthRequest>), http::HttpRefusal> {
    let mut headers = [httparse::EMPTY_HEADER; http::MAX_HEADERS];
    let (req, all) = http::parse(head, &mut headers)?;
    let auth = match &shared.options.auth {
        // Built before the origin is checked: cheaper than keeping the
        // header lines across the authenticator's await.
        Some(_) => {
            let mut auth = AuthRequest::new(
                req.path,
                req.query.map(str::to_owned),
                http::header_map(all)?,
            );
            auth.peer = peer;
            Some(auth)
        }
        None => None,
    };
    Ok((req, auth))
}

/// What an admitted upgrade request leads to.
pub(super) struct Admitted {
    /// The answer to a `hello` in the request, for the `101`'s
    /// `Kitestring-Welcome` header.
    pub(super) welcome: Option<String>,
    /// Who the authenticator said the peer is.
    pub(super) identity: Option<String>,
    /// The slot of the connection the core opened for a `hello` in the
    /// request header: what it queued there (the answers to the `hello`'s
    /// joins, a resumed session's retransmissions) can go out with the
    /// `101` ([`take_queued`]).
    pub(super) slot: Option<SlotRef>,
}

/// Admits a checked upgrade request, whichever HTTP stack read it: the
/// origin policy (403, before any credential is looked at), the
/// authenticator (401, 403, 503; `auth_request` is called only if one is
/// configured), then a `hello` the request carries, run through the core:
/// one in the `Kitestring-Hello` header so that its answer goes in the
/// `101`, one in the URL (a page's) so that its answer is the first frame.
/// A refusal is answered in-band instead of with its status when
/// [`ServerOptions::refusals`](super::ServerOptions::refusals) says so:
/// the upgrade is then admitted, and the core's connection refuses it. The
/// connection the core opened, for either, is left in `early`.
pub(super) async fn admit(
    shared: &ServerShared,
    req: &http::Upgrade<'_>,
    auth_request: impl FnOnce() -> Result<AuthRequest, http::HttpRefusal>,
    early: &OnceLock<Early>,
) -> Result<Admitted, http::HttpRefusal> {
    let opts = &shared.options;
    // The header wins over the URL; either is used only up to the size a
    // client may send (PROTOCOL.md, section 4.1): a longer one is ignored,
    // and the client sends its `hello` as a frame.
    let url_hello = match req.hello {
        Some(_) => None,
        None => req
            .query
            .and_then(|q| http::query_value(q, wire::HELLO_PARAM))
            .filter(|h| h.len() <= wire::MAX_HELLO_HEADER),
    };
    let in_band = match opts.refusals {
        Refusals::Status => false,
        Refusals::InBand => true,
        Refusals::InBandForPages => url_hello.is_some(),
    };
    let refuse = |refusal: http::HttpRefusal| -> Result<Admitted, http::HttpRefusal> {
        let Some(form) = in_band_form(&refusal, opts.retry_after).filter(|_| in_band) else {
            return Err(refusal);
        };
        refuse_in_band(shared, form, req.hello.is_some(), early).ok_or(refusal)
    };
    if !opts.origins.allows(req.origin, Some(req.host)) {
        return refuse(http::HttpRefusal::new(403, ORIGIN_REFUSED));
    }
    let identity = match &opts.auth {
        Some(auth) => match authenticate(shared, auth, auth_request()?).await {
            Ok(identity) => identity,
            Err(refusal) => return refuse(refusal),
        },
        None => None,
    };
    let header_hello = req.hello.filter(|h| h.len() <= wire::MAX_HELLO_HEADER);
    if let Some(hello) = header_hello.or(url_hello.as_deref()) {
        if let Err(refusal) = claim_for(shared, hello).await {
            return refuse(refusal);
        }
    }
    let (mut welcome, mut slot) = (None, None);
    if let Some(hello) = header_hello {
        if let Some((id, answer, queued)) = early_hello(shared, identity.clone(), hello) {
            let _ = early.set((id, queued.clone()));
            welcome = answer;
            slot = Some(queued);
        }
    } else if let Some(hello) = url_hello {
        if let Some(opened) = request_hello(shared, identity.clone(), &hello) {
            let _ = early.set(opened);
        }
    }
    Ok(Admitted {
        welcome,
        identity,
        slot,
    })
}

/// With a cluster, a resuming `hello` for a session this node does not
/// hold first claims it from where it is (`cluster.rs`). A claim that
/// cannot be settled is a 503: the client keeps its session and tries
/// again later.
pub(super) async fn claim_for(
    shared: &ServerShared,
    hello: &[u8],
) -> Result<(), http::HttpRefusal> {
    let Some(cluster) = &shared.cluster else {
        return Ok(());
    };
    let hello = std::str::from_utf8(hello).unwrap_or("");
    let Some(session) = shared.run(None, |st, _| st.server.session_to_claim(hello)) else {
        return Ok(());
    };
    match cluster.claim(shared, session).await {
        Ok(claimed) => {
            debug!(session = %session, ?claimed, "claimed a session from the cluster");
            Ok(())
        }
        Err(ClaimFailed(why)) => {
            debug!(session = %session, %why, "a session's claim failed; the client tries again");
            Err(SESSION_MOVING)
        }
    }
}

/// The in-band form of `refusal`, if it has one: a 503 with `Retry-After`
/// (from `retry_after`) has it as its `retry`, one without gets
/// [`UNHINTED_RETRY`].
pub(super) fn in_band_form(
    refusal: &http::HttpRefusal,
    retry_after: Duration,
) -> Option<UpgradeRefusal> {
    Some(match refusal.status {
        401 => UpgradeRefusal::Unauthorized,
        403 if refusal.reason == ORIGIN_REFUSED => UpgradeRefusal::Origin,
        403 => UpgradeRefusal::Forbidden,
        503 => UpgradeRefusal::TryLater {
            retry_after: match refusal.retry_after {
                Some(_) => retry_after,
                None => UNHINTED_RETRY,
            },
        },
        _ => return None,
    })
}

/// The `retry` of the in-band form of a 503 that carries no `Retry-After`
/// (a session still moving between servers): a client backs off from such
/// a 503 (its first step is 1 s), while a 4429 without `retry` would wait
/// its `try_later_delay` (10 s by default).
const UNHINTED_RETRY: Duration = Duration::from_secs(1);

/// A resume's claim that could not be settled: without `Retry-After`,
/// the client backs off and tries again.
const SESSION_MOVING: http::HttpRefusal =
    http::HttpRefusal::new(503, "the session is moving; try again");

/// The reason of the 403 a refused origin gets.
const ORIGIN_REFUSED: &str = "origin not allowed";

/// Admits an upgrade only to refuse it in-band: the core opens a
/// connection that sends the `reject` (in the `101`'s header when the
/// request's `hello` was in its header) and closes with its code. `None`
/// while shutting down: the status is sent instead.
fn refuse_in_band(
    shared: &ServerShared,
    refusal: UpgradeRefusal,
    in_header: bool,
    early: &OnceLock<Early>,
) -> Option<Admitted> {
    debug!(
        code = refusal.code().0,
        reason = refusal.reason(),
        "upgrade refused in-band"
    );
    metrics::counter!("kitestring_upgrades_refused_total", "status" => refusal.code().0.to_string())
        .increment(1);
    let (id, answer, slot) = shared.run(None, |st, now| {
        if st.shutdown.is_some() || st.stopped {
            return None;
        }
        let (id, answer) = st.server.handle_refused_upgrade(now, refusal, in_header);
        // Before the core's outputs are drained, so they find the slot.
        let slot = SlotRef::default();
        st.conns.insert(id, slot.clone());
        Some((id, answer, slot))
    })?;
    let _ = early.set((id, slot));
    Some(Admitted {
        welcome: answer,
        identity: None,
        slot: None,
    })
}

/// Runs the authenticator: inline if it is synchronous, else awaited for at
/// most `ServerOptions::auth_timeout` (503 past it). Only this connection's
/// upgrade waits.
async fn authenticate(
    shared: &ServerShared,
    auth: &Authenticator,
    req: AuthRequest,
) -> Result<Option<String>, http::HttpRefusal> {
    let started = shared.runtime.now();
    let verdict = match auth.check(req) {
        Verdict::Ready(v) => v,
        Verdict::Pending(check) => {
            match util::timeout(&*shared.runtime, shared.options.auth_timeout, check).await {
                Some(v) => v,
                None => {
                    debug!(limit = ?shared.options.auth_timeout, "authentication timed out");
                    return Err(http::HttpRefusal::new(503, "authentication timed out")
                        .retry_after(shared.options.retry_after));
                }
            }
        }
    };
    metrics::histogram!("kitestring_auth_duration_seconds")
        .record(shared.runtime.now().saturating_duration_since(started));
    match verdict {
        Ok(identity) => Ok(identity),
        Err(AuthReject::Forbidden) => Err(http::HttpRefusal::new(403, "forbidden")),
        Err(AuthReject::Unauthorized) => Err(http::HttpRefusal::new(401, "unauthorized")),
        // Says when to come back, as the in-band form's `retry` does.
        Err(AuthReject::Unavailable) => Err(http::HttpRefusal::new(
            503,
            "authentication unavailable; try again later",
        )
        .retry_after(shared.options.retry_after)),
    }
}

/// Runs a `hello` from the request's URL through the core as the
/// connection's first frame: its answer is queued for the connection and
/// goes out right after the `101`. `None` while shutting down or without
/// randomness for a session id: the connection then takes the ordinary
/// path (the client sends its `hello` as a frame only after its connect
/// timeout, so this is the rare case).
fn request_hello(shared: &ServerShared, identity: Option<String>, hello: &[u8]) -> Option<Early> {
    let hello = std::str::from_utf8(hello).unwrap_or("\u{fffd}");
    let fresh = util::random16().ok()?;
    shared.run(None, |st, now| {
        if st.shutdown.is_some() || st.stopped {
            return None;
        }
        let id = st
            .server
            .handle_request_hello(now, identity, SessionId(fresh), hello);
        let slot = SlotRef::default();
        st.conns.insert(id, slot.clone());
        Some((id, slot))
    })
}

/// Runs a `hello` from the upgrade request through the core, before the
/// `101` goes out: the connection is open at once, and its answer goes in
/// the response. `None` while shutting down or without randomness for a
/// session id: the connection then takes the ordinary path.
fn early_hello(
    shared: &ServerShared,
    identity: Option<String>,
    hello: &[u8],
) -> Option<(ConnectionId, Option<String>, SlotRef)> {
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
        let slot = SlotRef::default();
        st.conns.insert(id, slot.clone());
        Some((id, answer, slot))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::feed::SharedFeed;

    use async_tungstenite::tungstenite::Message;
    use kitestring_core::server::RoomEntry;
    use kitestring_core::stream::HistoryConfig;
    use kitestring_core::wire::{Codec, MsgKind, Payload, StreamEntry};

    #[test]
    fn a_503_refused_in_band_carries_its_own_hint() {
        let ten = Duration::from_secs(10);
        // The authenticator's 503 has Retry-After: its `retry` is the same.
        let unavailable = http::HttpRefusal::new(503, "unavailable").retry_after(ten);
        assert_eq!(
            in_band_form(&unavailable, ten),
            Some(UpgradeRefusal::TryLater { retry_after: ten })
        );
        // A session still moving: none, so a short `retry`, as a client
        // reading the status would back off.
        assert_eq!(
            in_band_form(&SESSION_MOVING, ten),
            Some(UpgradeRefusal::TryLater {
                retry_after: UNHINTED_RETRY
            })
        );
        assert_eq!(UNHINTED_RETRY, Duration::from_secs(1));
        let unauthorized = http::HttpRefusal::new(401, "no");
        assert_eq!(
            in_band_form(&unauthorized, ten),
            Some(UpgradeRefusal::Unauthorized)
        );
        let origin = http::HttpRefusal::new(403, ORIGIN_REFUSED);
        assert_eq!(in_band_form(&origin, ten), Some(UpgradeRefusal::Origin));
        let forbidden = http::HttpRefusal::new(403, "no");
        assert_eq!(
            in_band_form(&forbidden, ten),
            Some(UpgradeRefusal::Forbidden)
        );
        assert_eq!(in_band_form(&http::HttpRefusal::bad("form"), ten), None);
    }

    /// A slot holding frames `a` (stamp 0), `b` (1) and `c` (3), and a
    /// follow of a feed from offset 1 that began at stamp 2, holding
    /// `entries` entries.
    fn slot(entries: u64) -> SlotRef {
        let feed = SharedFeed::new(7, 1);
        for offset in 1..=entries {
            let entry = StreamEntry {
                room: Arc::from("lobby"),
                offset,
                kind: MsgKind::Plain,
                ts: None,
                payload: Payload::binary(vec![0]),
            };
            let bounds = HistoryConfig {
                max_entries: 16,
                max_bytes: 1 << 20,
            };
            feed.push(
                offset,
                RoomEntry::new(entry, None),
                &bounds,
                &mut crate::server::feed::WakeList::new(),
            );
        }
        let slot = SlotRef::default();
        {
            let mut s = lock_slot(&slot);
            s.out.push_back((0, Message::text("a")));
            s.out.push_back((1, Message::text("b")));
            s.out.push_back((3, Message::binary(vec![b'c'])));
            s.follows.push(FollowOp::Follow {
                room: Arc::from("lobby"),
                feed,
                next: 1,
                start: 2,
                session: SessionId([1; 16]),
                codec: Codec::MsgPack,
            });
        }
        slot
    }

    /// What goes with the `101`: every queued frame while the followed
    /// feed holds nothing the connection must write first; only those
    /// queued before its entries otherwise; nothing once closing.
    #[test]
    fn queued_frames_go_with_the_101_up_to_the_first_feed_entry_due() {
        let head = b"HTTP/1.1 101 Switching Protocols\r\n\r\n".to_vec();
        let s = slot(0);
        let mut response = head.clone();
        take_queued(&s, &mut response);
        assert_eq!(&response[head.len()..], b"\x81\x01a\x81\x01b\x82\x01c");
        assert!(lock_slot(&s).out.is_empty());

        let s = slot(1);
        let mut response = head.clone();
        take_queued(&s, &mut response);
        assert_eq!(&response[head.len()..], b"\x81\x01a\x81\x01b");
        let left: Vec<u64> = lock_slot(&s).out.iter().map(|(stamp, _)| *stamp).collect();
        assert_eq!(left, [3], "the frame after the entry waits for the task");

        let s = slot(0);
        lock_slot(&s).closing = true;
        let mut response = head.clone();
        take_queued(&s, &mut response);
        assert_eq!(response, head);
    }
}
