//! A TCP chaos proxy for tests.
//!
//! [`Proxy::start`] listens on a loopback port and forwards every
//! connection to a target. Each connection can then be faulted on demand:
//!
//! * [`Link::cut`]: close both sides at once (a reset, a crashed peer);
//! * [`Link::black_hole`]: stop forwarding in both directions without
//!   closing anything: a half-open connection that only a heartbeat
//!   detects;
//! * [`Link::set_delay`]: add one-way latency (order is kept);
//! * [`Link::set_throttle`]: cap each direction's bytes per second.
//!
//! [`Proxy::set_upgrades`] makes it a proxy that blocks WebSocket upgrades
//! (answering them 400, or stripping their `Upgrade` header), as
//! corporate proxies do, while plain HTTP requests pass.
//!
//! The same controls exist proxy-wide ([`Proxy::cut_all`], ...), and
//! [`Proxy::set_random_faults`] cuts or black-holes connections at random,
//! from a seed, at a given rate.
//!
//! The proxy runs on its own thread with its own single-threaded tokio
//! runtime, so tests on any async runtime (or none) can use it; every
//! control is a plain non-blocking method. Dropping the [`Proxy`] stops it
//! and closes every connection it carries.
//!
//! ```no_run
//! # fn demo(server: std::net::SocketAddr) -> std::io::Result<()> {
//! let proxy = kitestring_chaos::Proxy::start(server)?;
//! let url = format!("ws://{}/", proxy.local_addr());
//! // ... connect a client to `url`, then:
//! proxy.black_hole_all();
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// What a connection is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// Forwarding bytes.
    Forward,
    /// Forwarding nothing, sockets kept open.
    BlackHole,
    /// Both sides closed.
    Cut,
}

/// What the proxy does with a connection whose first request is a
/// WebSocket upgrade (an `Upgrade: websocket` header).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Upgrades {
    /// Forwards it.
    #[default]
    Pass,
    /// Answers it `400 Bad Request` itself and closes.
    Refuse,
    /// Removes its `Upgrade` header (and `Connection: upgrade`) and
    /// forwards the rest: the server sees a plain request.
    Strip,
}

/// Seeded random faults: each connection suffers faults at `rate` per
/// second on average (exponentially distributed gaps); a fault is a black
/// hole with probability `black_hole_share`, otherwise a cut.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RandomFaults {
    /// Seed: the same seed gives every n-th connection the same schedule.
    pub seed: u64,
    /// Mean faults per connection per second.
    pub rate: f64,
    /// Share of faults that black-hole instead of cutting, in `0.0..=1.0`.
    pub black_hole_share: f64,
}

/// Controls of one proxied connection. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Link {
    id: u64,
    mode: Arc<watch::Sender<Mode>>,
    delay_us: Arc<AtomicU64>,
    /// Bytes per second per direction; 0 is unlimited.
    throttle: Arc<AtomicU64>,
}

impl Link {
    /// The connection's number, from 1 in accept order.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// What the connection is doing now.
    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    /// Closes both sides.
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    /// Stops forwarding silently; the sockets stay open.
    pub fn black_hole(&self) {
        self.mode.send_if_modified(|m| {
            if *m == Mode::Forward {
                *m = Mode::BlackHole;
                true
            } else {
                false
            }
        });
    }

    /// Adds `delay` of one-way latency to bytes read from now on.
    pub fn set_delay(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.delay_us.store(us, Ordering::Relaxed);
    }

    /// Caps each direction at `bytes_per_sec` (`None`: unlimited).
    pub fn set_throttle(&self, bytes_per_sec: Option<u64>) {
        self.throttle
            .store(bytes_per_sec.unwrap_or(0), Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct Shared {
    links: Vec<Link>,
    next_id: u64,
    delay: Duration,
    throttle: Option<u64>,
    faults: Option<RandomFaults>,
    refuse: bool,
    upgrades: Upgrades,
    /// Where new connections go, in turn (empty: the proxy's target).
    targets: Vec<SocketAddr>,
}

/// A running proxy. Dropping it stops it and closes every connection.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    target: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    stop: Option<oneshot::Sender<()>>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A panic elsewhere cannot leave this state inconsistent: keep going.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

impl Proxy {
    /// Listens on `127.0.0.1` (a free port) and forwards to `target`.
    pub fn start(target: SocketAddr) -> io::Result<Proxy> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), target)
    }

