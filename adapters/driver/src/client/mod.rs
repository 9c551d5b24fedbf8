//! The client driver: the core [`Client`] machine, shared by the handles and
//! one task that owns the WebSocket, and the handle and event stream the
//! application uses.
//!
//! The layout is quinn's: the machine and the bookkeeping the handles need
//! (acknowledgment waiters, pending requests, close replies) sit behind one
//! mutex that every [`ClientHandle`] and the driver task share. A handle
//! call locks it, runs the core's command with the current time, records
//! what it will wait for, unlocks and wakes the task; it never waits for the
//! task, except for what it asked for (an acknowledgment, a response, the end
//! of a close, or room to send with `ready` and `send_when_ready`). The task, on each wake-up, takes the lock once: it feeds in
//! everything that is ready (several socket frames, a connection attempt
//! finishing, an old socket finishing its close, a fresh token, the core's
//! deadline), drains every output of the core into its own queues (frames
//! for the socket, events for the application, connects and closes) and
//! settles the waiters those events resolve; then it unlocks and does the IO.
//! Sockets are keyed by the core's `TransportId`: a socket whose transport
//! the core has left is closed and dropped, and any late report about it is
//! ignored by the core, so nothing from a dead connection (a frame, an
//! error, a timer) can touch a new one. There is a single deadline timer,
//! re-armed from `poll_timeout` after every step, and the clock is checked
//! before the timer is trusted.
//!
//! Bounds: nothing queues between the handles and the task. A handle call
//! runs the core directly under a short lock and never waits for room
//! (unless it is `ready` or a `*_when_ready` call, which wait for exactly
//! that); what
//! it leaves behind is bounded by the core (its queue and send window for
//! messages, [`ClientConfig::max_pending_requests`] for requests), and the
//! waiter maps hold one entry per message or request the core accepted.
//! Events wait for the application in a queue behind the same lock, of
//! [`ClientOptions::event_buffer`] entries; while the application leaves it
//! full the task stops reading the socket (the events of at most one batch of
//! frames, and those handle calls and timers cause, go beyond it) but keeps
//! writing, and handle calls keep working, so keep consuming events.
//! Frames waiting for the socket are bounded by the core's send window plus
//! control frames; datagrams, which the core does not queue, are refused
//! while [`DATAGRAM_BACKLOG`] frames wait.
//!
//! # Where things are
//!
//! This module holds the options and [`connect`], which builds the shared
//! state and spawns the driver task. The rest lives in private modules
//! beside it: `shared` (the machine and the bookkeeping behind the lock),
//! `handle` ([`ClientHandle`], [`ClientEvents`] and what their calls
//! return), `connector` (opening one WebSocket), `upgrade` (the upgrade
//! request and the check of its answer), `http` (the HTTP fallback's
//! client) and `task` (the driver task).

mod connector;
mod handle;
mod http;
mod shared;
mod task;
mod upgrade;

pub use handle::{ClientEvents, ClientHandle, ClientSnapshot, PendingResponse};

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU8, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_tungstenite::tungstenite::http::Uri;
use futures_util::task::AtomicWaker;
use kitestring_core::client::transport::TransportChoice;
pub use kitestring_core::client::transport::{TransportKind, Transports};
use kitestring_core::client::Client;
use kitestring_core::config::ClientConfig;
use kitestring_core::wire::{ClientId, Codec};
use tracing::{warn, Instrument};

use crate::drive::Clock;
use crate::error::ConnectError;
use crate::runtime::{BoxFuture, Runtime};
use crate::util;
use crate::ws::{self, ClientTls};

use self::connector::Connector;
use self::shared::{codec_tag, ClientShared, Inner};
use self::task::Driver;

/// Frames waiting for the socket beyond which datagrams are refused
/// ([`ClientHandle::send_datagram`], [`ServerHandle::send_datagram`](crate::ServerHandle::send_datagram)).
pub const DATAGRAM_BACKLOG: usize = 256;

/// Asked for a fresh token before every connection attempt (it goes in the
/// upgrade request) and whenever the server asks for re-authentication
/// ([`Event::TokenExpiring`]; the driver answers with the token at once).
/// `None` means "no token".
///
/// [`Event::TokenExpiring`]: kitestring_core::client::Event::TokenExpiring
pub type TokenProvider = Arc<dyn Fn() -> BoxFuture<'static, Option<String>> + Send + Sync>;

/// Wraps an async closure as a [`TokenProvider`].
pub fn token_provider<F, Fut>(f: F) -> TokenProvider
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<String>> + Send + 'static,
{
    Arc::new(move || Box::pin(f()))
}

