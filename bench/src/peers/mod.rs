//! The peers scenarios: Kitestring against socketioxide, the Node.js
//! socket.io server and the floor (tokio-tungstenite fed by a
//! `tokio::sync::broadcast` channel), measured in the same run.
//!
//! `peers-idle`, `peers-fanout`, `peers-echo` and `peers-connect`, or
//! `peers` for the four. Each server runs in a child process of its own
//! ([`serve`]); one load generator in this process ([`load`], speaking each
//! protocol by hand through [`wire`]) drives all of them the same way and
//! checks that every message arrives exactly once and in order. Each
//! repetition measures every server against a fresh child, in an order that
//! rotates between repetitions; a row gives the medians and the range
//! (min-max) of the repetitions, and is marked FAILED when either side lost,
//! duplicated or reordered a message, or refused or dropped a connection.
//! Server CPU is the child's threads' time on the CPU from their scheduler
//! statistics in /proc ([`net::thread_cpu_seconds`]), read at the start
//! and the end of what is measured.
//!
//! The Node.js server needs `node` and `npm`: its folder
//! (`bench/peers/socketio`) gets `npm ci` when `node_modules` is missing,
//! and its rows are left out, with one line saying so, where either is
//! absent.

pub(crate) mod load;
pub(crate) mod serve;
pub(crate) mod wire;

pub(crate) use self::wire::fanout_payload;

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kitestring::Codec;

use self::load::{Fleet, Role};
use self::wire::Proto;
use crate::net::{self, Child};
use crate::{Failure, Figure, Kind, Options, Range};

/// A server of the peers scenarios.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Server {
    /// Kitestring, its clients speaking this codec.
    Kitestring(Codec),
    Socketioxide,
    SocketioNode,
    Floor,
    /// Kitestring whose application does [`serve::APP_WORK`] per message
    /// on this many tasks, one per event shard.
    KitestringWork(u8),
    /// The floor doing the same work per message in its connection tasks.
    FloorWork,
    /// Kitestring whose application handles events inline, on the
    /// connection tasks, doing [`serve::APP_WORK`] per message if `work`.
    KitestringInline {
        work: bool,
    },
}

/// Kitestring as its clients speak it by default (MessagePack): the side
/// every target is about.
const KITESTRING: Server = Server::Kitestring(Codec::MsgPack);

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Kitestring(Codec::Json) => "kitestring-json",
            Server::Kitestring(_) => "kitestring",
            Server::Socketioxide => "socketioxide",
            Server::SocketioNode => "socket.io-node",
            Server::Floor => "floor",
            Server::KitestringWork(1) => "kitestring-1-task",
            Server::KitestringWork(_) => "kitestring-2-shards",
            Server::FloorWork => "floor-work",
            Server::KitestringInline { work: false } => "kitestring-inline",
            Server::KitestringInline { work: true } => "kitestring-inline-work",
        }
    }

    /// The child server: `inner server <this>`.
    fn child(self) -> &'static str {
        match self {
            Server::Kitestring(_) => "kitestring",
            Server::Socketioxide => "socketioxide",
            Server::SocketioNode => "socketio-node",
            Server::Floor => "floor",
            Server::KitestringWork(1) => "kitestring-work-1",
            Server::KitestringWork(_) => "kitestring-work-2",
            Server::FloorWork => "floor-work",
            Server::KitestringInline { work: false } => "kitestring-inline",
            Server::KitestringInline { work: true } => "kitestring-inline-work",
        }
    }

    fn proto(self) -> Proto {
        match self {
            Server::Kitestring(codec) => Proto::Kitestring(codec),
            Server::KitestringWork(_) | Server::KitestringInline { .. } => {
                Proto::Kitestring(Codec::MsgPack)
            }
            Server::Socketioxide | Server::SocketioNode => Proto::SocketIo,
            Server::Floor | Server::FloorWork => Proto::Floor,
        }
    }
}

