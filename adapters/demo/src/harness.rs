//! A server, a chaos proxy in front of it and many clients, with traffic
//! both ways, booked in a [`Ledger`].
//!
//! Written once against [`kitestring::Runtime`], so the demo and the chaos
//! tests run it on tokio, async-std and smol alike. Each client is tagged
//! by its index in the URL query (`?client=7`); the server's authenticator
//! turns it into the session's identity, so every server event can be
//! attributed without any shared table racing the handshake.
//!
//! Tasks: one event task per client, one server event task, and while
//! traffic runs one sender per client and direction. Every message is a
//! small binary payload `[client u32][seq u64][sent µs u64][padding]`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kitestring::kitestring_core::client::Cause;
use kitestring::{
    ClientError, ClientEvents, ClientHandle, ClientOptions, Event, Runtime, SendError, ServerError,
    ServerEvent, ServerEvents, ServerHandle, ServerOptions, SessionEnd, State,
};
use kitestring_chaos::Proxy;

use crate::ledger::{Direction, IncidentKind, Ledger};

/// Bytes of the fixed message header.
pub const HEADER: usize = 20;

/// What went wrong setting up or tearing down.
#[derive(Debug)]
pub enum HarnessError {
    /// The server could not start.
    Serve(kitestring::ServeError),
    /// A client could not be created.
    Connect(kitestring::ConnectError),
    /// The proxy could not start.
    Proxy(std::io::Error),
    /// Clients did not all connect in time.
    NotConnected {
        /// How many did.
        connected: usize,
        /// How many there are.
        clients: usize,
    },
}

impl std::fmt::Display for HarnessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HarnessError::Serve(e) => write!(f, "cannot start the server: {e}"),
            HarnessError::Connect(e) => write!(f, "cannot start a client: {e}"),
            HarnessError::Proxy(e) => write!(f, "cannot start the chaos proxy: {e}"),
            HarnessError::NotConnected { connected, clients } => {
                write!(f, "only {connected} of {clients} clients connected in time")
            }
        }
    }
}

impl std::error::Error for HarnessError {}

/// How to build the harness.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Number of clients.
    pub clients: usize,
    /// Server settings (the authenticator is set by the harness).
    pub server: ServerOptions,
    /// Client settings.
    pub client: ClientOptions,
    /// Extra payload bytes per message beyond the 20-byte header.
    pub padding: usize,
    /// Call `reconnect()` when a client enters `Failed`, as an application
    /// would (the failure is still recorded).
    pub reconnect_failed: bool,
    /// Clients that connect through a proxy of their own instead of the
    /// shared one, so that their connections can be faulted alone.
    pub own_proxy: Vec<usize>,
}

/// A running server, proxy and clients.
#[derive(Debug)]
pub struct Harness {
    rt: Arc<dyn Runtime>,
    /// The books.
    pub ledger: Arc<Ledger>,
    /// The chaos proxy the clients connect through (except those with a
    /// proxy of their own, see [`Harness::proxy_of`]).
    pub proxy: Arc<Proxy>,
    own: Vec<Option<Arc<Proxy>>>,
    /// The server.
    pub server: ServerHandle,
    /// The clients, by index.
    pub clients: Vec<ClientHandle>,
    padding: usize,
    traffic: Arc<AtomicBool>,
    senders: Arc<AtomicUsize>,
}

/// Encodes one message.
pub fn encode(client: usize, seq: u64, sent_us: u64, padding: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER + padding);
    b.extend_from_slice(&u32::try_from(client).unwrap_or(u32::MAX).to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&sent_us.to_le_bytes());
    b.resize(HEADER + padding, 0x5a);
    b
}

/// Decodes `(client, seq, sent µs)`.
pub fn decode(b: &[u8]) -> Option<(usize, u64, u64)> {
    let client = u32::from_le_bytes(b.get(0..4)?.try_into().ok()?);
    let seq = u64::from_le_bytes(b.get(4..12)?.try_into().ok()?);
    let sent = u64::from_le_bytes(b.get(12..20)?.try_into().ok()?);
    Some((usize::try_from(client).ok()?, seq, sent))
}

