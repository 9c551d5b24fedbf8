//! The cluster scenarios (`cluster-fanout`, `cluster-resume`): server nodes
//! in child processes sharing a private `redis-server`, clients in this
//! process.
//!
//! - Room fan-out to members spread over three nodes, against the same
//!   members on one node with the same Redis, and on one node without a
//!   backplane; and the Redis commands each delivery costs (from Redis's
//!   own `INFO commandstats`, so commands run inside scripts count).
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
use kitestring::{ClientHandle, ClientOptions, Event, State};
use kitestring_chaos::Proxy;
use kitestring_redis::testing::RedisServer;

use crate::net::{self, Child};
use crate::{Figure, Kind, Options, Range};

/// Connections opened at once.
const CONCURRENCY: usize = 200;

/// How the members are served.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Setup {
    /// One node, no backplane.
    Alone,
    /// One node with Redis.
    OneNode,
    /// Three nodes with Redis, members spread evenly.
    ThreeNodes,
}

/// Starts the setup's nodes: `(children, ports)`.
fn start_nodes(setup: Setup, redis: &RedisServer) -> (Vec<Child>, Vec<u16>) {
    let url = redis.url();
    let names: &[&str] = match setup {
        Setup::Alone => &[],
        Setup::OneNode => &["n0"],
        Setup::ThreeNodes => &["n0", "n1", "n2"],
    };
    let mut children = Vec::new();
    if names.is_empty() {
        children.push(Child::spawn(&["server", "ours", "30000", "1", "256"]));
    }
    for name in names {
        children.push(Child::spawn(&[
            "server", "ours", "30000", "1", "256", &url, name,
        ]));
    }
    let ports = children
        .iter_mut()
        .map(|c| c.expect("port").parse().expect("port number"))
        .collect();
    (children, ports)
}

/// Clients, client `i` on `ports[i % ports.len()]`, each counting the
/// messages it receives.
async fn fleet(ports: &[u16], n: usize) -> (Vec<ClientHandle>, Arc<AtomicU64>) {
    let delivered = Arc::new(AtomicU64::new(0));
    let runtime = kitestring_tokio::runtime();
    let clients = futures_util::stream::iter(0..n)
        .map(|i| {
            let (runtime, delivered) = (runtime.clone(), delivered.clone());
            let url = net::spread_url(i, ports[i % ports.len()]);
            async move {
                let (client, mut events) =
                    net::ours_connect(runtime, &url, ClientOptions::default()).await;
                tokio::spawn(async move {
                    while let Some(e) = events.next().await {
                        if let Event::Message(_) = e {
                            delivered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
                client
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    (clients, delivered)
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

/// Redis's command count so far (every command but `INFO`, those run by
/// scripts included) and the script calls among them.
fn redis_calls(redis: &RedisServer) -> (u64, u64) {
    let Ok(client) = redis::Client::open(redis.url()) else {
        return (0, 0);
    };
    let Ok(mut c) = client.get_connection() else {
        return (0, 0);
    };
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut c)
        .unwrap_or_default();
    let (mut all, mut scripts) = (0, 0);
    for line in info.lines() {
        let Some(rest) = line.strip_prefix("cmdstat_") else {
            continue;
        };
        let Some((name, stats)) = rest.split_once(':') else {
            continue;
        };
        let calls: u64 = stats
            .split(',')
            .find_map(|kv| kv.strip_prefix("calls="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if name == "info" {
            continue;
        }
        all += calls;
        if name.starts_with("eval") {
            scripts += calls;
        }
    }
    (all, scripts)
}

/// One fan-out run: deliveries per second, and Redis commands and script
/// calls per delivery.
fn fanout_once(setup: Setup, n: usize, m: u64) -> Option<(f64, f64, f64)> {
    // A Redis of its own: what an earlier run's nodes left there (their
    // members, for the next process of the same name to tidy up) must not
    // weigh on this one.
    let Ok(redis) = RedisServer::start() else {
        eprintln!("  cluster-fanout: no redis-server (Debian: apt-get install redis-server)");
        return None;
    };
    let redis = &redis;
    let rt = net::tokio_runtime();
    let (mut children, ports) = start_nodes(setup, redis);
    let total = n as u64 * m;
    let r = rt.block_on(async {
        let (clients, delivered) = fleet(&ports, n).await;
        let deadline = Instant::now() + Duration::from_secs(120);
        while joined(&mut children) < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = delivered.load(Ordering::Relaxed);
        let (calls0, scripts0) = redis_calls(redis);
        let t = Instant::now();
        children[0].send(&format!("broadcast {m}"));
        let deadline = Instant::now() + Duration::from_secs(120);
        while delivered.load(Ordering::Relaxed) < before + total {
            if Instant::now() > deadline {
                eprintln!("  {setup:?}: not every message arrived within two minutes");
                return None;
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        let secs = t.elapsed().as_secs_f64();
        children[0].expect("sent");
        let (calls1, scripts1) = redis_calls(redis);
        futures_util::stream::iter(clients)
            .for_each_concurrent(CONCURRENCY, |c| async move {
                let _ = c.close().await;
            })
            .await;
        let per = |x: u64| x as f64 / total as f64;
        Some((
            total as f64 / secs,
            per(calls1.saturating_sub(calls0)),
            per(scripts1.saturating_sub(scripts0)),
        ))
    });
    drop(children);
    r
}

/// `cluster-fanout`: 32 B broadcasts to 10 000 members over three nodes,
/// against one node with and without Redis, alternating.
pub(crate) fn fanout_scenario(opts: &Options) -> Vec<Figure> {
    let (n, m, reps) = if opts.quick {
        (60, 10, 1)
    } else {
        (10_000, 50, 3)
    };
    let mut rates: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut cost = Vec::new();
    let mut scripts = Vec::new();
    for _ in 0..reps {
        for (setup, name) in [
            (Setup::Alone, "alone"),
            (Setup::OneNode, "one"),
            (Setup::ThreeNodes, "three"),
        ] {
            if let Some((rate, calls, evals)) = fanout_once(setup, n, m) {
                eprintln!(
                    "  {name}: {rate:.0} deliveries/s, {calls:.4} Redis commands and {evals:.5} script calls per delivery"
                );
                rates.entry(name).or_default().push(rate);
                if setup == Setup::ThreeNodes {
                    cost.push(calls);
                    scripts.push(evals);
                }
            }
        }
    }
    let figure = |scenario: String, ours: &str, base: &str| {
        let mut o = rates.get(ours).cloned().unwrap_or_default();
        let mut b = rates.get(base).cloned().unwrap_or_default();
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
            failed: None,
        }
    };
    let mut figures = vec![
        figure(
            format!("fan-out to {n} over 3 nodes vs 1 node, Redis"),
            "three",
            "one",
        ),
        figure(
            format!("fan-out to {n} over 3 nodes vs 1 node alone"),
            "three",
            "alone",
        ),
        figure(
            format!("fan-out to {n} on 1 node, Redis vs alone"),
            "one",
            "alone",
        ),
    ];
    let c = net::median(&mut cost);
    let s = net::median(&mut scripts);
    figures.push(Figure {
        scenario: format!("Redis commands per delivery, {n} members on 3 nodes"),
        metric: "commands (script calls as baseline)",
        ours: c,
        baseline: s,
        higher_is_better: false,
        target: None,
        kind: Kind::Absolute,
        range: Some(Range {
            ours: min_max(&cost),
            baseline: min_max(&scripts),
            runs: cost.len(),
        }),
        failed: None,
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
