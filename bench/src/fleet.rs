//! Scenarios 4 to 7: many connections. The server runs in a child process
//! (see [`crate::child`]); the clients run in this process on tokio, spread
//! over 64 loopback destination addresses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kitestring::{ClientHandle, ClientOptions, Event, State};

use crate::child::{seq_of, seq_payload, ROOM};
use crate::net::{self, Child};
use crate::{Figure, Kind, Options};

/// Connections opened at once while building a fleet.
const CONNECT_CONCURRENCY: usize = 200;

/// A fleet of open Kitestring clients; each has a task counting the
/// messages it receives into `delivered`.
struct OursFleet {
    clients: Vec<ClientHandle>,
    delivered: Arc<AtomicU64>,
}

impl OursFleet {
    async fn connect(port: u16, n: usize, options: ClientOptions) -> OursFleet {
        let delivered = Arc::new(AtomicU64::new(0));
        let runtime = kitestring_tokio::runtime();
        let clients = futures_util::stream::iter(0..n)
            .map(|i| {
                let (runtime, options, delivered) =
                    (runtime.clone(), options.clone(), delivered.clone());
                async move {
                    let url = net::spread_url(i, port);
                    let (client, mut events) = net::ours_connect(runtime, &url, options).await;
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
            .buffer_unordered(CONNECT_CONCURRENCY)
            .collect()
            .await;
        OursFleet { clients, delivered }
    }

    async fn close(self) {
        futures_util::stream::iter(self.clients)
            .for_each_concurrent(CONNECT_CONCURRENCY, |c| async move {
                let _ = c.close().await;
            })
            .await;
    }
}

/// A fleet of open tokio-tungstenite clients, each read by a task that
/// counts binary messages.
struct BaseFleet {
    tasks: Vec<tokio::task::AbortHandle>,
    delivered: Arc<AtomicU64>,
}

impl BaseFleet {
    async fn connect(port: u16, n: usize) -> BaseFleet {
        let delivered = Arc::new(AtomicU64::new(0));
        let tasks = futures_util::stream::iter(0..n)
            .map(|i| {
                let delivered = delivered.clone();
                async move {
                    let mut ws = crate::echo::baseline_connect(&net::spread_url(i, port)).await;
                    tokio::spawn(async move {
                        while let Some(Ok(m)) = ws.next().await {
                            if m.is_binary() {
                                delivered.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    })
                    .abort_handle()
                }
            })
            .buffer_unordered(CONNECT_CONCURRENCY)
            .collect()
            .await;
        BaseFleet { tasks, delivered }
    }

    fn close(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

fn port_of(child: &mut Child) -> u16 {
    child.expect("port").parse().expect("port number")
}

/// Asks the child how many connections it serves (and, for ours, how many
/// room joins it saw) until `done` says enough.
async fn wait_count(child: &mut Child, done: impl Fn(usize, usize) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        child.send("count");
        let reply = child.line_async();
        let mut w = reply.split_whitespace().skip(1);
        let a: usize = w.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let b: usize = w.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        if done(a, b) || Instant::now() > deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `counter` stops moving for 300 ms.
async fn settle(counter: &AtomicU64) {
    let mut last = counter.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = counter.load(Ordering::Relaxed);
        if now == last {
            return;
        }
        last = now;
    }
}

/// Waits until `counter` reaches `n` (or a minute passes).
async fn wait_for(counter: &AtomicU64, n: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while counter.load(Ordering::Relaxed) < n {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    true
}

fn heartbeat_client_options(interval: Duration) -> ClientOptions {
    let mut options = ClientOptions::default();
    options.config.heartbeat.interval = interval;
    options
}

/// Scenario 4: idle memory per session and heartbeat CPU.
pub(crate) fn idle_scenario(opts: &Options) -> Vec<Figure> {
    let (n, ping_ms, window) = if opts.quick {
        (200, 500u64, 2.0)
    } else {
        (10_000, 2_000u64, 10.0)
    };
    let rt = net::tokio_runtime();
    // Baseline.
    let mut child = Child::spawn(&["server", "base"]);
    let port = port_of(&mut child);
    let rss0 = child.rss_kib();
    let (base_kib, base_cpu) = rt.block_on(async {
        let fleet = BaseFleet::connect(port, n).await;
        wait_count(&mut child, |c, _| c >= n).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let kib = (child.rss_kib().saturating_sub(rss0)) as f64 / n as f64;
        let c0 = child.cpu_seconds();
        tokio::time::sleep(Duration::from_secs_f64(window)).await;
        let cpu = (child.cpu_seconds() - c0) / window * 100.0;
        fleet.close();
        (kib, cpu)
    });
    drop(child);
    // Ours, with heartbeats every `ping_ms` on both sides.
    let ping = ping_ms.to_string();
    let mut child = Child::spawn(&["server", "ours", &ping, "0", "256"]);
    let port = port_of(&mut child);
    let rss0 = child.rss_kib();
    let (ours_kib, ours_cpu) = rt.block_on(async {
        let fleet = OursFleet::connect(
            port,
            n,
            heartbeat_client_options(Duration::from_millis(ping_ms)),
        )
        .await;
        wait_count(&mut child, |c, _| c >= n).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let kib = (child.rss_kib().saturating_sub(rss0)) as f64 / n as f64;
        let c0 = child.cpu_seconds();
        tokio::time::sleep(Duration::from_secs_f64(window)).await;
        let cpu = (child.cpu_seconds() - c0) / window * 100.0;
        fleet.close().await;
        (kib, cpu)
    });
    drop(child);
    eprintln!(
        "  idle {n}: {ours_kib:.2} KiB vs {base_kib:.2} KiB; CPU {ours_cpu:.2}% (ping {ping_ms} ms) vs {base_cpu:.2}%"
    );
    let scale = ping_ms as f64 / 30_000.0;
    vec![
        Figure {
            scenario: format!("idle {n} sessions"),
            metric: "server RSS KiB/session",
            ours: ours_kib,
            baseline: base_kib,
            higher_is_better: false,
            target: Some(1.25),
            kind: Kind::Ratio,
            range: None,
            failed: None,
        },
        Figure {
            scenario: format!("idle {n} sessions, ping {ping_ms} ms"),
            metric: "server CPU % of a core (measured)",
            ours: ours_cpu,
            baseline: base_cpu,
            higher_is_better: false,
            target: None,
            kind: Kind::Absolute,
            range: None,
            failed: None,
        },
        Figure {
            scenario: format!("idle {n} sessions, ping 30 s"),
            metric: "heartbeat CPU % (scaled to 30 s)",
            ours: ours_cpu * scale,
            baseline: base_cpu,
            higher_is_better: false,
            target: Some(1.0),
            kind: Kind::Absolute,
            range: None,
            failed: None,
        },
    ]
}

/// Scenario 5: room fan-out of 32-byte messages.
pub(crate) fn fanout_scenario(opts: &Options) -> Vec<Figure> {
    let (sizes, reps): (&[(usize, u64)], usize) = if opts.quick {
        (&[(20, 50), (50, 20)], 1)
    } else {
        (&[(100, 1_000), (1_000, 300), (10_000, 50)], 3)
    };
    let rt = net::tokio_runtime();
    let mut figures = Vec::new();
    for &(n, m) in sizes {
        let total = n as u64 * m;
        // Baseline.
        let mut child = Child::spawn(&["server", "base"]);
        let port = port_of(&mut child);
        let mut base = rt.block_on(async {
            let fleet = BaseFleet::connect(port, n).await;
            wait_count(&mut child, |c, _| c >= n).await;
            let mut rates = Vec::new();
            for _ in 0..reps {
                fleet.delivered.store(0, Ordering::Relaxed);
                let t = Instant::now();
                child.send(&format!("broadcast {m}"));
                let ok = wait_for(&fleet.delivered, total).await;
                let secs = t.elapsed().as_secs_f64();
                child.expect("sent");
                if ok {
                    rates.push(total as f64 / secs);
                }
            }
            fleet.close();
            rates
        });
        drop(child);
        // Ours: every session joins the room (presence off) when it opens;
        // default queues.
        let mut child = Child::spawn(&["server", "ours", "30000", "1", "256"]);
        let port = port_of(&mut child);
        let mut ours = rt.block_on(async {
            let fleet = OursFleet::connect(port, n, ClientOptions::default()).await;
            wait_count(&mut child, |_, j| j >= n).await;
            settle(&fleet.delivered).await;
            let mut rates = Vec::new();
            for _ in 0..reps {
                let before = fleet.delivered.load(Ordering::Relaxed);
                let t = Instant::now();
                child.send(&format!("broadcast {m}"));
                let ok = wait_for(&fleet.delivered, before + total).await;
                let secs = t.elapsed().as_secs_f64();
                child.expect("sent");
                if ok {
                    rates.push(total as f64 / secs);
                } else {
                    eprintln!("  fan-out {n}: not every message arrived within a minute");
                }
            }
            fleet.close().await;
            rates
        });
        drop(child);
        let (o, b) = (net::median(&mut ours), net::median(&mut base));
        eprintln!("  fan-out {n} members x {m}: {o:.0} vs {b:.0} deliveries/s");
        figures.push(Figure {
            scenario: format!("fan-out 32 B to {n}"),
            metric: "deliveries/s",
            ours: o,
            baseline: b,
            higher_is_better: true,
            target: Some(1.5),
            kind: Kind::Ratio,
            range: None,
            failed: None,
        });
    }
    figures
}

enum Report {
    Fresh,
    Resumed,
    NewSession,
    Received(Vec<u64>),
}

async fn storm_client(
    url: String,
    options: ClientOptions,
    reports: tokio::sync::mpsc::UnboundedSender<Report>,
    mut done: tokio::sync::watch::Receiver<bool>,
) {
    let (client, mut events) =
        kitestring::connect(kitestring_tokio::runtime(), &url, options).expect("client");
    let mut opened = false;
    let mut drops = 0;
    let mut got = Vec::new();
    loop {
        tokio::select! {
            e = events.next() => match e {
                Some(Event::Connected { resumed, .. }) => {
                    if !opened {
                        opened = true;
                        let _ = reports.send(Report::Fresh);
                        let _ = client.send_payload(seq_payload(1)).await;
                    } else if resumed {
                        let _ = reports.send(Report::Resumed);
                    } else {
                        let _ = reports.send(Report::NewSession);
                    }
                }
                Some(Event::StateChanged { old: State::Open, .. }) => {
                    // Sent while the connection is down: queued, then
                    // delivered on the resumed connection.
                    drops += 1;
                    let _ = client.send_payload(seq_payload(1 + drops)).await;
                }
                Some(Event::Message(m)) => got.push(seq_of(&m.payload)),
                Some(_) => {}
                None => break,
            },
            _ = done.changed() => break,
        }
    }
    let _ = reports.send(Report::Received(got));
    let _ = client.close().await;
}

/// How the storm's server drops every connection.
#[derive(Clone, Copy)]
enum Cut {
    /// `ServerHandle::abort`: the transports end without a close handshake,
    /// as when the network fails.
    Abort,
    /// `ServerHandle::disconnect` with 1012: a clean WebSocket close.
    Close,
}

/// One resume storm of `n` sessions, against a fresh server.
struct Storm {
    /// Seconds from the first connect to the last fresh `Connected`.
    fresh: f64,
    /// Seconds from each cut (abort, then close) to the last resumed
    /// `Connected`.
    resume: [f64; 2],
    /// Messages lost or duplicated, on either side.
    lost_or_dup: u64,
    /// Sessions that came back as new sessions instead of resuming.
    new_sessions: usize,
    /// CPU seconds of both processes while the fresh sessions opened.
    fresh_cpu: f64,
    /// CPU seconds of both processes from each cut to its last resume.
    resume_cpu: [f64; 2],
}

/// Scenario 6: every connection cut at once, every session resumed; twice,
/// once with the transports dropped and once with a clean close.
pub(crate) fn storm_scenario(opts: &Options) -> Vec<Figure> {
    let (n, reps) = if opts.quick { (200, 1) } else { (10_000, 3) };
    let rt = net::tokio_runtime();
    let runs: Vec<Storm> = (0..reps).map(|_| storm_once(&rt, n)).collect();
    let bad: u64 = runs.iter().map(|r| r.lost_or_dup).sum();
    let new_sessions: usize = runs.iter().map(|r| r.new_sessions).sum();
    let mut figures = Vec::new();
    for (k, cut, target) in [
        (0, "connections dropped", Some(1.3)),
        (1, "clean close 1012", None),
    ] {
        // The repetition with the median ratio gives the times.
        let mut order: Vec<&Storm> = runs.iter().collect();
        order.sort_by(|a, b| (a.resume[k] / a.fresh).total_cmp(&(b.resume[k] / b.fresh)));
        let mid = order[order.len() / 2];
        let cpu = |f: &dyn Fn(&Storm) -> f64| runs.iter().map(f).sum::<f64>() / runs.len() as f64;
        figures.push(Figure {
            scenario: format!("resume storm {n}, {cut} (vs {n} fresh)"),
            metric: "seconds until all open",
            ours: mid.resume[k],
            baseline: mid.fresh,
            higher_is_better: false,
            target,
            kind: Kind::Ratio,
            range: None,
            failed: None,
        });
        figures.push(Figure {
            scenario: format!("resume storm {n}, {cut} (vs {n} fresh)"),
            metric: "CPU seconds, server and clients",
            ours: cpu(&|r| r.resume_cpu[k]),
            baseline: cpu(&|r| r.fresh_cpu),
            higher_is_better: false,
            target: None,
            kind: Kind::Ratio,
            range: None,
            failed: None,
        });
    }
    // Losses and sessions not resumed are summed over all repetitions.
    figures.push(Figure {
        scenario: format!("resume storm {n}"),
        metric: "messages lost or duplicated",
        ours: bad as f64,
        baseline: 0.0,
        higher_is_better: false,
        target: Some(0.0),
        kind: Kind::Absolute,
        range: None,
        failed: None,
    });
    figures.push(Figure {
        scenario: format!("resume storm {n}"),
        metric: "sessions not resumed",
        ours: new_sessions as f64,
        baseline: 0.0,
        higher_is_better: false,
        target: Some(0.0),
        kind: Kind::Absolute,
        range: None,
        failed: None,
    });
    figures
}

/// Cuts every connection and waits until every session is back: seconds
/// and CPU seconds of both processes, resumed and new sessions.
async fn storm_cut(
    child: &mut Child,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Report>,
    n: usize,
    cut: Cut,
    seq: u64,
) -> (f64, f64, usize, usize) {
    let me = std::process::id();
    let c0 = net::cpu_seconds(me) + child.cpu_seconds();
    let t = Instant::now();
    child.send(&match cut {
        Cut::Abort => format!("cut abort {seq}"),
        Cut::Close => format!("cut close {seq}"),
    });
    let (mut resumed, mut new_sessions) = (0usize, 0usize);
    while resumed + new_sessions < n {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Some(Report::Resumed)) => resumed += 1,
            Ok(Some(Report::NewSession)) => new_sessions += 1,
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = net::cpu_seconds(me) + child.cpu_seconds() - c0;
    child.expect("cut");
    // Let the messages queued during the cut arrive and be acknowledged.
    tokio::time::sleep(Duration::from_secs(2)).await;
    (secs, cpu, resumed, new_sessions)
}

fn storm_once(rt: &tokio::runtime::Runtime, n: usize) -> Storm {
    let mut options = ClientOptions::default();
    options.config.backoff.base = Duration::from_millis(10);
    let mut child = Child::spawn(&["server", "ours", "30000", "0", "256"]);
    let port = port_of(&mut child);
    let r = rt.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        let me = std::process::id();
        let c0 = net::cpu_seconds(me) + child.cpu_seconds();
        let t = Instant::now();
        let clients: Vec<_> = (0..n)
            .map(|i| {
                tokio::spawn(storm_client(
                    net::spread_url(i, port),
                    options.clone(),
                    tx.clone(),
                    done_rx.clone(),
                ))
            })
            .collect();
        let mut fresh = 0usize;
        while fresh < n {
            match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
                Ok(Some(Report::Fresh)) => fresh += 1,
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        let t_fresh = t.elapsed().as_secs_f64();
        let fresh_cpu = net::cpu_seconds(me) + child.cpu_seconds() - c0;
        // The server application must have seen every session open before
        // it sends to all of them.
        wait_count(&mut child, |c, _| c >= n).await;
        child.send("sendall 1");
        child.line_async();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (t_abort, cpu_abort, r1, new1) = storm_cut(&mut child, &mut rx, n, Cut::Abort, 2).await;
        // Every session must be known to the server again before the next
        // cut addresses them.
        wait_count(&mut child, |c, _| c >= n).await;
        let (t_close, cpu_close, r2, new2) = storm_cut(&mut child, &mut rx, n, Cut::Close, 3).await;
        let _ = done_tx.send(true);
        let mut received = Vec::new();
        while received.len() < n {
            match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
                Ok(Some(Report::Received(v))) => received.push(v),
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        const WANT: [u64; 3] = [1, 2, 3];
        child.send("report 3");
        let report = child.expect("report");
        let w: Vec<u64> = report
            .split_whitespace()
            .filter_map(|s| s.parse().ok())
            .collect();
        let (s_ok, mut s_lost, s_dup, s_sessions) = (
            w.first().copied().unwrap_or(0),
            w.get(1).copied().unwrap_or(0),
            w.get(2).copied().unwrap_or(0),
            w.get(3).copied().unwrap_or(0),
        );
        // Sessions the server never heard from lost all their messages.
        s_lost += WANT.len() as u64 * (n as u64).saturating_sub(s_sessions);
        let (mut c_ok, mut c_lost, mut c_dup) = (0u64, 0u64, 0u64);
        for got in &received {
            if *got == WANT {
                c_ok += 1;
            } else {
                if c_lost + c_dup == 0 {
                    eprintln!("  storm {n}: a client received {got:?} instead of {WANT:?}");
                }
                let mut g = got.clone();
                g.sort_unstable();
                let before = g.len();
                g.dedup();
                c_dup += (before - g.len()) as u64;
                c_lost += WANT.iter().filter(|x| !g.contains(x)).count() as u64;
            }
        }
        // Sessions the clients never reported count as entirely lost.
        c_lost += WANT.len() as u64 * (n - received.len()) as u64;
        eprintln!(
            "  storm {n}: fresh {t_fresh:.2} s ({fresh_cpu:.2} s CPU); dropped: resume {t_abort:.2} s \
             ({cpu_abort:.2} s CPU, {r1} resumed, {new1} new); clean close: resume {t_close:.2} s \
             ({cpu_close:.2} s CPU, {r2} resumed, {new2} new); \
             server got {s_ok} sessions in order, lost {s_lost}, dup {s_dup}; \
             clients {c_ok} in order, lost {c_lost}, dup {c_dup}"
        );
        // Every client closed before the next repetition starts.
        for c in clients {
            let _ = c.await;
        }
        Storm {
            fresh: t_fresh,
            resume: [t_abort, t_close],
            lost_or_dup: s_lost + s_dup + c_lost + c_dup,
            new_sessions: new1 + new2,
            fresh_cpu,
            resume_cpu: [cpu_abort, cpu_close],
        }
    });
    drop(child);
    // Let the closed sockets settle before the next repetition.
    std::thread::sleep(Duration::from_secs(1));
    r
}

/// Scenario 7: connect, handshake, join a room and close, repeatedly: rooms
/// without presence for the target, the default policy (presence on) beside.
pub(crate) fn churn_scenario(opts: &Options) -> Vec<Figure> {
    let (total, workers, reps) = if opts.quick {
        (100, 8, 1)
    } else {
        (10_000, 32, 5)
    };
    // `KITESTRING_BENCH_CHURN_CYCLES=600` sets the cycles of each round:
    // two counts under callgrind give the cost of one.
    let total: u64 = std::env::var("KITESTRING_BENCH_CHURN_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(total);
    let rt = net::tokio_runtime();
    let mut base = Vec::new();
    let mut ours = Vec::new();
    let mut ours_presence = Vec::new();
    // CPU seconds of the server (child) and the clients (this process).
    let (mut base_cpu, mut ours_cpu) = ([0.0f64; 2], [0.0f64; 2]);
    let runtime = {
        let _inside = rt.enter();
        kitestring_tokio::runtime()
    };
    let cycle = {
        let runtime = runtime.clone();
        move |url: String| {
            let runtime = runtime.clone();
            async move {
                // The room joined in the handshake, as an application that
                // joins at once does (`ClientOptions::rooms`).
                let options = ClientOptions {
                    rooms: vec![ROOM.into()],
                    ..ClientOptions::default()
                };
                let (client, _events) = net::ours_connect(runtime, &url, options).await;
                let _ = client.close().await;
            }
        }
    };
    for rep in 0..reps {
        // Every round leaves its closed connections in TIME_WAIT for a
        // minute, which the next rounds' connects work around: the order
        // alternates so neither side always runs on the fuller table.
        let order: [u8; 3] = if rep % 2 == 0 { [0, 1, 2] } else { [1, 2, 0] };
        for round in order {
            // `KITESTRING_BENCH_CHURN_ROUND=base` (or `ours`, `presence`)
            // runs one kind of round alone, to profile it (BENCHMARKS.md).
            if let Ok(only) = std::env::var("KITESTRING_BENCH_CHURN_ROUND") {
                if only != ["base", "ours", "presence"][usize::from(round)] {
                    continue;
                }
            }
            match round {
                0 => {
                    let (rate, cpu) =
                        churn_round(&rt, &["server", "base"], total, workers, |url| async move {
                            let mut ws = crate::echo::baseline_connect(&url).await;
                            let _ = ws.close(None).await;
                            while let Some(Ok(_)) = ws.next().await {}
                        });
                    base.push(rate);
                    base_cpu = [base_cpu[0] + cpu[0], base_cpu[1] + cpu[1]];
                }
                1 => {
                    // Rooms without presence (mode 2): the join's own cost.
                    let server = ["server", "ours", "30000", "2", "256"];
                    let (rate, cpu) = churn_round(&rt, &server, total, workers, cycle.clone());
                    ours.push(rate);
                    ours_cpu = [ours_cpu[0] + cpu[0], ours_cpu[1] + cpu[1]];
                }
                _ => {
                    // The default policy: each join and leave also tells
                    // every member.
                    let server = ["server", "ours", "30000", "0", "256"];
                    let (rate, _) = churn_round(&rt, &server, total, workers, cycle.clone());
                    ours_presence.push(rate);
                }
            }
        }
    }
    // Each repetition runs the baseline and ours back to back, so their
    // ratio is paired against the machine's drift (the baseline alone moved
    // by a quarter between runs): the figures reported are those of the
    // repetition with the median ratio.
    for (i, ((o, p), b)) in ours.iter().zip(&ours_presence).zip(&base).enumerate() {
        eprintln!(
            "  churn rep {i}: {o:.0} vs {b:.0} connections/s ({:.3}), {p:.0} with presence ({:.3})",
            o / b,
            p / b
        );
    }
    let (o, b) = paired_median(&ours, &base);
    let (p, bp) = paired_median(&ours_presence, &base);
    eprintln!("  churn: {o:.0} vs {b:.0} connections/s; with presence {p:.0} vs {bp:.0}");
    // Microseconds of CPU per connection, averaged over the repetitions
    // (CPU times are counted in ticks of 10 ms, so only long runs say much).
    let per = |cpu: f64| cpu * 1e6 / (total as f64 * reps as f64);
    let mut figures = vec![
        Figure {
            scenario: "churn: connect+handshake+join".into(),
            metric: "connections/s",
            ours: o,
            baseline: b,
            higher_is_better: true,
            target: Some(0.8),
            kind: Kind::Ratio,
            range: None,
            failed: None,
        },
        Figure {
            scenario: "churn: join with presence".into(),
            metric: "connections/s",
            ours: p,
            baseline: bp,
            higher_is_better: true,
            target: None,
            kind: Kind::Ratio,
            range: None,
            failed: None,
        },
    ];
    for (i, side) in ["server", "clients"].iter().enumerate() {
        figures.push(Figure {
            scenario: format!("churn: {side} CPU per connection"),
            metric: "CPU microseconds",
            ours: per(ours_cpu[i]),
            baseline: per(base_cpu[i]),
            higher_is_better: false,
            target: None,
            kind: Kind::Ratio,
            range: None,
            failed: None,
        });
    }
    figures
}

/// The pair `(ours[i], base[i])` whose ratio is the median of all pairs.
fn paired_median(ours: &[f64], base: &[f64]) -> (f64, f64) {
    let mut pairs: Vec<(f64, f64)> = ours.iter().copied().zip(base.iter().copied()).collect();
    pairs.sort_by(|x, y| (x.0 / x.1).total_cmp(&(y.0 / y.1)));
    pairs
        .get(pairs.len() / 2)
        .copied()
        .unwrap_or((f64::NAN, f64::NAN))
}

/// One churn run against a fresh server child started with `server`:
/// `workers` loops run `cycle` on the next client address until `total`
/// cycles are done. Returns cycles per second and the CPU seconds of the
/// server and of this process (the clients).
fn churn_round<F, Fut>(
    rt: &tokio::runtime::Runtime,
    server: &[&str],
    total: u64,
    workers: usize,
    cycle: F,
) -> (f64, [f64; 2])
where
    F: Fn(String) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut child = Child::spawn(server);
    let port = port_of(&mut child);
    let me = std::process::id();
    let c0 = (child.cpu_seconds(), net::cpu_seconds(me));
    let rate = rt.block_on(async {
        let next = Arc::new(AtomicU64::new(0));
        let t = Instant::now();
        futures_util::future::join_all((0..workers).map(|_| {
            let (next, cycle) = (next.clone(), cycle.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    cycle(net::spread_url(i as usize, port)).await;
                }
            })
        }))
        .await;
        total as f64 / t.elapsed().as_secs_f64()
    });
    let cpu = [child.cpu_seconds() - c0.0, net::cpu_seconds(me) - c0.1];
    drop(child);
    (rate, cpu)
}