impl Harness {
    /// Starts the server, the proxy and every client, and waits (at most
    /// `connect_within`) until every client has connected once.
    pub async fn start(
        rt: Arc<dyn Runtime>,
        settings: Settings,
        connect_within: Duration,
    ) -> Result<Harness, HarnessError> {
        let ledger = Arc::new(Ledger::new(settings.clients));
        let mut server_options = settings.server.clone();
        server_options.auth = Some(kitestring::Authenticator::sync(
            |req: &kitestring::AuthRequest| Ok(req.query_param("client").map(str::to_owned)),
        ));
        let (server, events) = kitestring::bind(
            rt.clone(),
            SocketAddr::from(([127, 0, 0, 1], 0)),
            server_options,
        )
        .map_err(HarnessError::Serve)?;
        let addr = server
            .local_addr()
            .ok_or(HarnessError::Proxy(std::io::Error::other("no address")))?;
        rt.spawn(Box::pin(server_events(events, ledger.clone())));
        let proxy = Arc::new(Proxy::start(addr).map_err(HarnessError::Proxy)?);
        let mut clients = Vec::with_capacity(settings.clients);
        let mut own = Vec::with_capacity(settings.clients);
        for i in 0..settings.clients {
            let via = if settings.own_proxy.contains(&i) {
                let p = Arc::new(Proxy::start(addr).map_err(HarnessError::Proxy)?);
                own.push(Some(p.clone()));
                p
            } else {
                own.push(None);
                proxy.clone()
            };
            let url = format!("ws://{}/ws?client={i}", via.local_addr());
            let (handle, events) = kitestring::connect(rt.clone(), &url, settings.client.clone())
                .map_err(HarnessError::Connect)?;
            rt.spawn(Box::pin(client_events(
                i,
                handle.clone(),
                events,
                ledger.clone(),
                settings.reconnect_failed,
            )));
            clients.push(handle);
        }
        let h = Harness {
            rt,
            ledger,
            proxy,
            own,
            server,
            clients,
            padding: settings.padding,
            traffic: Arc::new(AtomicBool::new(false)),
            senders: Arc::new(AtomicUsize::new(0)),
        };
        let deadline = Instant::now() + connect_within;
        loop {
            let connected = h.ledger.connected_clients();
            let sessions = (0..settings.clients)
                .filter(|&i| h.ledger.session_of(i).is_some())
                .count();
            if connected == settings.clients && sessions == settings.clients {
                return Ok(h);
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::NotConnected {
                    connected,
                    clients: settings.clients,
                });
            }
            kitestring::util::sleep(&*h.rt, Duration::from_millis(20)).await;
        }
    }

    /// The proxy client `i` connects through.
    pub fn proxy_of(&self, i: usize) -> &Arc<Proxy> {
        match self.own.get(i) {
            Some(Some(p)) => p,
            _ => &self.proxy,
        }
    }

    /// The runtime everything runs on.
    pub fn runtime(&self) -> &Arc<dyn Runtime> {
        &self.rt
    }

    /// Starts one sender per client and direction, each sending `rate`
    /// messages per second until [`stop_traffic`](Self::stop_traffic).
    pub fn start_traffic(&self, rate: f64) {
        self.start_traffic_for(rate, &(0..self.clients.len()).collect::<Vec<_>>());
    }

    /// [`start_traffic`](Self::start_traffic) for some clients only.
    pub fn start_traffic_for(&self, rate: f64, which: &[usize]) {
        self.traffic.store(true, Ordering::SeqCst);
        let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
        let n = which.len().max(1) as u32;
        for (k, &i) in which.iter().enumerate() {
            // Spread the first sends over one interval.
            let offset = interval / n * u32::try_from(k).unwrap_or(0);
            for dir in [Direction::Up, Direction::Down] {
                let sender = self.sender(i, dir);
                let traffic = self.traffic.clone();
                let senders = self.senders.clone();
                let rt = self.rt.clone();
                senders.fetch_add(1, Ordering::SeqCst);
                self.rt.spawn(Box::pin(async move {
                    kitestring::util::sleep(&*rt, offset).await;
                    let mut next = Instant::now();
                    while traffic.load(Ordering::SeqCst) {
                        if sender.send_one(&traffic).await.is_err() {
                            break;
                        }
                        next += interval;
                        let now = Instant::now();
                        if next > now {
                            kitestring::util::sleep(&*rt, next - now).await;
                        } else if now - next > interval * 10 {
                            // Far behind (a long stall): do not burst to catch up.
                            next = now;
                        }
                    }
                    senders.fetch_sub(1, Ordering::SeqCst);
                }));
            }
        }
    }

    /// Puts every client's current session in `room` (server side).
    /// Returns how many joins failed.
    pub async fn join_all(&self, room: &str) -> usize {
        let mut failed = 0;
        for i in 0..self.clients.len() {
            let joined = match self.ledger.session_of(i) {
                Some(session) => kitestring::util::timeout(
                    &*self.rt,
                    Duration::from_secs(5),
                    self.server.join(session, room),
                )
                .await
                .is_some_and(|r| r.is_ok()),
                None => false,
            };
            failed += usize::from(!joined);
        }
        failed
    }

    /// Broadcasts to `room` `rate` times per second until
    /// [`stop_traffic`](Self::stop_traffic), booking each broadcast for
    /// every client.
    pub fn start_broadcasts(&self, room: &str, rate: f64) {
        self.traffic.store(true, Ordering::SeqCst);
        let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
        let traffic = self.traffic.clone();
        let senders = self.senders.clone();
        let rt = self.rt.clone();
        let server = self.server.clone();
        let ledger = self.ledger.clone();
        let room = room.to_owned();
        let padding = self.padding;
        senders.fetch_add(1, Ordering::SeqCst);
        self.rt.spawn(Box::pin(async move {
            while traffic.load(Ordering::SeqCst) {
                let seq = ledger.next_broadcast();
                let body = kitestring::Payload::binary(encode(0, seq, ledger.stamp(), padding));
                match kitestring::util::timeout(
                    &*rt,
                    Duration::from_secs(5),
                    server.broadcast_payload(&room, body, None),
                )
                .await
                {
                    Some(Ok(members)) => ledger.broadcast_accepted(seq, members),
                    _ => break,
                }
                kitestring::util::sleep(&*rt, interval).await;
            }
            senders.fetch_sub(1, Ordering::SeqCst);
        }));
    }

    /// Stops the senders and waits (at most `within`) for the ones in the
    /// middle of a send to finish. Returns whether they all did.
    pub async fn stop_traffic(&self, within: Duration) -> bool {
        self.traffic.store(false, Ordering::SeqCst);
        let deadline = Instant::now() + within;
        while self.senders.load(Ordering::SeqCst) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            kitestring::util::sleep(&*self.rt, Duration::from_millis(10)).await;
        }
        true
    }

    /// Sends `k` messages in each direction for every client in `which`,
    /// all clients concurrently, each stream in order. Returns the number
    /// of messages that could not be sent (refused for good or timed out).
    pub async fn send_round(&self, k: usize, which: &[usize]) -> usize {
        let go = Arc::new(AtomicBool::new(true));
        let mut jobs = Vec::new();
        for &i in which {
            for dir in [Direction::Up, Direction::Down] {
                let sender = self.sender(i, dir);
                let go = go.clone();
                jobs.push(async move {
                    let mut failed = 0;
                    for _ in 0..k {
                        if sender.send_one(&go).await.is_err() {
                            failed += 1;
                        }
                    }
                    failed
                });
            }
        }
        futures_util::future::join_all(jobs).await.into_iter().sum()
    }

    /// Sends `k` messages of `padding` extra bytes on one stream, in order.
    /// Returns how many could not be sent.
    pub async fn send_many(&self, i: usize, dir: Direction, k: usize, padding: usize) -> usize {
        let mut sender = self.sender(i, dir);
        sender.padding = padding;
        let go = AtomicBool::new(true);
        let mut failed = 0;
        for _ in 0..k {
            if sender.send_one(&go).await.is_err() {
                failed += 1;
            }
        }
        failed
    }

    fn sender(&self, i: usize, dir: Direction) -> Sender {
        Sender {
            rt: self.rt.clone(),
            ledger: self.ledger.clone(),
            client: self.clients[i].clone(),
            server: self.server.clone(),
            index: i,
            dir,
            padding: self.padding,
        }
    }

    /// Waits (at most `within`) until every accepted message has been
    /// delivered or named by the library. Returns whether it got there.
    pub async fn drain(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.ledger.outstanding() == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            kitestring::util::sleep(&*self.rt, Duration::from_millis(50)).await;
        }
    }

    /// Closes every client and shuts the server down, each bounded.
    pub async fn stop(self) {
        let rt = self.rt.clone();
        let closes = self.clients.iter().map(|c| {
            let rt = rt.clone();
            async move {
                let _ = kitestring::util::timeout(&*rt, Duration::from_secs(3), c.close()).await;
            }
        });
        futures_util::future::join_all(closes).await;
        let _ =
            kitestring::util::timeout(&*rt, Duration::from_secs(3), self.server.shutdown()).await;
    }
}