/// How a client connects.
#[derive(Clone)]
pub struct ClientOptions {
    /// The core machine's settings.
    pub config: ClientConfig,
    /// TLS settings; required for `wss://` URLs.
    pub tls: Option<ClientTls>,
    /// Called for a fresh token at every connect and reconnect. Setting it
    /// also sets [`ClientConfig::can_refresh_token`], so an HTTP 401 is
    /// retried once with a fresh token before the client fails.
    pub token: Option<TokenProvider>,
    /// The request header that carries the token. Default `authorization`.
    pub token_header: String,
    /// Put before the token in that header. Default `"Bearer "`.
    pub token_prefix: String,
    /// Events waiting for the application. Default 1024.
    pub event_buffer: usize,
    /// How long closing a socket may take before it is dropped. Default 2 s.
    pub close_timeout: Duration,
    /// Put the `hello` in the request URL (the query parameter
    /// `kitestring-hello`) instead of a request header, and take the
    /// answer as the first frame: the handshake a browser page makes
    /// (PROTOCOL.md, section 4.2), also for proxies that strip unknown
    /// headers. Default `false` (the header, [`ClientConfig::hello_in_upgrade`]).
    pub hello_in_url: bool,
    /// The transports the client may use: by default WebSocket, and the
    /// HTTP fallback (PROTOCOL.md, section 1.1) when an upgrade is blocked
    /// on the way (a proxy answers it, or strips its `Upgrade` header);
    /// never for a refusal by the server itself.
    pub transports: Transports,
    /// How long a blocked upgrade is remembered: connections go straight
    /// to the fallback meanwhile. Past it, a client on the fallback tests
    /// WebSocket with a bare upgrade (closed at once), and when that goes
    /// through moves its session to a WebSocket, resuming it; when it is
    /// blocked again, waits as long again. Default 2 minutes.
    pub fallback_memory: Duration,
    /// Rooms to join from the start, as [`ClientHandle::join`] called
    /// before the first connection: their joins ride in the first
    /// `hello` (at most 32 of them; PROTOCOL.md, section 4), so the
    /// session opens with its rooms after one round trip, with no `join`
    /// message of their own where the server announces `join`. Answers
    /// and refusals come as events, as for any join. Default none.
    pub rooms: Vec<String>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            config: ClientConfig::default(),
            tls: None,
            token: None,
            token_header: "authorization".into(),
            token_prefix: "Bearer ".into(),
            event_buffer: 1024,
            close_timeout: Duration::from_secs(2),
            hello_in_url: false,
            transports: Transports::Auto,
            fallback_memory: Duration::from_secs(120),
            rooms: Vec::new(),
        }
    }
}

impl fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientOptions")
            .field("config", &self.config)
            .field("tls", &self.tls.is_some())
            .field("token", &self.token.is_some())
            .field("event_buffer", &self.event_buffer)
            .field("hello_in_url", &self.hello_in_url)
            .field("transports", &self.transports)
            .field("fallback_memory", &self.fallback_memory)
            .field("rooms", &self.rooms)
            .finish()
    }
}

/// Starts a client for `url` (`ws://` or `wss://`) on `runtime` and returns
/// at once: connecting happens in the background and is reported on the
/// event stream. Messages sent before the session opens are queued.
pub fn connect(
    runtime: Arc<dyn Runtime>,
    url: &str,
    mut options: ClientOptions,
) -> Result<(ClientHandle, ClientEvents), ConnectError> {
    let target = util::parse_url(url)?;
    if target.tls && options.tls.is_none() {
        return Err(ConnectError::MissingTls);
    }
    // Parsed once: every connection attempt builds its request from it.
    let uri: Uri = target
        .url
        .parse()
        .map_err(|e| ConnectError::InvalidUrl(format!("{url}: {e}")))?;
    options.config.can_refresh_token = options.token.is_some();
    let client_id = ClientId(util::random16().map_err(|e| ConnectError::Random(e.to_string()))?);
    let preferred = options
        .config
        .codecs
        .first()
        .copied()
        .unwrap_or(Codec::Json);
    let ws_config = ws::websocket_config(options.config.max_message_size);
    let mut client = Client::new(options.config, client_id, util::random_seed())?;
    // The driver's clock starts at about this moment (`Clock::new`).
    client.set_wall_clock(kitestring_core::Instant::ZERO, util::unix_ms());
    let span = tracing::info_span!(
        "kitestring_client",
        client = %client_id,
        url = %target.url,
        session = tracing::field::Empty,
    );
    let clock = Clock::new(&*runtime);
    // Queued first, so that the first `hello` carries them.
    for room in &options.rooms {
        client
            .join(clock.now(&*runtime), room)
            .map_err(|error| ConnectError::Room {
                room: room.clone(),
                error,
            })?;
    }
    // Before any handle exists, so that no call (a close, say) comes first.
    if let Err(e) = client.connect(clock.now(&*runtime)) {
        span.in_scope(|| warn!(error = %e, "connect refused by the core"));
    }
    let shared = Arc::new(ClientShared {
        inner: Mutex::new(Inner {
            client,
            waiters: BTreeMap::new(),
            requests: BTreeMap::new(),
            close_replies: Vec::new(),
            stop_when_closed: false,
            stopped: false,
            events: VecDeque::new(),
            latest_queued: 0,
            events_waker: None,
            events_dropped: false,
            events_ended: false,
            reader_paused: false,
            room_waiters: Vec::new(),
        }),
        driver: AtomicWaker::new(),
        handles: AtomicUsize::new(1),
        runtime: runtime.clone(),
        clock,
        codec: AtomicU8::new(codec_tag(preferred)),
        unsent: AtomicUsize::new(0),
        span: span.clone(),
        event_room: options.event_buffer.max(1),
        queued: AtomicUsize::new(0),
        transport: AtomicU8::new(0),
    });
    let connector = Connector {
        runtime: runtime.clone(),
        target,
        uri,
        tls: options.tls,
        token: options.token,
        token_header: options.token_header,
        token_prefix: options.token_prefix,
        ws_config,
        hello_in_url: options.hello_in_url,
    };
    let driver = Driver::new(
        shared.clone(),
        runtime.clone(),
        connector,
        options.close_timeout,
        TransportChoice::new(options.transports, options.fallback_memory),
    );
    runtime.spawn(Box::pin(driver.run().instrument(span)));
    Ok((
        ClientHandle {
            shared: shared.clone(),
            client_id,
        },
        ClientEvents { shared },
    ))
}