    /// Listens on `listen` and forwards to `target`.
    pub fn start_on(listen: SocketAddr, target: SocketAddr) -> io::Result<Proxy> {
        let std_listener = std::net::TcpListener::bind(listen)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (stop_tx, stop_rx) = oneshot::channel();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let shared2 = shared.clone();
        std::thread::Builder::new()
            .name(format!("chaos-proxy-{}", addr.port()))
            .spawn(move || {
                rt.block_on(async move {
                    let listener = match TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::warn!(error = %e, "chaos proxy cannot listen");
                            return;
                        }
                    };
                    tokio::select! {
                        _ = stop_rx => {}
                        _ = accept_loop(listener, target, shared2) => {}
                    }
                });
            })?;
        Ok(Proxy {
            addr,
            target,
            shared,
            stop: Some(stop_tx),
        })
    }

    /// Where clients connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where connections are forwarded (unless [`set_targets`](Self::set_targets)
    /// changed it).
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Forwards new connections to `targets` in turn, as a load balancer
    /// in front of several servers would (an empty list: back to the
    /// proxy's own target). Connections already open stay where they are.
    pub fn set_targets(&self, targets: &[SocketAddr]) {
        lock(&self.shared).targets = targets.to_vec();
    }

    /// Every connection accepted so far, in accept order.
    pub fn links(&self) -> Vec<Link> {
        lock(&self.shared).links.clone()
    }

    /// Connections currently forwarding.
    pub fn forwarding(&self) -> usize {
        lock(&self.shared)
            .links
            .iter()
            .filter(|l| l.mode() == Mode::Forward)
            .count()
    }

    /// The most recent connection, if any.
    pub fn last_link(&self) -> Option<Link> {
        lock(&self.shared).links.last().cloned()
    }

    /// Cuts every current connection.
    pub fn cut_all(&self) {
        for l in self.links() {
            l.cut();
        }
    }

    /// Black-holes every current connection.
    pub fn black_hole_all(&self) {
        for l in self.links() {
            l.black_hole();
        }
    }

    /// Sets the latency of every current and future connection.
    pub fn set_delay(&self, delay: Duration) {
        let mut s = lock(&self.shared);
        s.delay = delay;
        for l in &s.links {
            l.set_delay(delay);
        }
    }

    /// Sets the throttle of every current and future connection.
    pub fn set_throttle(&self, bytes_per_sec: Option<u64>) {
        let mut s = lock(&self.shared);
        s.throttle = bytes_per_sec;
        for l in &s.links {
            l.set_throttle(bytes_per_sec);
        }
    }

    /// Faults future connections at random (`None` stops it for new ones).
    pub fn set_random_faults(&self, faults: Option<RandomFaults>) {
        lock(&self.shared).faults = faults;
    }

    /// What new connections whose first request is a WebSocket upgrade
    /// meet; existing ones are untouched. Only a connection's first request
    /// is looked at (clients open a connection of its own for each upgrade).
    pub fn set_upgrades(&self, upgrades: Upgrades) {
        lock(&self.shared).upgrades = upgrades;
    }

    /// When true, new connections are accepted and closed at once (a server
    /// that is down); existing ones are untouched.
    pub fn set_refuse(&self, refuse: bool) {
        lock(&self.shared).refuse = refuse;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Mutex<Shared>>) {
    loop {
        let (client, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "chaos accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (link, faults, to, upgrades) = {
            let mut s = lock(&shared);
            if s.refuse {
                continue; // dropping `client` closes it
            }
            s.next_id += 1;
            let to = match s.targets.len() {
                0 => target,
                n => s.targets[(s.next_id as usize) % n],
            };
            let (mode, _) = watch::channel(Mode::Forward);
            let link = Link {
                id: s.next_id,
                mode: Arc::new(mode),
                delay_us: Arc::new(AtomicU64::new(
                    u64::try_from(s.delay.as_micros()).unwrap_or(u64::MAX),
                )),
                throttle: Arc::new(AtomicU64::new(s.throttle.unwrap_or(0))),
            };
            s.links.push(link.clone());
            (link, s.faults, to, s.upgrades)
        };
        tokio::spawn(serve(client, to, link, faults, upgrades));
    }
}