/// Sends one stream's messages.
struct Sender {
    rt: Arc<dyn Runtime>,
    ledger: Arc<Ledger>,
    client: ClientHandle,
    server: ServerHandle,
    index: usize,
    dir: Direction,
    padding: usize,
}

/// Why a message was given up (it was not accepted, so it is not booked).
#[derive(Debug)]
struct NotSent;

impl Sender {
    /// Sends the stream's next message, retrying while the library's
    /// bounded queue is full (or, server side, while the client has no
    /// session), for as long as `go` holds and at most 10 s.
    async fn send_one(&self, go: &AtomicBool) -> Result<(), NotSent> {
        let seq = self.ledger.next_seq(self.index, self.dir);
        let give_up = Instant::now() + Duration::from_secs(10);
        let limit = Duration::from_secs(5);
        loop {
            if !go.load(Ordering::SeqCst) || Instant::now() >= give_up {
                return Err(NotSent);
            }
            let body = encode(self.index, seq, self.ledger.stamp(), self.padding);
            let retry = match self.dir {
                // Broadcasts go through `start_broadcasts`.
                Direction::Room => return Err(NotSent),
                Direction::Up => {
                    match kitestring::util::timeout(&*self.rt, limit, self.client.send_bytes(body))
                        .await
                    {
                        Some(Ok(id)) => {
                            self.ledger.accepted(self.index, self.dir, seq, id);
                            return Ok(());
                        }
                        Some(Err(ClientError::Send(SendError::QueueFull { .. }))) => {
                            self.ledger.refused_full();
                            true
                        }
                        // Timed out waiting for the driver: retry.
                        None => true,
                        Some(Err(_)) => return Err(NotSent),
                    }
                }
                Direction::Down => {
                    let Some(session) = self.ledger.session_of(self.index) else {
                        kitestring::util::sleep(&*self.rt, Duration::from_millis(20)).await;
                        continue;
                    };
                    match kitestring::util::timeout(
                        &*self.rt,
                        limit,
                        self.server.send_bytes(session, body),
                    )
                    .await
                    {
                        Some(Ok(id)) => {
                            self.ledger.accepted(self.index, self.dir, seq, id);
                            return Ok(());
                        }
                        Some(Err(ServerError::Send {
                            error: SendError::QueueFull { .. },
                            ..
                        })) => {
                            self.ledger.refused_full();
                            true
                        }
                        Some(Err(ServerError::Send {
                            error: SendError::UnknownSession,
                            ..
                        })) => {
                            self.ledger.session_ended(self.index, session);
                            true
                        }
                        None => true,
                        Some(Err(_)) => return Err(NotSent),
                    }
                }
            };
            if retry {
                kitestring::util::sleep(&*self.rt, Duration::from_millis(20)).await;
            }
        }
    }
}

