//! Kitestring on an axum router: HTTP routes and Kitestring sessions on one
//! port.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use axum::{routing::get, Router};
//! use kitestring::ServerOptions;
//!
//! let (server, _events) = kitestring::start(kitestring_tokio::runtime(), ServerOptions::default())?;
//! let app = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .route("/ws", kitestring_axum::route(server));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```
//!
//! The upgrade is the library's, not the application's: the request is
//! checked, authenticated and answered by
//! [`ServerHandle::serve`](kitestring::ServerHandle::serve) (which also
//! serves the HTTP fallback for clients whose upgrades are blocked), exactly as
//! `kitestring::bind`'s own listener answers (the same statuses for refused
//! upgrades, the client's `hello` answered in the `101`'s
//! `Kitestring-Welcome` header so a session opens without another round
//! trip), and the upgraded connection is served with the limits of
//! [`ServerOptions`](kitestring::ServerOptions), set once. The
//! authenticator ([`ServerOptions::auth`](kitestring::ServerOptions::auth))
//! sees the request's headers and its extensions: what an axum middleware
//! put there (the user its login check found, say) is
//! [`AuthRequest::extension`](kitestring::AuthRequest::extension). With
//! `into_make_service_with_connect_info::<SocketAddr>()`, it sees the
//! peer's address too.
//!
//! Three forms, for three ways of building a router:
//!
//! * [`route`]: a route, `Router::route("/ws", route(server))`;
//! * [`KitestringService`]: a tower service, for `Router::route_service`
//!   or any tower stack;
//! * [`KitestringLayer`]: a layer that serves one path and passes every
//!   other request on, as socketioxide's layer does.
//!
//! `axum::serve` leaves Nagle's algorithm on, which can hold a small frame
//! back for tens of milliseconds; Kitestring's own listener turns it off.
//! Do the same for the listener you give axum:
//! `listener.tap_io(|tcp| { let _ = tcp.set_nodelay(true); })`
//! (`axum::serve::ListenerExt`).
//!
//! This crate owns only the translation to axum's and tower's types; it
//! must never check, authenticate or answer an upgrade itself.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::{ConnectInfo, Request};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, MethodRouter};
use kitestring::ServerHandle;

pub use kitestring;

/// A boxed, sendable future: what the services here return.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The peer's address, when the server was started with
/// `into_make_service_with_connect_info::<SocketAddr>()`.
fn peer<B>(req: &axum::http::Request<B>) -> Option<SocketAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| *addr)
}

/// Answers one request (an upgrade, or one of the HTTP fallback's): the
/// response to send.
fn upgrade<B>(
    server: &ServerHandle,
    req: axum::http::Request<B>,
) -> impl Future<Output = Response> + Send + 'static
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let peer = peer(&req);
    let answer = server.serve(req, peer);
    async move { answer.await.into_response() }
}

/// A route that upgrades every request to a Kitestring connection of
/// `server`: `Router::new().route("/ws", kitestring_axum::route(server))`.
///
/// It takes every method: the HTTP fallback (PROTOCOL.md, section 1.1)
/// uses `GET`, `POST` and `OPTIONS` on the same path, and any other
/// request gets the same answer as from the built-in listener (405 with
/// `allow: GET` for a `POST`, 426 for a plain `GET`).
pub fn route<S>(server: ServerHandle) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    any(move |req: Request| upgrade(&server, req))
}

/// A tower service that upgrades every request to a Kitestring connection:
/// `Router::route_service("/ws", KitestringService::new(server))`.
#[derive(Clone, Debug)]
pub struct KitestringService {
    server: ServerHandle,
}

impl KitestringService {
    /// A service upgrading requests for `server`.
    pub fn new(server: ServerHandle) -> Self {
        KitestringService { server }
    }
}

impl<B> tower_service::Service<axum::http::Request<B>> for KitestringService
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
        let answer = upgrade(&self.server, req);
        Box::pin(async move { Ok(answer.await) })
    }
}

/// A layer that serves Kitestring on one path and passes every other
/// request to the service it wraps:
/// `Router::new().route(..).layer(KitestringLayer::new(server, "/ws"))`.
///
/// axum applies a router's layers to its routes and its fallback, so the
/// path needs no route of its own.
#[derive(Clone)]
pub struct KitestringLayer {
    server: ServerHandle,
    path: Arc<str>,
}

impl KitestringLayer {
    /// Serves `server` on requests whose path is exactly `path` (e.g.
    /// `"/ws"`).
    pub fn new(server: ServerHandle, path: impl Into<String>) -> Self {
        KitestringLayer {
            server,
            path: Arc::from(path.into()),
        }
    }
}

impl fmt::Debug for KitestringLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KitestringLayer")
            .field("path", &self.path)
            .finish()
    }
}

impl<S> tower_layer::Layer<S> for KitestringLayer {
    type Service = KitestringMiddleware<S>;

    fn layer(&self, inner: S) -> KitestringMiddleware<S> {
        KitestringMiddleware {
            inner,
            server: self.server.clone(),
            path: self.path.clone(),
        }
    }
}

/// The service [`KitestringLayer`] makes.
#[derive(Clone)]
pub struct KitestringMiddleware<S> {
    inner: S,
    server: ServerHandle,
    path: Arc<str>,
}

impl<S> fmt::Debug for KitestringMiddleware<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KitestringMiddleware")
            .field("path", &self.path)
            .finish()
    }
}

impl<S, B> tower_service::Service<axum::http::Request<B>> for KitestringMiddleware<S>
where
    S: tower_service::Service<axum::http::Request<B>, Response = Response>,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
        if req.uri().path() == &*self.path {
            let answer = upgrade(&self.server, req);
            Box::pin(async move { Ok(answer.await) })
        } else {
            Box::pin(self.inner.call(req))
        }
    }
}