/// Reads the client's first request head (at most 64 KiB) and applies
/// `upgrades` to it: the bytes to forward first, or `None` when the
/// connection was answered and is to be closed.
async fn screen(client: &mut TcpStream, upgrades: Upgrades) -> Option<Vec<u8>> {
    let mut read = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        if let Some(at) = read.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if read.len() > 64 * 1024 {
            return Some(read);
        }
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => return Some(read),
            Ok(n) => read.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&read[..end]).into_owned();
    let is_upgrade = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("upgrade")
                && value.trim().eq_ignore_ascii_case("websocket")
        })
    });
    if !is_upgrade {
        return Some(read);
    }
    match upgrades {
        Upgrades::Pass => Some(read),
        Upgrades::Refuse => {
            let _ = client
                .write_all(
                    b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\
                      content-type: text/plain\r\ncontent-length: 24\r\n\r\n\
                      websockets not allowed\r\n",
                )
                .await;
            let _ = client.shutdown().await;
            None
        }
        Upgrades::Strip => {
            let mut out = String::new();
            for line in head.split_inclusive("\r\n") {
                let name = line.split_once(':').map(|(n, _)| n.trim());
                if name.is_some_and(|n| n.eq_ignore_ascii_case("upgrade")) {
                    continue;
                }
                if name.is_some_and(|n| n.eq_ignore_ascii_case("connection")) {
                    out.push_str("connection: keep-alive\r\n");
                    continue;
                }
                out.push_str(line);
            }
            let mut bytes = out.into_bytes();
            bytes.extend_from_slice(&read[end..]);
            Some(bytes)
        }
    }
}

async fn serve(
    mut client: TcpStream,
    target: SocketAddr,
    link: Link,
    faults: Option<RandomFaults>,
    upgrades: Upgrades,
) {
    let first = match upgrades {
        Upgrades::Pass => Vec::new(),
        _ => match screen(&mut client, upgrades).await {
            Some(first) => first,
            None => {
                link.cut();
                return;
            }
        },
    };
    let mut server = match TcpStream::connect(target).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "chaos proxy cannot reach the target");
            link.cut();
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    if !first.is_empty() && server.write_all(&first).await.is_err() {
        link.cut();
        return;
    }
    if let Some(f) = faults {
        tokio::spawn(random_faults(link.clone(), f));
    }
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let mut mode = link.mode.subscribe();
    let up = pipe(cr, sw, link.clone());
    let down = pipe(sr, cw, link.clone());
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        _ = mode.wait_for(|m| *m == Mode::Cut) => {}
    }
    // Returning drops all four halves: both sockets close.
}

