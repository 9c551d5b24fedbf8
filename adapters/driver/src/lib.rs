//! Kitestring: WebSocket sessions that stay alive and lose nothing.
//!
//! Reconnects with backoff, heartbeats that detect half-open sockets,
//! session resume and exactly-once, in-order delivery in both directions,
//! on tokio, async-std or smol. This crate is the runtime-agnostic driver:
//! it owns the sockets (WebSocket by `async-tungstenite`, TLS by rustls via
//! `futures-rustls`) and runs the IO-free [`kitestring_core`] machines. A
//! runtime crate supplies the [`Runtime`]:
//!
//! * `kitestring-tokio`
//! * `kitestring-smol`
//! * `kitestring-async-std` (async-std is discontinued upstream, which
//!   recommends smol; it keeps working here for the users on it)
//!
//! # Client
//!
//! ```no_run
//! # async fn demo(runtime: std::sync::Arc<dyn kitestring::Runtime>) -> Result<(), Box<dyn std::error::Error>> {
//! use futures_util::StreamExt;
//! use kitestring::{ClientOptions, DecodeExt, Event};
//!
//! let (client, mut events) = kitestring::connect(runtime, "ws://127.0.0.1:9000/ws", ClientOptions::default())?;
//! client.send(&("hello", 1)).await?; // queued until the session opens
//! while let Some(event) = events.next().await {
//!     if let Event::Message(m) = event {
//!         let (text, n): (String, u32) = m.decode()?;
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # Server
//!
//! [`bind`] serves a port. A hyper-based HTTP server (hyper, axum) shares
//! its port with Kitestring: `ServerHandle::serve` answers its requests
//! for the endpoint exactly as the built-in listener does (authentication,
//! the handshake in the upgrade, the limits, and the HTTP fallback for
//! clients whose upgrades are blocked: PROTOCOL.md, section 1.1);
//! `kitestring-axum` makes that an axum route, service or layer. See
//! [`server`] for the task layout and the backpressure policy.
//!
//! # Transports
//!
//! A client tries WebSocket and falls back to HTTP requests (long polls
//! and posts on the same URL) when a proxy on the way blocks the upgrade;
//! it moves back once upgrades go through again
//! ([`ClientOptions::transports`], [`ClientOptions::fallback_memory`]).
//!
//! # Features
//!
//! * `hyper`: kept for manifests that name it; what it enabled is always
//!   built, since the HTTP fallback is served and spoken through hyper.
//! * `async-io`: the timer and listener shared by the async-std and smol
//!   runtime crates.
//!
//! # Observability
//!
//! Metrics go through the [`metrics`](https://docs.rs/metrics) facade to
//! whatever recorder the application installs (before [`bind`]); spans and
//! events through `tracing`. README.md lists every metric and span.
//!
//! # Rooms and requests
//!
//! ```no_run
//! # async fn demo(runtime: std::sync::Arc<dyn kitestring::Runtime>, session: kitestring::SessionId) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use kitestring::{ClientOptions, ServerOptions};
//!
//! let (server, _server_events) = kitestring::bind(runtime.clone(), "127.0.0.1:9000".parse()?, ServerOptions::default())?;
//! server.join(session, "lobby").await?;              // the application decides
//! let reached = server.broadcast("lobby", &("hi", 1)).await?; // serialized once
//! let metrics = server.metrics().await?;
//!
//! let (client, _events) = kitestring::connect(runtime, "ws://127.0.0.1:9000/", ClientOptions::default())?;
//! client.join("lobby").await?;                      // presence arrives as events
//! client.publish("lobby", &"hello, room").await?;
//! let answer = client.request(&"what time is it?", Duration::from_secs(5)).await?;
//! # let _ = (reached, metrics, answer); Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

#[cfg(feature = "async-io")]
pub mod async_io;
pub mod backplane;
pub mod client;
mod drive;
pub mod error;
mod head;
mod hyper_io;
pub mod runtime;
pub mod server;
pub mod util;
pub mod ws;

pub use backplane::{Backplane, BackplaneError};
pub use client::{
    connect, token_provider, ClientEvents, ClientHandle, ClientOptions, ClientSnapshot,
    PendingResponse, TokenProvider, TransportKind, Transports, DATAGRAM_BACKLOG,
};
pub use error::{ClientError, CodecError, ConnectError, ServeError, ServerError};
pub use runtime::{AsyncListener, AsyncTimer, BoxFuture, BoxIo, Io, Runtime};
pub use server::{
    bind, start, AuthReject, AuthRequest, AuthResult, Authenticator, HttpFallback, OriginPolicy,
    Refusals, SentTo, ServerEvents, ServerHandle, ServerOptions, SessionLocation, TokenValidator,
};
pub use server::{FallbackBody, UpgradeService};
pub use util::{decode, encode, DecodeExt};
pub use ws::{websocket_config, ClientTls, ServerTls};

pub use kitestring_core;
pub use kitestring_core::client::{
    ClientStats, Event, FailReason, LostReason, Received, RequestError, State,
};
pub use kitestring_core::close::CloseCode;
pub use kitestring_core::config::{Acknowledge, ClientConfig, CompressionConfig, ServerConfig};
pub use kitestring_core::hlc::HlcTimestamp;
pub use kitestring_core::reliable::{MessageId, SendError};
pub use kitestring_core::rooms::{Member, PolicyFn, Presence, Refusal, RoomPolicy};
pub use kitestring_core::server::{
    ConnectionId, MapError, MapOptions, MapWriters, RoomError, RoomOp, ServerEvent, ServerMetrics,
    ServerStats, SessionEnd, SessionInfo, Stamping,
};
pub use kitestring_core::wire::{Codec, Payload, PayloadKind, SessionId};

pub use async_tungstenite;
pub use rustls;