/// The servers to measure: Kitestring, with its JSON clients too when
/// `json`, then the others; the Node.js server only where it can run.
///
/// `PEERS_ONLY` (a comma-separated list of names as the rows give them,
/// e.g. `kitestring,floor`) keeps only those, for profiling one server.
fn servers(json: bool) -> Vec<Server> {
    let mut v = vec![KITESTRING];
    if json {
        v.push(Server::Kitestring(Codec::Json));
    }
    v.extend([Server::Socketioxide, Server::SocketioNode, Server::Floor]);
    only_chosen(&mut v);
    if v.contains(&Server::SocketioNode) && !node_ready() {
        v.retain(|s| *s != Server::SocketioNode);
    }
    v
}

/// Keeps the servers `PEERS_ONLY` names, if it is set.
fn only_chosen(v: &mut Vec<Server>) {
    if let Ok(only) = std::env::var("PEERS_ONLY") {
        v.retain(|s| only.split(',').any(|n| n.trim() == s.name()));
    }
}

/// Whether the Node.js server can run: `node` and `npm` answer, and its
/// packages are installed (`npm ci` when `node_modules` is missing). Says
/// why not, once.
pub(crate) fn node_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        let works = |tool: &str| {
            Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let skip = |why: &str| {
            eprintln!("socket.io-node: skipped, {why}");
            false
        };
        if !works("node") {
            return skip("`node` not found");
        }
        if !works("npm") {
            return skip("`npm` not found");
        }
        let dir = serve::socketio_dir();
        if !dir.join("node_modules").exists() {
            eprintln!("socket.io-node: npm ci in {}", dir.display());
            let ok = Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund"])
                .current_dir(&dir)
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return skip("`npm ci` failed");
            }
        }
        true
    })
}

/// One repetition of one server: a value per metric, and what went wrong.
struct Run {
    values: Vec<f64>,
    failure: Option<String>,
}

/// Every server's runs of one scenario.
struct Table {
    servers: Vec<Server>,
    /// `runs[server][repetition]`.
    runs: Vec<Vec<Run>>,
}

impl Table {
    /// Runs `one` for every server `reps` times, the servers' order
    /// rotating by one place each repetition.
    fn measure(servers: Vec<Server>, reps: usize, mut one: impl FnMut(Server) -> Run) -> Table {
        let mut runs: Vec<Vec<Run>> = servers.iter().map(|_| Vec::new()).collect();
        for rep in 0..reps {
            for k in 0..servers.len() {
                let i = (k + rep) % servers.len();
                let run = one(servers[i]);
                if let Some(f) = &run.failure {
                    eprintln!("  FAILED {}: {f}", servers[i].name());
                }
                runs[i].push(run);
            }
        }
        Table { servers, runs }
    }

    /// Metric `m` of `server`: its median and its range.
    fn stat(&self, server: Server, m: usize) -> Option<(f64, (f64, f64))> {
        let i = self.servers.iter().position(|s| *s == server)?;
        let mut v: Vec<f64> = self.runs[i].iter().map(|r| r.values[m]).collect();
        let median = net::median(&mut v);
        Some((median, (v[0], v[v.len() - 1])))
    }

    fn failure(&self, server: Server) -> Option<String> {
        let i = self.servers.iter().position(|s| *s == server)?;
        let f: Vec<&str> = self.runs[i]
            .iter()
            .filter_map(|r| r.failure.as_deref())
            .collect();
        let first = f.first()?;
        Some(format!(
            "{} in {} of {} runs (the first: {first})",
            server.name(),
            f.len(),
            self.runs[i].len()
        ))
    }

    /// Prints every server's median and range of metric `m`.
    fn log(&self, what: &str, m: usize, unit: &str) {
        for s in &self.servers {
            if let Some((med, (lo, hi))) = self.stat(*s, m) {
                eprintln!(
                    "  {what}: {:<16} {med:>12.2} {unit} ({lo:.2}-{hi:.2})",
                    s.name()
                );
            }
        }
    }

