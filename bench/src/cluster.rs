//! The cluster scenarios (`cluster-fanout`, `cluster-resume`): server nodes
//! in child processes sharing a private `redis-server`, clients in this
//! process.
//!
//! - Room fan-out to members spread over three nodes, against the same
//!   members on one node with the same Redis, and on one node without a
//!   backplane; and the Redis commands each broadcast costs (from Redis's
//!   own `INFO commandstats`, so commands run inside scripts count). The
//!   same for the Node.js socket.io server with its Redis streams adapter
//!   (`bench/peers/socketio`), where `node` and `npm` are at hand. Both
//!   sides' members are the peers scenarios' load generator
//!   ([`crate::peers::load`]), which checks that every broadcast arrives
//!   once and in order.
//! - A resume on another node (the session claimed, exported, stored,
//!   taken and imported) against a resume on the node that holds it, the
//!   clients moved by a proxy playing the load balancer.
//!
//! Every node and Redis share the machine's cores with the clients:
//! what three nodes on one machine measure is the cost of going through
//! Redis, not what three machines would give.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kitestring::{ClientOptions, Event, State};
use kitestring_chaos::Proxy;
use kitestring_redis::testing::RedisServer;

use crate::net::{self, Child};
use crate::peers::load::{Fleet, Role};
use crate::peers::wire::Proto;
use crate::{Failure, Figure, Kind, Options, Range};

/// Connections opened at once.
const CONCURRENCY: usize = 200;

/// Whose nodes.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
enum System {
    Kitestring,
    /// The Node.js socket.io server (`bench/peers/socketio`), on Redis
    /// through socket.io's Redis streams adapter.
    SocketIo,
}

/// How the members are served.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
enum Setup {
    /// One node, no backplane.
    Alone,
    /// One node with Redis.
    OneNode,
    /// Three nodes with Redis, members spread evenly.
    ThreeNodes,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::Alone => "alone",
            Setup::OneNode => "one node on Redis",
            Setup::ThreeNodes => "three nodes on Redis",
        }
    }
}

/// Starts the setup's Kitestring nodes, their clients joining the room
/// themselves: `(children, ports)`.
fn start_nodes(setup: Setup, redis: &RedisServer) -> (Vec<Child>, Vec<u16>) {
    start(System::Kitestring, setup, redis, "1")
}

/// Starts `system`'s nodes for `setup` (`rooms`: the `ours` child's room
/// mode, see [`crate::child`]): `(children, ports)`.
fn start(system: System, setup: Setup, redis: &RedisServer, rooms: &str) -> (Vec<Child>, Vec<u16>) {
    let url = redis.url();
    let names: &[&str] = match setup {
        Setup::Alone => &[],
        Setup::OneNode => &["n0"],
        Setup::ThreeNodes => &["n0", "n1", "n2"],
    };
    let base: Vec<&str> = match system {
        System::Kitestring => vec!["server", "ours", "30000", rooms, "256"],
        System::SocketIo => vec!["server", "socketio-node"],
    };
    let mut children = Vec::new();
    if names.is_empty() {
        children.push(Child::spawn(&base));
    }
    for name in names {
        let mut a = base.clone();
        a.push(&url);
        if system == System::Kitestring {
            a.push(name);
        }
        children.push(Child::spawn(&a));
    }
    let ports = children
        .iter_mut()
        .map(|c| c.expect("port").parse().expect("port number"))
        .collect();
    (children, ports)
}

