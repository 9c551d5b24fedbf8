//! The load generator: raw tokio-tungstenite connections, each speaking one
//! server's protocol through [`wire`], each on a task of its own that reads
//! everything, answers what the protocol requires, pipelines echoes when
//! asked, and checks that every message arrives exactly once and in order.
//!
//! Connections leave from source addresses spread over 127.1.0.0/16 to the
//! 64 destination addresses of [`net::spread_host`], so that no address
//! pair runs out of ephemeral ports however many rounds a run makes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::wire::{self, Got, Proto, Session};
use crate::net;

type Ws = WebSocketStream<tokio::net::TcpStream>;

/// Longest a connection may take to open, handshake and join.
const OPEN_TIMEOUT: Duration = Duration::from_secs(20);

/// Messages read in one go before the connection writes what they caused.
const READ_BURST: usize = 64;

/// Source address of connection `i`: 127.1.0.1 to 127.1.199.250.
fn spread_source(i: usize) -> IpAddr {
    let i = i % 50_000;
    IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, 1 + (i % 250) as u8))
}

/// What every connection of a fleet adds to, and the first thing that went
/// wrong.
#[derive(Default)]
pub(crate) struct Tally {
    /// Room broadcasts received, over all connections.
    pub(crate) fanout: AtomicU64,
    /// Echoes received, over all connections.
    pub(crate) echoed: AtomicU64,
    /// Connections that have received every echo they asked for.
    pub(crate) echo_done: AtomicU64,
    /// Messages received a second time.
    duplicated: AtomicU64,
    /// Messages received before one sent earlier, or after one sent later.
    out_of_order: AtomicU64,
    /// Anything else: malformed or unexpected messages, connections that
    /// failed to open or were closed by the server.
    other: AtomicU64,
    first: Mutex<Option<String>>,
}

/// What a violation was.
#[derive(Clone, Copy)]
pub(crate) enum Violation {
    Duplicated,
    OutOfOrder,
    Other,
}

impl Tally {
    /// Counts a violation; the first one is kept to be reported.
    pub(crate) fn violation(&self, kind: Violation, what: String) {
        let counter = match kind {
            Violation::Duplicated => &self.duplicated,
            Violation::OutOfOrder => &self.out_of_order,
            Violation::Other => &self.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut f) = self.first.lock() {
            f.get_or_insert(what);
        }
    }

    /// `None` when nothing went wrong; otherwise how many things did, and
    /// the first.
    pub(crate) fn failure(&self) -> Option<String> {
        let first = self.first.lock().ok()?.clone()?;
        let counts = [
            (&self.duplicated, "duplicated"),
            (&self.out_of_order, "out of order"),
            (&self.other, "other"),
        ];
        let counts: Vec<String> = counts
            .iter()
            .map(|(c, what)| (c.load(Ordering::Relaxed), what))
            .filter(|(n, _)| *n > 0)
            .map(|(n, what)| format!("{n} {what}"))
            .collect();
        Some(format!("{}; first: {first}", counts.join(", ")))
    }
}

/// Checks one sender's sequence numbers (1, 2, 3, ...) as they arrive.
#[derive(Default)]
struct Order {
    seen: Vec<bool>,
    /// One past the highest number received.
    next: u64,
}

impl Order {
    /// Takes number `s`: whether it is new, and whether it came in order.
    fn take(&mut self, s: u64) -> (bool, bool) {
        let i = s as usize;
        if self.seen.len() <= i {
            self.seen.resize(i + 1, false);
        }
        let new = !std::mem::replace(&mut self.seen[i], true);
        let in_order = s == self.next.max(1);
        self.next = self.next.max(s + 1);
        (new, in_order)
    }
}

/// What a connection does once open.
#[derive(Clone)]
pub(crate) enum Role {
    /// Reads (and acknowledges) whatever comes.
    Listen,
    /// Once `go` turns true, sends `count` echo messages keeping `window`
    /// in flight, then listens.
    Echo {
        count: u64,
        window: u64,
        go: tokio::sync::watch::Receiver<bool>,
    },
}