    /// One row of metric `m`: `ours` against `other`, without a target.
    fn compare(
        &self,
        label: &str,
        m: usize,
        metric: &'static str,
        higher_is_better: bool,
        ours: Server,
        other: Server,
    ) -> Vec<Figure> {
        let scenario = format!("peers {label}: {} vs {}", ours.name(), other.name());
        self.figure(
            scenario,
            m,
            metric,
            higher_is_better,
            (ours, other),
            None,
            true,
        )
        .into_iter()
        .collect()
    }

    /// The figure of metric `m`, `ours` against `other`, if both were
    /// measured; a failure of either marks it failed (`fatal`: counted as
    /// ours).
    #[allow(clippy::too_many_arguments)]
    fn figure(
        &self,
        scenario: String,
        m: usize,
        metric: &'static str,
        higher_is_better: bool,
        (ours, other): (Server, Server),
        target: Option<f64>,
        fatal: bool,
    ) -> Option<Figure> {
        let (o, o_range) = self.stat(ours, m)?;
        let (b, b_range) = self.stat(other, m)?;
        let failed: Vec<String> = [self.failure(ours), self.failure(other)]
            .into_iter()
            .flatten()
            .collect();
        Some(Figure {
            scenario,
            metric,
            ours: o,
            baseline: b,
            higher_is_better,
            target,
            kind: Kind::Ratio,
            range: Some(Range {
                ours: o_range,
                baseline: b_range,
                runs: self.runs[0].len(),
            }),
            failed: (!failed.is_empty()).then(|| Failure {
                why: failed.join("; "),
                ours: fatal,
            }),
        })
    }

    /// Rows of metric `m`: Kitestring (and its JSON clients, if measured)
    /// against every other server, with the targets `targets` gives.
    fn rows(
        &self,
        label: &str,
        m: usize,
        metric: &'static str,
        higher_is_better: bool,
        targets: &[(Server, f64)],
    ) -> Vec<Figure> {
        let mut figures = Vec::new();
        let ours_sides = [KITESTRING, Server::Kitestring(Codec::Json)];
        for ours in ours_sides {
            for &other in &self.servers {
                if matches!(other, Server::Kitestring(_)) {
                    continue;
                }
                // The JSON clients are compared with the floor and
                // socketioxide only, for reference.
                if ours != KITESTRING && other == Server::SocketioNode {
                    continue;
                }
                let target = if ours == KITESTRING {
                    targets.iter().find(|(s, _)| *s == other).map(|(_, t)| *t)
                } else {
                    None
                };
                // Kitestring and the floor are this repository's code.
                let fatal = self.failure(ours).is_some()
                    || (other == Server::Floor && self.failure(other).is_some());
                let side = if ours == KITESTRING { "" } else { " (json)" };
                let scenario = format!("peers {label}{side} vs {}", other.name());
                figures.extend(self.figure(
                    scenario,
                    m,
                    metric,
                    higher_is_better,
                    (ours, other),
                    target,
                    fatal,
                ));
            }
        }
        figures
    }
}

fn port_of(child: &mut Child) -> u16 {
    child.expect("port").parse().expect("port number")
}

/// Asks the child for its counts (connections opened, joins) until `done`
/// says enough or `limit` passes, every `every`; false on the limit.
async fn wait_count(
    child: &mut Child,
    done: impl Fn(usize, usize) -> bool,
    every: Duration,
    limit: Duration,
) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        child.send("count");
        let reply = child.line_async();
        let mut w = reply.split_whitespace().skip(1);
        let a: usize = w.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let b: usize = w.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        if done(a, b) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

/// Starts `server`'s child and reads its port.
fn spawn(server: Server) -> (Child, u16) {
    let mut child = Child::spawn(&["server", server.child()]);
    let port = port_of(&mut child);
    (child, port)
}

/// Connections opened at once while building a fleet.
const CONCURRENCY: usize = 200;

