//! Upgrades for hyper-based HTTP servers (hyper itself, axum, and anything
//! else that hands over a hyper `Request`): [`ServerHandle::upgrade`] and
//! the hyper service [`UpgradeService`], so that HTTP routes and Kitestring
//! share one port.
//!
//! It owns only the translation between hyper's types and the driver's: the
//! request's form is checked by `http::check` and the request admitted by
//! `upgrade::admit`, the same code the built-in listener runs (origin
//! policy, authenticator, a `hello` in the upgrade answered in the `101`'s
//! `Kitestring-Welcome` header), and the upgraded socket is served by the
//! same connection task with the configured limits. It must never check,
//! authenticate or answer anything in a way of its own.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};

use async_tungstenite::tungstenite::http::{self as h, Request, Response, StatusCode, Version};
use async_tungstenite::tungstenite::protocol::Role;
use async_tungstenite::WebSocketStream;
use futures_io::{AsyncRead, AsyncWrite};
use hyper::upgrade::{OnUpgrade, Upgraded};
use tracing::{debug, Instrument};

use crate::runtime::{BoxFuture, BoxIo};
use crate::{util, ws};

use super::auth::AuthRequest;
use super::conn::{connection, report_closed};
use super::fallback;
use super::http::{self, HttpRefusal};
use super::shared::ServerShared;
use super::upgrade::{admit, refused, Early};
use super::ServerHandle;

impl ServerHandle {
    /// Answers a WebSocket upgrade request that a hyper-based server (hyper,
    /// axum, ...) received, exactly as the built-in listener would: the
    /// request's form is checked (400, 405, 426), then the origin policy
    /// (403), the authenticator (401, 403, 503: it sees the request's
    /// headers, path, query and extensions, and `peer`), and a `hello` in
    /// the request is answered in the `101`'s `Kitestring-Welcome` header.
    /// Returns the response to send; once the HTTP server has sent a `101`
    /// and handed over the connection, the session runs on it with the
    /// server's configured limits.
    ///
    /// The HTTP server must allow upgrades on its connections (hyper:
    /// `http1::Builder::serve_connection(..).with_upgrades()`; axum's
    /// `serve` does). Only HTTP/1.1 upgrades are served. TLS, if any, is the
    /// HTTP server's: [`ServerOptions::tls`](super::ServerOptions::tls)
    /// does not apply here, and the upgrade is bounded by
    /// [`ServerOptions::handshake_timeout`](super::ServerOptions::handshake_timeout)
    /// from the response on.
    pub fn upgrade<B>(
        &self,
        mut req: Request<B>,
        peer: Option<SocketAddr>,
    ) -> impl std::future::Future<Output = Response<String>> + Send + 'static {
        let on_upgrade = req.extensions_mut().remove::<OnUpgrade>();
        let (parts, _body) = req.into_parts();
        let shared = self.shared.clone();
        let span = tracing::debug_span!("kitestring_upgrade", ?peer, via = "hyper");
        async move { upgrade(shared, parts, on_upgrade, peer).await }.instrument(span)
    }

    /// Answers any request for the Kitestring endpoint that a hyper-based
    /// server received: a request of the HTTP fallback (PROTOCOL.md,
    /// section 1.1: its query has `kitestring-http`) is served as the
    /// built-in listener serves it, with the same admission as an
    /// upgrade; every other request is handed to
    /// [`upgrade`](Self::upgrade). Routes should send every method here
    /// (the fallback uses `GET`, `POST` and `OPTIONS`).
    pub fn serve<B>(
        &self,
        req: Request<B>,
        peer: Option<SocketAddr>,
    ) -> impl std::future::Future<Output = Response<FallbackBody>> + Send + 'static
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        serve_request(self.shared.clone(), req, peer)
    }

    /// A hyper service that answers every request with
    /// [`serve`](Self::serve): for a connection that serves nothing but
    /// Kitestring (`serve_connection(io, handle.hyper_service(peer))
    /// .with_upgrades()`). Servers with other routes call `serve` from
    /// their own service instead.
    pub fn hyper_service(&self, peer: Option<SocketAddr>) -> UpgradeService {
        UpgradeService {
            handle: self.clone(),
            peer,
        }
    }
}

/// A hyper service that serves every request it gets as Kitestring's
/// endpoint: upgrades and the HTTP fallback ([`ServerHandle::hyper_service`]).
#[derive(Clone, Debug)]
pub struct UpgradeService {
    handle: ServerHandle,
    peer: Option<SocketAddr>,
}