/// Opens connection number `i` to `port`: TCP from a spread source address,
/// the WebSocket upgrade, the protocol's handshake and the join of the room.
pub(crate) async fn open(proto: Proto, i: usize, port: u16) -> Result<(Ws, Session), String> {
    match tokio::time::timeout(OPEN_TIMEOUT, open_inner(proto, i, port)).await {
        Ok(r) => r,
        Err(_) => Err(format!("connection {i} not open after {OPEN_TIMEOUT:?}")),
    }
}

async fn open_inner(proto: Proto, i: usize, port: u16) -> Result<(Ws, Session), String> {
    let host = net::spread_host(i);
    let dest: SocketAddr = format!("{host}:{port}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    socket
        .bind(SocketAddr::new(spread_source(i), 0))
        .map_err(|e| format!("bind: {e}"))?;
    let stream = socket
        .connect(dest)
        .await
        .map_err(|e| format!("connect {dest}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let mut request = format!("ws://{host}:{port}{}", proto.path())
        .into_client_request()
        .map_err(|e| format!("request: {e}"))?;
    if let Proto::Kitestring(codec) = proto {
        // The preferred handshake (PROTOCOL.md, section 4.1): the hello in
        // the upgrade, the welcome in the 101.
        let hello = wire::kite_hello(codec, i as u64 + 1);
        let value = HeaderValue::from_str(&hello).map_err(|e| format!("{e}"))?;
        request.headers_mut().insert("kitestring-hello", value);
    }
    let (mut ws, response) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(net::baseline_config()))
            .await
            .map_err(|e| format!("upgrade: {e}"))?;
    let mut session = match proto {
        Proto::Kitestring(codec) => {
            let welcome = response
                .headers()
                .get("kitestring-welcome")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let welcome = match welcome {
                Some(w) => w,
                None => {
                    // No answer in the upgrade: the hello as the first frame.
                    let hello = wire::kite_hello(codec, i as u64 + 1);
                    ws.send(Message::text(hello))
                        .await
                        .map_err(|e| format!("hello: {e}"))?;
                    next_text(&mut ws).await?
                }
            };
            wire::kite_welcome(codec, &welcome)?
        }
        Proto::SocketIo => {
            let session = wire::socketio_open(&next_text(&mut ws).await?)?;
            ws.send(Message::text(wire::socketio_connect()))
                .await
                .map_err(|e| format!("connect: {e}"))?;
            loop {
                let packet = next_text(&mut ws).await?;
                if wire::socketio_connected(&packet)? {
                    break;
                }
                // socketioxide pings as soon as the connection opens.
                if packet == wire::SOCKETIO_PING {
                    ws.send(Message::text(wire::SOCKETIO_PONG))
                        .await
                        .map_err(|e| format!("pong: {e}"))?;
                }
            }
            session
        }
        Proto::Floor => wire::floor_session(),
    };
    if let Some(join) = session.join() {
        ws.send(join).await.map_err(|e| format!("join: {e}"))?;
    }
    Ok((ws, session))
}

/// The next text message (handshake frames).
async fn next_text(ws: &mut Ws) -> Result<String, String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(m)) => return Err(format!("{m:?} during the handshake")),
            Some(Err(e)) => return Err(format!("during the handshake: {e}")),
            None => return Err("closed during the handshake".into()),
        }
    }
}

