//! The demo's cluster mode (`kitestring-demo --nodes N`) and the tests that
//! run it: N node processes (`kitestring-node`, each echoing every message
//! and acknowledging only what it handled) sharing a private
//! `redis-server`, a chaos proxy in front of them as the load balancer
//! (every new connection goes to the next node), a chaos proxy between
//! each node and Redis, and clients sending messages at a steady rate.
//!
//! Faults, at random from a seed: client connections cut (the client
//! reconnects to another node, which claims its session), a node killed
//! with SIGKILL and started again under its name (its sessions are taken
//! up from their records), a node shut down gracefully and started again
//! (its sessions are handed over), a node's Redis connection cut. Then the
//! faults stop, everything drains, and the books are read against the
//! promises: every message a client sent is handled by some node, any
//! message handled twice carries its own id both times, every echo
//! arrives at most as often as its message was handled, and an echo may be
//! missing only where the client was told its session was recovered after
//! a crash. Anything else is counted lost or duplicated.
//!
//! Every client is also a member of one room, and every third message it
//! sends is a publish to it: each publish the cluster acknowledged must
//! reach every other member once, in order, whatever node each is on and
//! whatever happened to the nodes (a member told it missed part of the
//! room's stream, or whose session was lost, is excused and counted).
//!
//! With `KITESTRING_DEMO_DEBUG` set, each loss or duplicate is printed
//! with what the client saw around it (its last events).
//!
//! This module owns the processes, the traffic and the books of cluster
//! mode; it never looks inside the nodes (only at what they print).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kitestring::{ClientOptions, Event};
use kitestring_chaos::Proxy;
use kitestring_redis::testing::RedisServer;

/// What a cluster run does.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// The `kitestring-node` binary.
    pub node_bin: PathBuf,
    /// Node processes.
    pub nodes: usize,
    /// Clients.
    pub clients: usize,
    /// Messages per second per client.
    pub rate: f64,
    /// How long faults and traffic run; longer, by at most 30 s, until
    /// each kind of node fault has happened once and 4 s have passed
    /// since the last.
    pub duration: Duration,
    /// Seed of the fault schedule.
    pub seed: u64,
    /// Each node's node timeout (how long a killed node's clients wait).
    pub node_timeout: Duration,
}

/// The books of a cluster run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterReport {
    /// Messages the clients' API accepted.
    pub sent: u64,
    /// Of them, handled by some node.
    pub handled: u64,
    /// Handled twice with their own id (sent again after a crash: allowed).
    pub handled_again: u64,
    /// Echoes received.
    pub echoes: u64,
    /// Echoes missing where the client was told its session was
    /// recovered after a crash (allowed).
    pub echoes_gone_in_crashes: u64,
    /// Messages reported by the library (a lost session's unconfirmed and
    /// unsent ids).
    pub reported: u64,
    /// Messages never handled, never reported; echoes missing without a
    /// recovered session.
    pub lost: u64,
    /// Messages handled under another id; echoes beyond the handlings.
    pub duplicated: u64,
    /// Client connections cut.
    pub cuts: u64,
    /// Nodes killed with SIGKILL.
    pub kills: u64,
    /// Nodes shut down gracefully.
    pub restarts: u64,
    /// Node Redis connections cut.
    pub redis_cuts: u64,
    /// Sessions a client was told were recovered.
    pub recovered: u64,
    /// Room publishes the clients' API accepted.
    pub room_published: u64,
    /// Of them, acknowledged.
    pub room_acked: u64,
    /// Of them, refused by id (`unavailable`: Redis could not take them).
    pub room_refused: u64,
    /// Publishes received by other members.
    pub room_delivered: u64,
    /// Deliveries not owed: the member was told it missed part of the
    /// room's stream, or lost its session.
    pub room_excused: u64,
    /// Acknowledged publishes a member never received (counted in `lost`).
    pub room_lost: u64,
    /// Publishes a member received twice or out of order (counted in
    /// `duplicated`).
    pub room_duplicated: u64,
}