/// The body of [`ServerHandle::serve`]'s answers.
pub type FallbackBody = http_body_util::Full<bytes::Bytes>;

impl<B> hyper::service::Service<Request<B>> for UpgradeService
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<FallbackBody>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<FallbackBody>, Infallible>>;

    fn call(&self, req: Request<B>) -> Self::Future {
        let answer = self.handle.serve(req, self.peer);
        Box::pin(async move { Ok(answer.await) })
    }
}

/// [`ServerHandle::serve`] on the server's shared state: the built-in
/// listener's HTTP connections (those whose first request is the
/// fallback's) are served by it too.
pub(super) fn serve_request<B>(
    shared: Arc<ServerShared>,
    mut req: Request<B>,
    peer: Option<SocketAddr>,
) -> impl std::future::Future<Output = Response<FallbackBody>> + Send + 'static
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let ask = http::fallback_ask(req.method().as_str(), req.uri().query())
        .filter(|_| shared.options.http_fallback.is_some());
    let on_upgrade = req.extensions_mut().remove::<OnUpgrade>();
    async move {
        let text = |r: Response<String>| r.map(|b| FallbackBody::new(bytes::Bytes::from(b)));
        match ask {
            Some(Ok(ask)) => {
                let (parts, body) = req.into_parts();
                let span = tracing::debug_span!("kitestring_http_request", ?peer);
                fallback::serve(shared, ask, parts, body, peer)
                    .instrument(span)
                    .await
            }
            Some(Err(refusal)) => {
                refused(peer, &refusal);
                text(refusal_response(&refusal))
            }
            None => {
                let (parts, _body) = req.into_parts();
                let span = tracing::debug_span!("kitestring_upgrade", ?peer, via = "hyper");
                text(
                    upgrade(shared, parts, on_upgrade, peer)
                        .instrument(span)
                        .await,
                )
            }
        }
    }
}

/// Serves an HTTP connection the built-in listener accepted, whose first
/// request (`head`, with what was read behind it) is the fallback's: hyper
/// reads it and the requests that follow on the connection (kept alive),
/// each answered by [`serve_request`]. Idle connections are closed after
/// the handshake timeout without a complete request head.
pub(super) async fn serve_http(
    shared: Arc<ServerShared>,
    io: BoxIo,
    read: Vec<u8>,
    peer: Option<SocketAddr>,
) {
    let service = {
        let shared = shared.clone();
        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let answer = serve_request(shared.clone(), req, peer);
            async move { Ok::<_, Infallible>(answer.await) }
        })
    };
    let io = crate::hyper_io::FuturesIo::new(io, read);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(RuntimeTimer(shared.runtime.clone()))
        .header_read_timeout(shared.options.handshake_timeout)
        .max_buf_size(http::MAX_HEAD.max(8192) * 2)
        .serve_connection(io, service)
        .with_upgrades();
    if let Err(e) = conn.await {
        debug!(?peer, error = %e, "fallback HTTP connection ended");
    }
}

/// hyper's timers on the driver's runtime.
#[derive(Clone)]
pub(crate) struct RuntimeTimer(pub(crate) Arc<dyn crate::runtime::Runtime>);

/// One of [`RuntimeTimer`]'s sleeps (behind a lock: hyper wants `Sync`).
struct RuntimeSleep(std::sync::Mutex<Pin<Box<dyn crate::runtime::AsyncTimer>>>);

impl std::future::Future for RuntimeSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        t.as_mut().poll(cx)
    }
}

impl hyper::rt::Sleep for RuntimeSleep {}

impl hyper::rt::Timer for RuntimeTimer {
    fn sleep(&self, duration: std::time::Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(self.0.now() + duration)
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(RuntimeSleep(std::sync::Mutex::new(
            self.0.new_timer(deadline),
        )))
    }
}