/// Runs one open connection until its task is aborted: reads, checks,
/// answers, and sends echoes if its role says so.
pub(crate) async fn drive(mut ws: Ws, mut session: Session, role: Role, tally: Arc<Tally>) {
    let proto = session.proto();
    let (count, window, mut go) = match role {
        Role::Listen => (0, 0, None),
        Role::Echo { count, window, go } => (count, window, Some(go)),
    };
    let mut started = go.is_none();
    let (mut sent, mut got) = (0u64, 0u64);
    let (mut fanout, mut echoes) = (Order::default(), Order::default());
    let far = Instant::now() + Duration::from_secs(86_400);
    let who = name(proto);
    let check = |what: &str, order: &mut Order, s: u64| {
        let due = order.next.max(1);
        match order.take(s) {
            (false, _) => tally.violation(
                Violation::Duplicated,
                format!("{who}: {what} {s} received twice"),
            ),
            (true, false) => tally.violation(
                Violation::OutOfOrder,
                format!("{who}: {what} {s} received where {due} was due"),
            ),
            (true, true) => {}
        }
    };
    let mut handle = |m: Message, session: &mut Session, got: &mut u64, sent: u64| -> bool {
        match session.read(m) {
            Ok(None) => true,
            Ok(Some(Got::Fanout(s))) => {
                check("broadcast", &mut fanout, s);
                tally.fanout.fetch_add(1, Ordering::Relaxed);
                true
            }
            Ok(Some(Got::Echo(s))) => {
                if s > sent {
                    tally.violation(
                        Violation::Other,
                        format!("{who}: echo {s} of a message not sent ({sent} sent)"),
                    );
                }
                check("echo", &mut echoes, s);
                *got += 1;
                tally.echoed.fetch_add(1, Ordering::Relaxed);
                if count > 0 && *got == count {
                    tally.echo_done.fetch_add(1, Ordering::Relaxed);
                }
                true
            }
            Err(e) => {
                tally.violation(Violation::Other, format!("{who}: {e}"));
                false
            }
        }
    };
    loop {
        let mut wrote = false;
        if started {
            while sent < count && sent - got < window {
                let m = session.echo(sent + 1);
                if ws.feed(m).await.is_err() {
                    tally.violation(Violation::Other, format!("{who}: write failed"));
                    return;
                }
                sent += 1;
                wrote = true;
            }
        }
        let out: Vec<Message> = session.take_out().collect();
        for m in out {
            if ws.feed(m).await.is_err() {
                tally.violation(Violation::Other, format!("{who}: write failed"));
                return;
            }
            wrote = true;
        }
        if wrote && ws.flush().await.is_err() {
            tally.violation(Violation::Other, format!("{who}: flush failed"));
            return;
        }
        let deadline = session.deadline().unwrap_or(far);
        let go_changed = async {
            match &mut go {
                Some(g) if !started => g.changed().await.is_ok(),
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            m = ws.next() => {
                let Some(Ok(m)) = m else {
                    tally.violation(Violation::Other, format!("{who}: connection ended by the server"));
                    return;
                };
                if !handle(m, &mut session, &mut got, sent) {
                    return;
                }
                // Take what else is ready before writing what it caused.
                for _ in 0..READ_BURST {
                    match ws.next().now_or_never() {
                        Some(Some(Ok(m))) => {
                            if !handle(m, &mut session, &mut got, sent) {
                                return;
                            }
                        }
                        Some(_) => {
                            tally.violation(
                                Violation::Other,
                                format!("{who}: connection ended by the server"),
                            );
                            return;
                        }
                        None => break,
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => session.on_timer(Instant::now()),
            ok = go_changed => started = ok,
        }
    }
}

fn name(proto: Proto) -> &'static str {
    match proto {
        Proto::Kitestring(kitestring::Codec::Json) => "kitestring-json",
        Proto::Kitestring(_) => "kitestring",
        Proto::SocketIo => "socket.io",
        Proto::Floor => "floor",
    }
}

/// Open connections, each driven by a task of its own.
pub(crate) struct Fleet {
    tasks: Vec<tokio::task::AbortHandle>,
    pub(crate) tally: Arc<Tally>,
}

impl Fleet {
    /// Opens `n` connections, `concurrency` at a time; `role(i)` says what
    /// connection `i` does. A connection that fails to open counts as a
    /// violation.
    pub(crate) async fn open(
        proto: Proto,
        port: u16,
        n: usize,
        concurrency: usize,
        role: impl Fn(usize) -> Role,
    ) -> Fleet {
        let tally = Arc::new(Tally::default());
        let tasks = futures_util::stream::iter(0..n)
            .map(|i| {
                let (tally, role) = (tally.clone(), role(i));
                async move {
                    match open(proto, i, port).await {
                        Ok((ws, session)) => {
                            Some(tokio::spawn(drive(ws, session, role, tally)).abort_handle())
                        }
                        Err(e) => {
                            tally.violation(Violation::Other, format!("{}: {e}", name(proto)));
                            None
                        }
                    }
                }
            })
            .buffer_unordered(concurrency)
            .filter_map(|t| async move { t })
            .collect()
            .await;
        Fleet { tasks, tally }
    }

    /// Connections open.
    pub(crate) fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Drops every connection (without a close handshake).
    pub(crate) fn close(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Waits until `counter` reaches `n` or `limit` passes; false on the limit.
pub(crate) async fn wait_for(counter: &AtomicU64, n: u64, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while counter.load(Ordering::Relaxed) < n {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    true
}