async fn client_events(
    i: usize,
    handle: ClientHandle,
    mut events: ClientEvents,
    ledger: Arc<Ledger>,
    reconnect_failed: bool,
) {
    while let Some(event) = events.next().await {
        match event {
            Event::Message(m) if m.room.is_some() => {
                if let Some((_, seq, sent)) = decode(m.payload.data()) {
                    ledger.delivered(i, Direction::Room, seq, sent);
                }
            }
            Event::Message(m) => {
                if let Some((c, seq, sent)) = decode(m.payload.data()) {
                    // A message for another client would be a routing bug:
                    // book it where its header says, so it shows as unexpected.
                    ledger.delivered(c, Direction::Down, seq, sent);
                    if c != i {
                        ledger.incident(i, IncidentKind::Misrouted(c));
                    }
                }
            }
            Event::Connected { resumed, .. } => ledger.connected(i, resumed),
            Event::SessionLost {
                reason,
                unconfirmed,
                unsent,
            } => {
                ledger.named(i, Direction::Up, &unconfirmed);
                ledger.named(i, Direction::Up, &unsent);
                if reason != kitestring::LostReason::Closed {
                    ledger.session_lost(
                        i,
                        format!(
                            "client: {reason:?} ({} unconfirmed, {} unsent)",
                            unconfirmed.len(),
                            unsent.len()
                        ),
                    );
                }
            }
            Event::SendFailed { id, .. } => ledger.named(i, Direction::Up, &[id]),
            Event::StateChanged { new, .. } => match new {
                State::Reconnecting { cause, .. } => {
                    if cause == Cause::HeartbeatTimeout {
                        ledger.incident(i, IncidentKind::HeartbeatTimeout);
                    }
                    ledger.incident(i, IncidentKind::Reconnecting(cause_name(&cause)));
                }
                State::Failed { reason } => {
                    ledger.incident(i, IncidentKind::Failed(format!("{reason:?}")));
                    if reconnect_failed {
                        let _ = handle.reconnect().await;
                    }
                }
                _ => {}
            },
            _ => {}
        }
    }
}