/// Forwards one direction. Reading and writing are separate tasks joined by
/// a small bounded channel, so latency does not reduce throughput.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Link,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(64);
    let reader_link = link.clone();
    let reader = async move {
        let mut mode = reader_link.mode.subscribe();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if *mode.borrow() != Mode::Forward {
                // Black hole or cut: read nothing more, never close.
                let _ = mode.wait_for(|m| *m == Mode::Cut).await;
                return;
            }
            let n = tokio::select! {
                r = from.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
                _ = mode.changed() => continue,
            };
            let delay = Duration::from_micros(reader_link.delay_us.load(Ordering::Relaxed));
            if tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let writer = async move {
        let mode = link.mode.subscribe();
        // When the link is free again: a chunk of n bytes occupies it for
        // n / rate seconds, like a real slow link.
        let mut free_at = Instant::now();
        while let Some((at, chunk)) = rx.recv().await {
            let rate = link.throttle.load(Ordering::Relaxed);
            let mut due = at;
            if rate > 0 {
                free_at =
                    free_at.max(at) + Duration::from_secs_f64(chunk.len() as f64 / rate as f64);
                due = free_at;
            }
            tokio::time::sleep_until(due).await;
            if *mode.borrow() != Mode::Forward {
                // Swallow what was in flight when the hole opened.
                continue;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        // The reader saw EOF: pass the half-close on.
        if *mode.borrow() == Mode::Forward {
            let _ = to.shutdown().await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::join!(reader, writer);
}

async fn random_faults(link: Link, f: RandomFaults) {
    if f.rate <= 0.0 || !f.rate.is_finite() {
        return;
    }
    let mut rng = XorShift::new(f.seed ^ link.id.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    loop {
        // Exponential gap with mean 1/rate.
        let u = rng.unit().max(1e-12);
        let gap = (-u.ln() / f.rate).min(3600.0);
        tokio::time::sleep(Duration::from_secs_f64(gap)).await;
        match link.mode() {
            Mode::Cut => return,
            Mode::BlackHole => {}
            Mode::Forward => {
                if rng.unit() < f.black_hole_share {
                    tracing::debug!(link = link.id, "random fault: black hole");
                    link.black_hole();
                } else {
                    tracing::debug!(link = link.id, "random fault: cut");
                    link.cut();
                    return;
                }
            }
        }
    }
}

/// xorshift64*: small, seeded, good enough for fault schedules.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        XorShift(seed | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn echo_server() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    /// A client of `proxy` whose reads give up after 5 s: a loaded
    /// machine answers within that.
    fn connect(proxy: &Proxy) -> std::net::TcpStream {
        let s = std::net::TcpStream::connect(proxy.local_addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    #[test]
    fn forwards_cuts_and_black_holes() {
        let proxy = Proxy::start(echo_server()).unwrap();
        let mut a = connect(&proxy);
        a.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        a.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        assert_eq!(proxy.forwarding(), 1);

        proxy.black_hole_all();
        a.write_all(b"lost").unwrap();
        // Expected to time out: a short wait is enough to see nothing come.
        a.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let err = a.read(&mut buf).unwrap_err();
        assert!(matches!(
            err.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ));

        let mut b = connect(&proxy);
        b.write_all(b"next").unwrap();
        b.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"next");
        proxy.last_link().unwrap().cut();
        assert_eq!(b.read(&mut buf).unwrap(), 0, "a cut closes the client side");
        assert_eq!(proxy.links().len(), 2);
    }

    #[test]
    fn delay_is_applied() {
        let proxy = Proxy::start(echo_server()).unwrap();
        proxy.set_delay(Duration::from_millis(100));
        let mut a = connect(&proxy);
        let t = std::time::Instant::now();
        a.write_all(b"x").unwrap();
        let mut buf = [0u8; 1];
        a.read_exact(&mut buf).unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn throttle_limits_throughput() {
        let proxy = Proxy::start(echo_server()).unwrap();
        proxy.set_throttle(Some(16 * 1024));
        let mut a = connect(&proxy);
        a.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let t = std::time::Instant::now();
        let data = vec![1u8; 8 * 1024];
        a.write_all(&data).unwrap();
        let mut back = vec![0u8; data.len()];
        a.read_exact(&mut back).unwrap();
        assert_eq!(back, data);
        // 8 KiB at 16 KiB/s each way: at least half a second.
        assert!(
            t.elapsed() >= Duration::from_millis(450),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn random_faults_cut_eventually() {
        let proxy = Proxy::start(echo_server()).unwrap();
        proxy.set_random_faults(Some(RandomFaults {
            seed: 7,
            rate: 20.0,
            black_hole_share: 0.0,
        }));
        let mut a = connect(&proxy);
        a.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(a.read(&mut buf).unwrap(), 0);
        assert_eq!(proxy.last_link().unwrap().mode(), Mode::Cut);
    }
}