impl ClusterReport {
    /// The report, a line per figure, ending with `lost:` and `duplicated:`.
    pub fn lines(&self) -> String {
        format!(
            "faults: {} client cuts, {} node kills, {} graceful restarts, {} Redis cuts\n\
             sent: {}  handled: {}  handled again after a crash (same id): {}\n\
             echoes: {}  gone in crashes (clients told: recovered): {}  sessions recovered: {}\n\
             reported by the library: {}\n\
             room: published {}  acknowledged {}  refused {}  delivered to other members {}  excused {}\n\
             lost: {}\n\
             duplicated: {}",
            self.cuts,
            self.kills,
            self.restarts,
            self.redis_cuts,
            self.sent,
            self.handled,
            self.handled_again,
            self.echoes,
            self.echoes_gone_in_crashes,
            self.recovered,
            self.reported,
            self.room_published,
            self.room_acked,
            self.room_refused,
            self.room_delivered,
            self.room_excused,
            self.lost,
            self.duplicated
        )
    }
}

/// A node process, what it printed, and the proxy to its Redis.
struct Node {
    name: String,
    child: Option<Child>,
    addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
    redis: Proxy,
}

impl Node {
    fn start(
        settings: &ClusterSettings,
        redis: &RedisServer,
        name: &str,
        lines: Arc<Mutex<Vec<String>>>,
        listen: Option<SocketAddr>,
    ) -> Result<Node, String> {
        let to_redis = SocketAddr::from(([127, 0, 0, 1], redis.port()));
        let proxy = Proxy::start(to_redis).map_err(|e| format!("redis proxy: {e}"))?;
        let (child, addr) = spawn_node(settings, &proxy, name, &lines, listen)?;
        Ok(Node {
            name: name.to_owned(),
            child: Some(child),
            addr,
            lines,
            redis: proxy,
        })
    }

    /// SIGKILL: whatever it held is gone.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A graceful stop: its sessions are handed over.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Some(stdin) = c.stdin.as_mut() {
                let _ = stdin.write_all(b"shutdown\n");
            }
            drop(c.stdin.take());
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again under its name, on its address.
    fn restart(&mut self, settings: &ClusterSettings) -> Result<(), String> {
        let (child, _) = spawn_node(
            settings,
            &self.redis,
            &self.name,
            &self.lines,
            Some(self.addr),
        )?;
        self.child = Some(child);
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn_node(
    settings: &ClusterSettings,
    redis: &Proxy,
    name: &str,
    lines: &Arc<Mutex<Vec<String>>>,
    listen: Option<SocketAddr>,
) -> Result<(Child, SocketAddr), String> {
    let listen = listen.map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string());
    let timeout = settings.node_timeout.as_millis().to_string();
    let mut child = Command::new(&settings.node_bin)
        .args(["--redis", &format!("redis://{}", redis.local_addr())])
        .args(["--name", name, "--listen", &listen])
        .args(["--node-timeout-ms", &timeout])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", settings.node_bin.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let keep = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("listening ") {
                let _ = tx.send(addr.parse::<SocketAddr>().ok());
            }
            keep.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(Some(addr)) => Ok((child, addr)),
        _ => {
            let _ = child.kill();
            Err(format!("node {name} did not say where it listens"))
        }
    }
}

/// What one client saw.
#[derive(Default)]
struct ClientBook {
    /// payload -> the id the API gave it.
    ids: BTreeMap<u64, u64>,
    /// Echo counts per payload.
    echoes: BTreeMap<u64, u64>,
    /// Ids a lost session reported.
    reported: BTreeSet<u64>,
    recovered: u64,
    /// Room publishes: k -> the id the API gave it.
    published: BTreeMap<u64, u64>,
    /// Acknowledged id ranges.
    acked: Vec<(u64, u64)>,
    /// Ids refused.
    refused: BTreeSet<u64>,
    /// Room messages received, by publisher, in order.
    room_got: BTreeMap<u64, Vec<u64>>,
    /// Told it missed part of the room's stream.
    missed: u64,
    /// Lost a session.
    lost_session: bool,
    /// Members of the room, as presence says.
    members: BTreeSet<String>,
    /// The last events, for debugging.
    trail: std::collections::VecDeque<String>,
}

/// The room every client is in.
const ROOM: &str = "all";
/// Room payloads: ROOM_BASE + publisher * 1 000 000 + k.
const ROOM_BASE: u64 = 1_000_000_000_000;