/// A short name for a reconnect cause, for grouping in reports.
pub fn cause_name(cause: &Cause) -> String {
    match cause {
        Cause::PeerClosed { code, .. } => format!("peer closed {}", code.0),
        Cause::Transport(_) => "transport error".into(),
        Cause::ConnectTimeout => "connect timeout".into(),
        Cause::HeartbeatTimeout => "heartbeat timeout".into(),
        Cause::AckTimeout => "ack timeout".into(),
        Cause::Rejected { code, .. } => format!("rejected {}", code.0),
        Cause::GoAway { code } => format!("go away {}", code.0),
        Cause::Protocol(_) => "protocol error".into(),
        other => format!("{other:?}"),
    }
}

async fn server_events(mut events: ServerEvents, ledger: Arc<Ledger>) {
    while let Some(event) = events.next().await {
        match event {
            ServerEvent::SessionOpened {
                session, identity, ..
            } => {
                if let Some(i) = identity.and_then(|s| s.parse::<usize>().ok()) {
                    ledger.server_session(i, session);
                }
            }
            ServerEvent::Message { message, .. } => {
                if let Some((c, seq, sent)) = decode(message.payload.data()) {
                    ledger.delivered(c, Direction::Up, seq, sent);
                }
            }
            ServerEvent::SessionDetached { session, code } => {
                if let Some(i) = ledger.client_of(session) {
                    ledger.incident(i, IncidentKind::Detached(code));
                }
            }
            ServerEvent::SessionEnded {
                session,
                reason,
                unconfirmed,
            } => {
                if let Some(i) = ledger.client_of(session) {
                    ledger.named(i, Direction::Down, &unconfirmed);
                    ledger.session_ended(i, session);
                    if !matches!(reason, SessionEnd::ClientClosed | SessionEnd::ServerClosed) {
                        ledger.session_lost(
                            i,
                            format!("server: {reason:?} ({} unconfirmed)", unconfirmed.len()),
                        );
                    }
                }
            }
            _ => {}
        }
    }
}