/// Members the nodes joined to the room, summed.
fn joined(children: &mut [Child]) -> usize {
    children
        .iter_mut()
        .map(|c| {
            c.send("count");
            let reply = c.line();
            reply
                .split_whitespace()
                .nth(2)
                .and_then(|s| s.parse::<usize>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// Redis's own counts so far.
#[derive(Clone, Copy, Default)]
struct RedisStats {
    /// Commands, those run by scripts included, `INFO` left out.
    commands: u64,
    /// Script calls among them.
    scripts: u64,
}

/// Reads [`RedisStats`] from `INFO commandstats`.
fn redis_stats(redis: &RedisServer) -> RedisStats {
    let mut stats = RedisStats::default();
    let Ok(client) = redis::Client::open(redis.url()) else {
        return stats;
    };
    let Ok(mut c) = client.get_connection() else {
        return stats;
    };
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut c)
        .unwrap_or_default();
    for line in info.lines() {
        let Some(rest) = line.strip_prefix("cmdstat_") else {
            continue;
        };
        let Some((name, counts)) = rest.split_once(':') else {
            continue;
        };
        let calls: u64 = counts
            .split(',')
            .find_map(|kv| kv.strip_prefix("calls="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if name == "info" {
            continue;
        }
        stats.commands += calls;
        if name.starts_with("eval") {
            stats.scripts += calls;
        }
    }
    stats
}

/// What one fan-out run measured.
struct Fanout {
    /// Deliveries per second.
    rate: f64,
    /// Redis commands per broadcast.
    calls: f64,
    /// Why the run cannot be trusted, if it cannot.
    failed: Option<String>,
}

/// Messages delivered over all of `fleets`.
fn delivered(fleets: &[Fleet]) -> u64 {
    fleets
        .iter()
        .map(|f| f.tally.fanout.load(Ordering::Relaxed))
        .sum()
}

/// Waits until `fleets` have received `want` messages, or `limit` passes:
/// false on the limit.
async fn wait_delivered(fleets: &[Fleet], want: u64, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while delivered(fleets) < want {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    true
}

/// One fan-out run: `n` members spread over the setup's nodes, a warm-up
/// burst, then `m` broadcasts from the first node, each member checking
/// that every one arrives once and in order.
fn fanout_once(system: System, setup: Setup, n: usize, m: u64) -> Option<Fanout> {
    // A Redis of its own: what an earlier run's nodes left there (their
    // members, for the next process of the same name to tidy up) must not
    // weigh on this one.
    let Ok(redis) = RedisServer::start() else {
        eprintln!("  cluster-fanout: no redis-server (Debian: apt-get install redis-server)");
        return None;
    };
    let redis = &redis;
    let rt = net::tokio_runtime();
    // Kitestring's members join the room themselves, as socket.io's do.
    let (mut children, ports) = start(system, setup, redis, "2");
    let proto = match system {
        System::Kitestring => Proto::Kitestring(kitestring::Codec::MsgPack),
        System::SocketIo => Proto::SocketIo,
    };
    let r = rt.block_on(async {
        let mut fleets = Vec::new();
        for (k, port) in ports.iter().enumerate() {
            let share = n / ports.len() + usize::from(k < n % ports.len());
            fleets.push(Fleet::open(proto, *port, share, CONCURRENCY, |_| Role::Listen).await);
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut all_joined = false;
        while !all_joined && Instant::now() < deadline {
            all_joined = joined(&mut children) >= n;
            if !all_joined {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut failed = (!all_joined).then(|| "not every member joined".to_owned());
        // A warm-up burst (connections, scripts, the JIT), then the
        // measured one.
        let warm = (m / 5).max(1);
        children[0].send(&format!("broadcast {warm}"));
        if !wait_delivered(&fleets, n as u64 * warm, Duration::from_secs(60)).await {
            failed.get_or_insert_with(|| {
                format!(
                    "{} of {} warm-up deliveries missing after 60 s",
                    n as u64 * warm - delivered(&fleets),
                    n as u64 * warm
                )
            });
        }
        children[0].expect("sent");
        let before = delivered(&fleets);
        let total = n as u64 * m;
        let r0 = redis_stats(redis);
        let t = Instant::now();
        children[0].send(&format!("broadcast {m}"));
        let ok = wait_delivered(&fleets, before + total, Duration::from_secs(120)).await;
        let secs = t.elapsed().as_secs_f64();
        children[0].expect("sent");
        let r1 = redis_stats(redis);
        if !ok {
            failed.get_or_insert_with(|| {
                format!(
                    "{} of {total} deliveries missing after 120 s",
                    before + total - delivered(&fleets)
                )
            });
        }
        // Anything beyond what was sent would be a duplicate (the
        // sequence check catches those first).
        tokio::time::sleep(Duration::from_millis(200)).await;
        let extra = delivered(&fleets).saturating_sub(before + total);
        if extra > 0 {
            failed.get_or_insert_with(|| format!("{extra} deliveries beyond what was sent"));
        }
        for f in &fleets {
            if let Some(why) = f.tally.failure() {
                failed.get_or_insert(why);
            }
        }
        for f in fleets {
            f.close();
        }
        // Per broadcast (each is delivered to all `n` members).
        let per = |x: u64| x as f64 / m as f64;
        eprintln!(
            "  {system:?}, {}: {:.0} deliveries/s; per broadcast: {:.2} Redis commands, {:.2} script calls{}",
            setup.name(),
            total as f64 / secs,
            per(r1.commands.saturating_sub(r0.commands)),
            per(r1.scripts.saturating_sub(r0.scripts)),
            failed.as_deref().map(|f| format!("; FAILED: {f}")).unwrap_or_default(),
        );
        Fanout {
            rate: total as f64 / secs,
            calls: per(r1.commands.saturating_sub(r0.commands)),
            failed,
        }
    });
    drop(children);
    Some(r)
}

/// `cluster-fanout`: 32 B broadcasts to 10 000 members over three nodes,
/// against one node with and without Redis, for Kitestring and for
/// socket.io with its Redis streams adapter, every setup in turn in each
/// repetition.
pub(crate) fn fanout_scenario(opts: &Options) -> Vec<Figure> {
    let (n, m, reps) = if opts.quick {
        (60, 10, 1)
    } else {
        (10_000, 50, 3)
    };
    let mut systems = vec![System::Kitestring];
    if crate::peers::node_ready() {
        systems.push(System::SocketIo);
    }
    let setups = [Setup::Alone, Setup::OneNode, Setup::ThreeNodes];
    let mut rates: HashMap<(System, Setup), Vec<f64>> = HashMap::new();
    let mut calls: HashMap<System, Vec<f64>> = HashMap::new();
    let mut failures: HashMap<System, String> = HashMap::new();
    for rep in 0..reps {
        // The order rotates between repetitions.
        let mut order: Vec<(System, Setup)> = systems
            .iter()
            .flat_map(|s| setups.iter().map(move |u| (*s, *u)))
            .collect();
        let len = order.len();
        order.rotate_left(rep % len);
        for (system, setup) in order {
            let Some(run) = fanout_once(system, setup, n, m) else {
                return Vec::new();
            };
            if let Some(f) = run.failed {
                failures
                    .entry(system)
                    .or_insert(format!("{}: {f}", setup.name()));
                continue;
            }
            rates.entry((system, setup)).or_default().push(run.rate);
            if setup == Setup::ThreeNodes {
                calls.entry(system).or_default().push(run.calls);
            }
        }
    }
    let failure = |a: System, b: System| {
        [a, b].into_iter().find_map(|s| {
            failures.get(&s).map(|why| Failure {
                why: format!("{s:?}, {why}"),
                ours: s == System::Kitestring,
            })
        })
    };
    let figure = |scenario: String, ours: (System, Setup), base: (System, Setup)| {
        let mut o = rates.get(&ours).cloned().unwrap_or_default();
        let mut b = rates.get(&base).cloned().unwrap_or_default();
        let range = Range {
            ours: min_max(&o),
            baseline: min_max(&b),
            runs: o.len().min(b.len()),
        };
        Figure {
            scenario,
            metric: "deliveries/s",
            ours: net::median(&mut o),
            baseline: net::median(&mut b),
            higher_is_better: true,
            target: None,
            kind: Kind::Ratio,
            range: Some(range),
            failed: failure(ours.0, base.0),
        }
    };
    use Setup::*;
    use System::*;
    let mut figures = vec![
        figure(
            format!("fan-out to {n} over 3 nodes vs 1 node, Redis"),
            (Kitestring, ThreeNodes),
            (Kitestring, OneNode),
        ),
        figure(
            format!("fan-out to {n} over 3 nodes vs 1 node alone"),
            (Kitestring, ThreeNodes),
            (Kitestring, Alone),
        ),
        figure(
            format!("fan-out to {n} on 1 node, Redis vs alone"),
            (Kitestring, OneNode),
            (Kitestring, Alone),
        ),
    ];
    if systems.contains(&SocketIo) {
        figures.extend([
            figure(
                format!("fan-out to {n} over 3 nodes on Redis vs socket.io's streams adapter"),
                (Kitestring, ThreeNodes),
                (SocketIo, ThreeNodes),
            ),
            figure(
                format!("socket.io: fan-out to {n} over 3 nodes vs 1 node, Redis"),
                (SocketIo, ThreeNodes),
                (SocketIo, OneNode),
            ),
            figure(
                format!("socket.io: fan-out to {n} on 1 node, Redis vs alone"),
                (SocketIo, OneNode),
                (SocketIo, Alone),
            ),
        ]);
    }
    // Redis's work with three nodes: ours, socket.io's as the baseline.
    let ours = calls.get(&Kitestring).cloned().unwrap_or_default();
    let theirs = calls.get(&SocketIo).cloned().unwrap_or_default();
    figures.push(Figure {
        scenario: format!("Redis commands per broadcast to {n} members on 3 nodes (vs socket.io)"),
        metric: "commands, those run by scripts included",
        ours: net::median(&mut ours.clone()),
        baseline: if theirs.is_empty() {
            f64::NAN
        } else {
            net::median(&mut theirs.clone())
        },
        higher_is_better: false,
        target: None,
        kind: Kind::Ratio,
        range: Some(Range {
            ours: min_max(&ours),
            baseline: min_max(&theirs),
            runs: ours.len().min(theirs.len().max(1)),
        }),
        failed: failure(Kitestring, SocketIo),
    });
    figures
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// `cluster-resume`: clients cut at once and resumed, on the node that
/// holds their sessions or on the other one, alternating: seconds from
/// the cut to each client's resumed session.
pub(crate) fn resume_scenario(opts: &Options) -> Vec<Figure> {
    let Ok(redis) = RedisServer::start() else {
        eprintln!("  cluster-resume: no redis-server (Debian: apt-get install redis-server)");
        return Vec::new();
    };
    let (n, reps) = if opts.quick { (10, 1) } else { (200, 4) };
    let rt = net::tokio_runtime();
    let (children, ports) = start_nodes(Setup::ThreeNodes, &redis);
    let nodes: Vec<std::net::SocketAddr> = ports
        .iter()
        .map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    let (same, other) = rt.block_on(async {
        let proxy = Proxy::start(nodes[0]).expect("proxy");
        // Per resume: from the client's first attempt after the cut (its
        // backoff before it is the client's, not the server's) to the
        // resumed session.
        let resumed: Arc<Mutex<Vec<Duration>>> = Arc::new(Mutex::new(Vec::new()));
        let lost = Arc::new(AtomicU64::new(0));
        let url = format!("ws://{}/", proxy.local_addr());
        let mut clients = Vec::new();
        for _ in 0..n {
            let (client, mut events) =
                net::ours_connect(kitestring_tokio::runtime(), &url, ClientOptions::default())
                    .await;
            let (resumed, lost) = (resumed.clone(), lost.clone());
            tokio::spawn(async move {
                let mut started: Option<Instant> = None;
                while let Some(e) = events.next().await {
                    match e {
                        Event::StateChanged {
                            new: State::Connecting { .. },
                            ..
                        } => {
                            started.get_or_insert_with(Instant::now);
                        }
                        Event::Connected { resumed: true, .. } => {
                            if let Some(t) = started.take() {
                                resumed
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push(t.elapsed());
                            }
                        }
                        Event::SessionLost { .. } => {
                            lost.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                }
            });
            clients.push(client);
        }
        let mut at = 0usize;
        let (mut same, mut other) = (Vec::new(), Vec::new());
        for rep in 0..reps * 2 {
            let move_on = rep % 2 == 1;
            if move_on {
                at = (at + 1) % nodes.len();
            }
            proxy.set_targets(&[nodes[at]]);
            resumed.lock().unwrap_or_else(|e| e.into_inner()).clear();
            let t = Instant::now();
            proxy.cut_all();
            let deadline = t + Duration::from_secs(60);
            while resumed.lock().unwrap_or_else(|e| e.into_inner()).len() < n
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let mut times: Vec<f64> = resumed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|d| d.as_secs_f64() * 1000.0)
                .collect();
            let med = net::median(&mut times);
            eprintln!(
                "  resume on the {} node: {} of {n} within {:.0} ms of the cut; attempt to session: median {med:.2} ms, slowest {:.1} ms",
                if move_on { "other" } else { "same" },
                times.len(),
                t.elapsed().as_secs_f64() * 1000.0,
                times.last().copied().unwrap_or(f64::NAN),
            );
            if move_on {
                other.push(med);
            } else {
                same.push(med);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        if lost.load(Ordering::Relaxed) > 0 {
            eprintln!("  cluster-resume: {} sessions lost", lost.load(Ordering::Relaxed));
        }
        for c in clients {
            let _ = c.close().await;
        }
        (same, other)
    });
    drop(children);
    let (mut o, mut s) = (other.clone(), same.clone());
    vec![Figure {
        scenario: format!("resume of {n} sessions on another node vs the same node"),
        metric: "ms, attempt to resumed (median)",
        ours: net::median(&mut o),
        baseline: net::median(&mut s),
        higher_is_better: false,
        target: None,
        kind: Kind::Ratio,
        range: Some(Range {
            ours: min_max(&other),
            baseline: min_max(&same),
            runs: other.len().min(same.len()),
        }),
        failed: None,
    }]
}