/// A tiny seeded generator (the schedule must not depend on the clock).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Runs the cluster scenario on the current tokio runtime; `progress` gets
/// a line per fault.
pub async fn run(
    settings: ClusterSettings,
    mut progress: impl FnMut(&str),
) -> Result<ClusterReport, String> {
    let redis = RedisServer::start().map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let mut nodes = Vec::new();
    for i in 0..settings.nodes.max(1) {
        let lines = Arc::new(Mutex::new(Vec::new()));
        nodes.push(Node::start(
            &settings,
            &redis,
            &format!("n{i}"),
            lines,
            None,
        )?);
    }
    let front = Proxy::start(nodes[0].addr).map_err(|e| e.to_string())?;
    front.set_targets(&nodes.iter().map(|n| n.addr).collect::<Vec<_>>());
    let url = format!("ws://{}/", front.local_addr());
    let rt = kitestring_tokio::runtime();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..settings.clients {
        let (client, mut events) = kitestring::connect(rt.clone(), &url, ClientOptions::default())
            .map_err(|e| e.to_string())?;
        let book = Arc::new(Mutex::new(ClientBook::default()));
        let (b, stop) = (book.clone(), stop.clone());
        let period = Duration::from_secs_f64(1.0 / settings.rate.max(0.01));
        let clients = settings.clients;
        let sender = tokio::spawn(async move {
            let _ = client.join(ROOM).await;
            // Publishes start once everyone is in the room (they are owed
            // to the members at the time).
            let wait = Instant::now() + Duration::from_secs(15);
            while Instant::now() < wait
                && b.lock().unwrap_or_else(|e| e.into_inner()).members.len() < clients
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let mut k = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if k % 3 == 2 {
                    let payload = ROOM_BASE + c as u64 * 1_000_000 + k;
                    if let Ok(id) = client.publish(ROOM, &payload).await {
                        b.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .published
                            .insert(k, id.0);
                        k += 1;
                    }
                } else {
                    let payload = c as u64 * 1_000_000 + k;
                    if let Ok(id) = client.send(&payload).await {
                        b.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .ids
                            .insert(payload, id.0);
                        k += 1;
                    }
                }
                tokio::time::sleep(period).await;
            }
            client
        });
        let b = book.clone();
        let reader = tokio::spawn(async move {
            while let Some(e) = events.next().await {
                let mut b = b.lock().unwrap_or_else(|e| e.into_inner());
                if !matches!(e, Event::Message(_) | Event::Acked { .. }) {
                    let line = format!("{:?} {e:?}", t0.elapsed());
                    b.trail.push_back(line.chars().take(300).collect());
                    if b.trail.len() > 12 {
                        b.trail.pop_front();
                    }
                }
                match e {
                    Event::Message(m) if m.room.as_deref() == Some(ROOM) => {
                        if let Ok(v) = kitestring::decode::<u64>(&m.payload) {
                            let v = v.saturating_sub(ROOM_BASE);
                            b.room_got
                                .entry(v / 1_000_000)
                                .or_default()
                                .push(v % 1_000_000);
                        }
                    }
                    Event::Message(m) => {
                        if let Ok(v) = kitestring::decode::<u64>(&m.payload) {
                            *b.echoes.entry(v).or_default() += 1;
                        }
                    }
                    Event::Acked { first, last } => b.acked.push((first.0, last.0)),
                    Event::Refused { id: Some(id), .. } => {
                        b.refused.insert(id.0);
                    }
                    Event::Missed { .. } => b.missed += 1,
                    Event::Presence { presence, .. } => {
                        let who = |m: &kitestring::Member| m.client.clone();
                        if presence.snapshot {
                            b.members = presence.joined.iter().map(who).collect();
                        } else {
                            b.members.extend(presence.joined.iter().map(who));
                            for m in &presence.left {
                                b.members.remove(&who(m));
                            }
                        }
                    }
                    Event::Connected {
                        recovered: true, ..
                    } => b.recovered += 1,
                    Event::SessionLost {
                        unconfirmed,
                        unsent,
                        ..
                    } => {
                        b.lost_session = true;
                        b.reported
                            .extend(unconfirmed.iter().chain(&unsent).map(|id| id.0));
                    }
                    _ => {}
                }
            }
        });
        tasks.push((book, sender, reader));
    }

    // Faults.
    let mut report = ClusterReport::default();
    let mut rng = Rng(settings.seed);
    let started = Instant::now();
    let mut next_node_fault = started + Duration::from_secs(3);
    let mut which = 0usize;
    // Every kind of node fault happens at least once, even when restarts
    // are slow (a loaded machine): the run goes on past its duration for
    // the ones still missing, and 4 s after the last, at most 30 s more.
    const KINDS: usize = 3;
    let overtime = settings.duration + Duration::from_secs(30);
    let mut last_fault = started;
    while started.elapsed() < settings.duration
        || (started.elapsed() < overtime
            && (which < KINDS || last_fault.elapsed() < Duration::from_secs(4)))
    {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let links = front.links();
        if !links.is_empty() && rng.next() % 3 == 0 {
            links[(rng.next() as usize) % links.len()].cut();
            report.cuts += 1;
        }
        if Instant::now() >= next_node_fault
            && (which < KINDS || started.elapsed() + Duration::from_secs(4) < settings.duration)
        {
            let i = (rng.next() as usize) % nodes.len();
            let node = &mut nodes[i];
            match which % KINDS {
                0 => {
                    progress(&format!("kill -9 {}", node.name));
                    node.kill();
                    report.kills += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    node.restart(&settings)?;
                }
                1 => {
                    progress(&format!("graceful restart of {}", node.name));
                    node.stop();
                    report.restarts += 1;
                    node.restart(&settings)?;
                }
                _ => {
                    progress(&format!("cut {}'s Redis connection", node.name));
                    node.redis.cut_all();
                    report.redis_cuts += 1;
                }
            }
            which += 1;
            last_fault = Instant::now();
            next_node_fault = last_fault + Duration::from_secs(4);
        }
    }

    // Drain: no more faults or sends; wait until every message is handled
    // and echoed, or 40 s.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut clients = Vec::new();
    let mut readers = Vec::new();
    let mut books = Vec::new();
    for (book, sender, reader) in tasks {
        if let Ok(c) = sender.await {
            clients.push(c);
        }
        readers.push(reader);
        books.push(book);
    }
    let handled_now = |nodes: &[Node]| -> Vec<(u64, u64)> {
        let mut all = Vec::new();
        for n in nodes {
            for l in n.lines.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let mut f = l.strip_prefix("handled ").unwrap_or("").split(' ');
                let (_s, id, p) = (f.next(), f.next(), f.next());
                if let (Some(Ok(id)), Some(Ok(p))) =
                    (id.map(str::parse::<u64>), p.map(str::parse::<u64>))
                {
                    all.push((id, p));
                }
            }
        }
        all
    };
    let deadline = Instant::now() + Duration::from_secs(40);
    while Instant::now() < deadline {
        let handled: BTreeSet<u64> = handled_now(&nodes).into_iter().map(|(_, p)| p).collect();
        let done = books.iter().all(|b| {
            let b = b.lock().unwrap_or_else(|e| e.into_inner());
            b.ids.iter().all(|(p, id)| {
                b.reported.contains(id) || (handled.contains(p) && b.echoes.contains_key(p))
            })
        }) && room_books(&books, false).lost == 0
            && books.iter().all(|b| {
                // Every publish's fate known: acknowledged, refused, or
                // reported with a lost session.
                let b = b.lock().unwrap_or_else(|e| e.into_inner());
                b.published.values().all(|id| {
                    b.refused.contains(id)
                        || b.reported.contains(id)
                        || b.acked.iter().any(|&(f, l)| f <= *id && *id <= l)
                })
            });
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The books.
    let handled = handled_now(&nodes);
    let mut by_payload: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (id, p) in handled {
        by_payload.entry(p).or_default().push(id);
    }
    for b in &books {
        let b = b.lock().unwrap_or_else(|e| e.into_inner());
        report.recovered += b.recovered;
        for (p, id) in &b.ids {
            report.sent += 1;
            let times = by_payload.get(p).map_or(&[][..], |v| &v[..]);
            let echoes = b.echoes.get(p).copied().unwrap_or(0);
            report.echoes += echoes;
            if b.reported.contains(id) {
                report.reported += 1;
                continue;
            }
            if times.is_empty() {
                report.lost += 1;
                if std::env::var_os("KITESTRING_DEMO_DEBUG").is_some() {
                    let acked = b.acked.iter().any(|&(f, l)| f <= *id && *id <= l);
                    eprintln!(
                        "lost message: payload {p} id {id} acknowledged {acked} echoes {echoes} recovered {} lost session {}",
                        b.recovered, b.lost_session
                    );
                }
                continue;
            }
            report.handled += 1;
            report.handled_again += times.len() as u64 - 1;
            if times.iter().any(|h| h != id) {
                report.duplicated += 1;
            }
            if echoes > times.len() as u64 {
                report.duplicated += 1;
            }
            if echoes == 0 {
                if b.recovered > 0 {
                    report.echoes_gone_in_crashes += 1;
                } else {
                    report.lost += 1;
                }
            }
        }
    }
    let room = room_books(&books, true);
    report.room_published = room.published;
    report.room_acked = room.acked;
    report.room_refused = room.refused;
    report.room_delivered = room.delivered;
    report.room_excused = room.excused;
    report.room_lost = room.lost;
    report.room_duplicated = room.duplicated;
    report.lost += room.lost;
    report.duplicated += room.duplicated;
    for c in clients {
        let _ = c.close().await;
    }
    for r in readers {
        r.abort();
    }
    for n in &mut nodes {
        n.stop();
    }
    Ok(report)
}