/// The failure of a run: the fleet's violations, then `more`.
fn failure(fleet: &Fleet, more: Option<String>) -> Option<String> {
    match (fleet.tally.failure(), more) {
        (Some(a), Some(b)) => Some(format!("{a}; {b}")),
        (a, b) => a.or(b),
    }
}

/// Idle memory: `n` connections, each joined to the room, and the server
/// process's resident memory over its value before the first, per
/// connection.
pub(crate) fn idle_scenario(opts: &Options) -> Vec<Figure> {
    let (n, reps) = if opts.quick { (100, 1) } else { (10_000, 5) };
    let rt = net::tokio_runtime();
    let table = Table::measure(servers(false), reps, |server| {
        let (mut child, port) = spawn(server);
        // Let the runtime (node's above all) finish starting.
        std::thread::sleep(Duration::from_millis(500));
        let rss0 = child.rss_kib();
        rt.block_on(async {
            let fleet = Fleet::open(server.proto(), port, n, CONCURRENCY, |_| Role::Listen).await;
            let all = wait_count(
                &mut child,
                |_, j| j >= n,
                Duration::from_millis(50),
                Duration::from_secs(60),
            )
            .await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let kib = child.rss_kib().saturating_sub(rss0) as f64 / n as f64;
            let run = Run {
                values: vec![kib],
                failure: failure(&fleet, (!all).then(|| "not every join arrived".into())),
            };
            fleet.close();
            run
        })
    });
    table.log(&format!("idle {n}"), 0, "KiB/connection");
    table.rows(
        &format!("idle {n}"),
        0,
        "server RSS KiB/connection",
        false,
        &[(Server::Floor, 1.1)],
    )
}

/// Room fan-out of 32-byte messages: deliveries per second, and the server
/// process's CPU seconds per million deliveries.
pub(crate) fn fanout_scenario(opts: &Options) -> Vec<Figure> {
    // Members and messages per burst: bursts fit every server's
    // per-connection buffers (Kitestring's send window and socketioxide's
    // buffer, 1 024 messages) with room to spare.
    let (sizes, bursts, reps): (&[(usize, u64)], u64, usize) = if opts.quick {
        (&[(50, 20), (200, 10)], 1, 1)
    } else {
        (&[(1_000, 300), (10_000, 50)], 5, 5)
    };
    let rt = net::tokio_runtime();
    let mut figures = Vec::new();
    for &(n, m) in sizes {
        let table = Table::measure(servers(true), reps, |server| {
            let (mut child, port) = spawn(server);
            rt.block_on(async {
                let fleet =
                    Fleet::open(server.proto(), port, n, CONCURRENCY, |_| Role::Listen).await;
                let joined = wait_count(
                    &mut child,
                    |_, j| j >= n,
                    Duration::from_millis(50),
                    Duration::from_secs(60),
                )
                .await;
                let delivered = &fleet.tally.fanout;
                let mut lost = None;
                // A warm-up burst, then the measured one.
                let warm = (m / 5).max(1);
                let mut want = n as u64 * warm;
                child.send(&format!("broadcast {warm}"));
                if !load::wait_for(delivered, want, Duration::from_secs(60)).await {
                    lost = Some(want - delivered.load(Ordering::Relaxed));
                }
                child.expect("sent");
                // The measured bursts: the clock and the CPU time run from
                // each command until its last delivery.
                let (mut secs, mut cpu) = (0.0, 0.0);
                for _ in 0..bursts {
                    let before = delivered.load(Ordering::Relaxed);
                    want = before + n as u64 * m;
                    let c0 = child.thread_cpu_seconds();
                    let t = Instant::now();
                    child.send(&format!("broadcast {m}"));
                    let ok = load::wait_for(delivered, want, Duration::from_secs(60)).await;
                    secs += t.elapsed().as_secs_f64();
                    cpu += child.thread_cpu_seconds() - c0;
                    child.expect("sent");
                    if !ok {
                        lost = Some(lost.unwrap_or(0) + want - delivered.load(Ordering::Relaxed));
                        break;
                    }
                }
                // Anything beyond what was sent would be a duplicate (the
                // sequence check catches those first).
                tokio::time::sleep(Duration::from_millis(200)).await;
                let extra = delivered.load(Ordering::Relaxed).saturating_sub(want);
                let total = (n as u64 * m * bursts) as f64;
                let more = match (joined, lost, extra) {
                    (false, _, _) => Some("not every join arrived".to_owned()),
                    (_, Some(l), _) => Some(format!("{l} deliveries missing after 60 s")),
                    (_, _, e) if e > 0 => Some(format!("{e} deliveries too many")),
                    _ => None,
                };
                let run = Run {
                    values: vec![total / secs, cpu / total * 1e6],
                    failure: failure(&fleet, more),
                };
                fleet.close();
                run
            })
        });
        let label = format!("fan-out {n}");
        table.log(&label, 0, "deliveries/s");
        table.log(&label, 1, "CPU s per 1M deliveries");
        figures.extend(table.rows(
            &label,
            0,
            "deliveries/s",
            true,
            &[(Server::Socketioxide, 2.0), (Server::Floor, 0.5)],
        ));
        figures.extend(table.rows(
            &label,
            1,
            "server CPU s per 1M deliveries",
            false,
            &[(Server::Socketioxide, 0.5)],
        ));
    }
    figures
}