/// Checks and admits the request; on success, spawns the task that takes
/// the connection over once the `101` is out.
async fn upgrade(
    shared: Arc<ServerShared>,
    mut parts: h::request::Parts,
    on_upgrade: Option<OnUpgrade>,
    peer: Option<SocketAddr>,
) -> Response<String> {
    let early = OnceLock::new();
    let answer = async {
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let req = http::check(
            parts.method.as_str(),
            target,
            parts.version == Version::HTTP_11,
            parts
                .headers
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_bytes())),
        )?;
        // A request hyper cannot hand over (not from a hyper connection, or
        // not one that allows upgrades).
        let Some(on_upgrade) = on_upgrade else {
            return Err(HttpRefusal::new(
                500,
                "this HTTP server cannot hand the connection over",
            ));
        };
        let admitted = admit_request(
            &shared,
            &req,
            &parts.headers,
            &mut parts.extensions,
            peer,
            &early,
        )
        .await?;
        let accept = http::accept_key(req.key);
        let mut response = Response::builder().status(StatusCode::SWITCHING_PROTOCOLS);
        for (name, value) in http::upgrade_headers(&accept, admitted.welcome.as_deref()) {
            response = response.header(name, value);
        }
        let response = response
            .body(String::new())
            .map_err(|_| HttpRefusal::new(500, "cannot build the 101 response"))?;
        Ok((response, on_upgrade, admitted.identity))
    }
    .await;
    let early = early.into_inner();
    match answer {
        Ok((response, on_upgrade, identity)) => {
            // Not under the upgrade's span: the connection is not part of
            // the request, as with the built-in listener.
            let task = take_over(shared.clone(), on_upgrade, identity, early, peer);
            shared.runtime.spawn(Box::pin(task));
            response
        }
        Err(refusal) => {
            if let Some((id, _)) = early {
                report_closed(&shared, id, None);
            }
            refused(peer, &refusal);
            refusal_response(&refusal)
        }
    }
}

/// [`admit`] for a request hyper read: the authenticator sees its path,
/// query, headers, extensions (taken from the request) and `peer`.
pub(super) async fn admit_request(
    shared: &ServerShared,
    req: &http::Upgrade<'_>,
    headers: &h::HeaderMap,
    extensions: &mut h::Extensions,
    peer: Option<SocketAddr>,
    early: &OnceLock<Early>,
) -> Result<super::upgrade::Admitted, HttpRefusal> {
    admit(
        shared,
        req,
        || {
            let mut auth =
                AuthRequest::new(req.path, req.query.map(str::to_owned), headers.clone());
            auth.extensions = std::mem::take(extensions);
            auth.peer = peer;
            Ok(auth)
        },
        early,
    )
    .await
}

/// The refusal as a response: the same status, headers and one-line body
/// the built-in listener sends.
fn refusal_response(refusal: &HttpRefusal) -> Response<String> {
    let mut response = Response::builder()
        .status(refusal.status)
        .header("connection", refusal.connection())
        .header("content-type", "text/plain; charset=utf-8")
        .header(
            kitestring_core::wire::records::REFUSAL_HEADER,
            refusal.status.to_string(),
        );
    for (name, value) in refusal.extra_headers() {
        response = response.header(name, value);
    }
    response.body(refusal.body()).unwrap_or_else(|_| {
        let mut r = Response::new(String::new());
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        r
    })
}

/// Waits (bounded by the handshake timeout) for hyper to hand the
/// connection over after the `101`, then serves it like any other.
async fn take_over(
    shared: Arc<ServerShared>,
    on_upgrade: OnUpgrade,
    identity: Option<String>,
    early: Option<Early>,
    peer: Option<SocketAddr>,
) {
    let limit = shared.options.handshake_timeout;
    match util::timeout(&*shared.runtime, limit, on_upgrade).await {
        Some(Ok(upgraded)) => {
            let io: BoxIo = Box::new(HyperIo(upgraded));
            let config = Some(ws::websocket_config(shared.options.config.max_message_size));
            // Bytes the client sent behind its request are kept by hyper in
            // `Upgraded` and come first out of it.
            let ws = WebSocketStream::from_raw_socket(io, Role::Server, config).await;
            connection(shared, ws, identity, early).await;
        }
        failed => {
            debug!(?peer, error = ?failed.map(|r| r.err()), "the HTTP server did not hand the connection over");
            if let Some((id, _)) = early {
                report_closed(&shared, id, None);
            }
        }
    }
}

/// hyper's upgraded connection as a futures-io stream (hyper's own IO
/// traits, so no runtime's compatibility layer is needed).
struct HyperIo(Upgraded);

impl AsyncRead for HyperIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let mut read = hyper::rt::ReadBuf::new(buf);
        ready!(hyper::rt::Read::poll_read(
            Pin::new(&mut self.0),
            cx,
            read.unfilled()
        ))?;
        Poll::Ready(Ok(read.filled().len()))
    }
}

impl AsyncWrite for HyperIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        hyper::rt::Write::poll_write(Pin::new(&mut self.0), cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        hyper::rt::Write::poll_write_vectored(Pin::new(&mut self.0), cx, bufs)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        hyper::rt::Write::poll_flush(Pin::new(&mut self.0), cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        hyper::rt::Write::poll_shutdown(Pin::new(&mut self.0), cx)
    }
}