/// The room's books, from every client's.
#[derive(Default)]
struct RoomBooks {
    published: u64,
    acked: u64,
    refused: u64,
    delivered: u64,
    excused: u64,
    lost: u64,
    duplicated: u64,
}

fn room_books(books: &[Arc<Mutex<ClientBook>>], report: bool) -> RoomBooks {
    let debug = report && std::env::var_os("KITESTRING_DEMO_DEBUG").is_some();
    let books: Vec<_> = books
        .iter()
        .map(|b| b.lock().unwrap_or_else(|e| e.into_inner()))
        .collect();
    let mut r = RoomBooks::default();
    for (c, b) in books.iter().enumerate() {
        for got in b.room_got.values() {
            r.delivered += got.len() as u64;
            // Strictly increasing per publisher: no duplicate, no reorder.
            r.duplicated += got.windows(2).filter(|w| w[0] >= w[1]).count() as u64;
            if debug {
                for (i, w) in got.windows(2).enumerate() {
                    if w[0] >= w[1] {
                        let from = i.saturating_sub(3);
                        let to = (i + 4).min(got.len());
                        eprintln!(
                            "receiver {c}: {:?} (missed {}, lost {})",
                            &got[from..to],
                            b.missed,
                            b.lost_session
                        );
                    }
                }
            }
        }
        for (k, id) in &b.published {
            r.published += 1;
            if b.refused.contains(id) {
                r.refused += 1;
                continue;
            }
            if !b.acked.iter().any(|&(f, l)| f <= *id && *id <= l) {
                continue; // its fate unknown (unconfirmed): owed to nobody
            }
            r.acked += 1;
            for (o, other) in books.iter().enumerate() {
                if o == c {
                    continue;
                }
                let received = other
                    .room_got
                    .get(&(c as u64))
                    .is_some_and(|ks| ks.contains(k));
                if received {
                    continue;
                }
                if other.missed > 0 || other.lost_session {
                    r.excused += 1;
                } else {
                    r.lost += 1;
                    if debug && r.lost < 40 {
                        let got = other.room_got.get(&(c as u64));
                        let near: Vec<u64> = got
                            .map(|g| g.iter().copied().filter(|x| x.abs_diff(*k) < 12).collect())
                            .unwrap_or_default();
                        eprintln!("lost: publisher {c} k {k} id {id} receiver {o}: near {near:?}");
                        if r.lost == 1 {
                            for l in &other.trail {
                                eprintln!("  trail of receiver {o}: {l}");
                            }
                        }
                    }
                }
            }
        }
    }
    r
}