/// Pipelined echo: 100 connections, 16 messages in flight on each.
///
/// Kitestring twice: its application taking events from the stream on a
/// task of its own, and handling them inline on the connection tasks
/// ([`kitestring::ServerEvents::handle_inline`]), as the floor's and
/// socketioxide's handlers run.
pub(crate) fn echo_scenario(opts: &Options) -> Vec<Figure> {
    let mut servers = servers(true);
    let mut inline = vec![Server::KitestringInline { work: false }];
    only_chosen(&mut inline);
    if !inline.is_empty() {
        servers.insert(servers.len().min(1), inline[0]);
    }
    let (label, table) = echo_table(servers, opts);
    table.log(&label, 0, "messages/s");
    table.log(&label, 1, "CPU us/message");
    let mut figures = table.rows(&label, 0, "messages/s", true, &[(Server::Floor, 0.6)]);
    figures.extend(table.rows(&label, 1, "server CPU us/message", false, &[]));
    figures
}

/// The same echo with [`serve::APP_WORK`] of application work per message:
/// Kitestring with one event stream handled by one task, with two event
/// shards each handled by a task of its own, and the floor doing the work
/// in its connection tasks. On two cores the work can use both only when
/// the application's handling is spread.
pub(crate) fn echo_work_scenario(opts: &Options) -> Vec<Figure> {
    let mut servers = vec![
        Server::KitestringWork(1),
        Server::KitestringWork(2),
        Server::KitestringInline { work: true },
        Server::FloorWork,
    ];
    only_chosen(&mut servers);
    let (label, table) = echo_table(servers, opts);
    let label = format!("{label} with work");
    table.log(&label, 0, "messages/s");
    table.log(&label, 1, "CPU us/message");
    let two = Server::KitestringWork(2);
    let mut figures = table.compare(
        &label,
        0,
        "messages/s",
        true,
        two,
        Server::KitestringWork(1),
    );
    figures.extend(table.compare(&label, 0, "messages/s", true, two, Server::FloorWork));
    figures
}

/// Runs the pipelined echo against `servers`.
fn echo_table(servers: Vec<Server>, opts: &Options) -> (String, Table) {
    const CONNS: usize = 100;
    // `KITESTRING_BENCH_PEERS_WINDOW=1` (or any other) sets the messages in
    // flight on each connection, 16 by default (BENCHMARKS.md).
    let window: u64 = std::env::var("KITESTRING_BENCH_PEERS_WINDOW")
        .ok()
        .and_then(|w| w.parse().ok())
        .filter(|&w| w > 0)
        .unwrap_or(16);
    let (count, reps) = if opts.quick { (20, 1) } else { (5_000, 5) };
    // `KITESTRING_BENCH_PEERS_COUNT=220` sets the messages each connection
    // echoes: two counts under callgrind give the cost of one message.
    let count: u64 = std::env::var("KITESTRING_BENCH_PEERS_COUNT")
        .ok()
        .and_then(|c| c.parse().ok())
        .filter(|&c| c > 0)
        .unwrap_or(count);
    let rt = net::tokio_runtime();
    let table = Table::measure(servers, reps, |server| {
        let (mut child, port) = spawn(server);
        rt.block_on(async {
            let (go, go_rx) = tokio::sync::watch::channel(false);
            let fleet = Fleet::open(server.proto(), port, CONNS, CONCURRENCY, |_| Role::Echo {
                count,
                window,
                go: go_rx.clone(),
            })
            .await;
            let joined = wait_count(
                &mut child,
                |_, j| j >= CONNS,
                Duration::from_millis(20),
                Duration::from_secs(60),
            )
            .await;
            let c0 = child.thread_cpu_seconds();
            let t = Instant::now();
            let _ = go.send(true);
            let ok = load::wait_for(
                &fleet.tally.echo_done,
                fleet.len() as u64,
                Duration::from_secs(120),
            )
            .await;
            let secs = t.elapsed().as_secs_f64();
            let cpu = child.thread_cpu_seconds() - c0;
            let total = CONNS as u64 * count;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let echoed = fleet.tally.echoed.load(Ordering::Relaxed);
            let more = match (joined, ok, echoed) {
                (false, _, _) => Some("not every join arrived".to_owned()),
                (_, false, e) => Some(format!(
                    "{} echoes missing after 120 s",
                    total - e.min(total)
                )),
                (_, _, e) if e != total => Some(format!("{e} echoes for {total} messages")),
                _ => None,
            };
            let run = Run {
                values: vec![total as f64 / secs, cpu / total as f64 * 1e6],
                failure: failure(&fleet, more),
            };
            fleet.close();
            run
        })
    });
    (format!("echo {CONNS}c w{window}"), table)
}

/// Connect rate: `n` connections opened `workers` at a time, each through
/// its handshake and a join; the clock stops when the server has counted
/// every join.
pub(crate) fn connect_scenario(opts: &Options) -> Vec<Figure> {
    let (n, workers, reps) = if opts.quick {
        (200, 16, 1)
    } else {
        (10_000, 64, 5)
    };
    // `KITESTRING_BENCH_PEERS_CONNECTS=1200` sets the connections of each
    // repetition: two counts under callgrind give the cost of one.
    let n: usize = std::env::var("KITESTRING_BENCH_PEERS_CONNECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(n);
    let rt = net::tokio_runtime();
    let table = Table::measure(servers(false), reps, |server| {
        let (mut child, port) = spawn(server);
        rt.block_on(async {
            let c0 = child.thread_cpu_seconds();
            let t = Instant::now();
            let fleet = Fleet::open(server.proto(), port, n, workers, |_| Role::Listen).await;
            let joined = wait_count(
                &mut child,
                |_, j| j >= n,
                Duration::from_millis(2),
                Duration::from_secs(60),
            )
            .await;
            let secs = t.elapsed().as_secs_f64();
            let cpu = child.thread_cpu_seconds() - c0;
            let run = Run {
                values: vec![n as f64 / secs, cpu / n as f64 * 1e6],
                failure: failure(&fleet, (!joined).then(|| "not every join arrived".into())),
            };
            fleet.close();
            run
        })
    });
    let label = format!("connect {n}");
    table.log(&label, 0, "connections/s");
    table.log(&label, 1, "CPU us/connection");
    let mut figures = table.rows(
        &label,
        0,
        "connections/s (with join)",
        true,
        &[(Server::Floor, 1.0)],
    );
    figures.extend(table.rows(
        &label,
        1,
        "server CPU us/connection",
        false,
        &[(Server::Floor, 1.0)],
    ));
    figures
}
