//! The `dashboard` scenario: a live dashboard's traffic, 1 000 updates a
//! second of one gauge to 200 subscribers, one of which takes 250 ms per
//! event, sent as latest values (`broadcast_latest`) and, for comparison,
//! as ordinary broadcasts, alternating.
//!
//! Each update carries its number and when it was set; each subscriber
//! records, for every value its application takes, how old the value is at
//! that moment (its staleness). The figures: the slow subscriber's
//! staleness in its processing intervals (target: at most 2), the fast
//! subscribers' staleness, and how many updates a second they take. Server
//! and subscribers share this process and the machine's two cores.
//!
//! The server bounds how far behind in time a member may read
//! (`ServerConfig::max_lag`, [`MAX_LAG`] here) and clients ping every
//! [`PING`], so a subscriber that sends nothing but its pings is judged
//! at the bound. The slow subscriber's sessions ended for lag are counted
//! on the server (with when the first was), and its application carries on
//! as one would: its client reconnects, reports the lost session
//! (`Event::SessionLost`, counted) and joins the room again by itself in
//! the new one.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kitestring::{ClientOptions, Event, Payload, ServerEvent, ServerOptions, SessionEnd};
use kitestring_core::wire::ClientId;

use crate::net;
use crate::{Failure, Figure, Kind, Options, Range};

/// The server's lag bound in this scenario.
const MAX_LAG: Duration = Duration::from_secs(2);

/// The ping interval the server gives its clients here (default 20 s): a
/// room stream member acknowledges nothing, so its pings are what the
/// server hears from it.
const PING: Duration = Duration::from_millis(500);

/// Whether the server bounds lag here (not under `DASHBOARD_NO_LAG`).
fn bounded() -> bool {
    std::env::var_os("DASHBOARD_NO_LAG").is_none()
}

/// How the updates are sent.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Latest,
    Broadcast,
}

/// One subscriber's values: when its application took each (µs since the
/// start) and how old it was then (µs).
type Samples = Vec<(u64, u64)>;

/// What one run measured.
struct Run {
    /// The slow subscriber's staleness, in its processing intervals: the
    /// largest over the run, after the first second.
    slow_max: f64,
    /// Its median.
    slow_median: f64,
    /// The fast subscribers' staleness, milliseconds: the 99th percentile
    /// over all of them.
    fast_p99_ms: f64,
    /// Updates a second each fast subscriber's application took, median.
    fast_rate: f64,
    /// Sessions the slow subscriber's client reported lost
    /// (`Event::SessionLost`) within the run.
    slow_lost: u64,
    /// The slow subscriber's sessions the server ended as slow consumers
    /// (its lag bound) within the run.
    evictions: u64,
    /// Seconds from the first update to the first of them (NaN: none).
    first_eviction_s: f64,
    /// Fast subscribers' sessions ended as slow consumers (must be none).
    fast_evicted: u64,
    /// When each of the slow subscriber's sessions was ended, seconds
    /// after the first update.
    eviction_times: Vec<f64>,
}

/// An update: its number and when it was set (microseconds since `t0`).
fn update(n: u64, t0: Instant) -> Payload {
    let us = t0.elapsed().as_micros() as u64;
    Payload::json(format!("[{n},{us}]")).expect("json")
}

fn read_update(p: &Payload) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(p.data()).ok()?;
    let (n, us) = text.trim_matches(['[', ']']).split_once(',')?;
    Some((n.parse().ok()?, us.parse().ok()?))
}

fn run_once(mode: Mode, subscribers: usize, rate: u64, secs: u64, slow_every: Duration) -> Run {
    let rt = net::tokio_runtime();
    rt.block_on(async move {
        let runtime = kitestring_tokio::runtime();
        let mut options = ServerOptions::default();
        options.config.rate_limit = None;
        // DASHBOARD_NO_LAG: the server's defaults (no bound this short,
        // pings every 20 s), for comparison.
        if bounded() {
            options.config.max_lag = Some(MAX_LAG);
            options.config.ping_interval = PING;
        }
        let (server, mut events) = kitestring::bind(
            runtime.clone(),
            "127.0.0.1:0".parse().expect("addr"),
            options,
        )
        .expect("bind");
        // Sessions ended as slow consumers: by which client, and when.
        let evicted: Arc<Mutex<Vec<(ClientId, Instant)>>> = Arc::default();
        let seen = evicted.clone();
        tokio::spawn(async move {
            let mut clients = std::collections::HashMap::new();
            while let Some(e) = events.next().await {
                match e {
                    ServerEvent::SessionOpened {
                        session, client, ..
                    } => {
                        clients.insert(session, client);
                    }
                    ServerEvent::SessionEnded {
                        session,
                        reason: SessionEnd::SlowConsumer,
                        ..
                    } => {
                        if let (Some(c), Ok(mut v)) = (clients.get(&session), seen.lock()) {
                            v.push((*c, Instant::now()));
                        }
                    }
                    _ => {}
                }
            }
        });
        let url = format!("ws://{}/", server.local_addr().expect("addr"));
        let t0 = Instant::now();
        let total = rate * secs;
        // Per subscriber, when its application took each value and how
        // old it was then (µs); subscriber 0 is the slow one.
        let samples: Arc<Mutex<Vec<Samples>>> = Arc::new(Mutex::new(vec![Vec::new(); subscribers]));
        let lost = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let end = t0 + Duration::from_secs(secs + 2);
        let mut tasks = Vec::new();
        let mut slow_client = None;
        for i in 0..subscribers {
            let (client, mut events) =
                net::ours_connect(runtime.clone(), &url, ClientOptions::default()).await;
            client.join("dash").await.expect("join");
            if i == 0 {
                slow_client = Some(client.client_id());
            }
            let (samples, lost) = (samples.clone(), lost.clone());
            let slow = i == 0;
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                // Until `end`, however much is still queued.
                while let Some(left) = end.checked_duration_since(Instant::now()) {
                    let Ok(Some(e)) = tokio::time::timeout(left, events.next()).await else {
                        break;
                    };
                    let payload = match e {
                        Event::Latest { payload, .. } => payload,
                        Event::Message(m) if m.room.as_deref() == Some("dash") => m.payload,
                        Event::SessionLost { .. } => {
                            lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            // Nothing to do: the client joins its rooms
                            // again, first thing, in the new session.
                            continue;
                        }
                        _ => continue,
                    };
                    let Some((n, set_us)) = read_update(&payload) else {
                        continue;
                    };
                    let now_us = t0.elapsed().as_micros() as u64;
                    mine.push((now_us, now_us.saturating_sub(set_us)));
                    if slow {
                        tokio::time::sleep(slow_every).await;
                    } else if n == total {
                        break;
                    }
                }
                if let Ok(mut s) = samples.lock() {
                    s[i] = mine;
                }
                drop(client);
            }));
        }
        while server.room_size("dash").await.unwrap_or(0) < subscribers {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The publisher: `rate` updates a second, on a 1 ms tick.
        let start = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        for n in 1..=total {
            tick.tick().await;
            let p = update(n, t0);
            let _ = match mode {
                Mode::Latest => server.broadcast_latest_payload("dash", "gauge", p).await,
                Mode::Broadcast => server.broadcast_payload("dash", p, None).await,
            };
        }
        let published = start.elapsed().as_secs_f64();
        for t in tasks {
            let _ = t.await;
        }
        let evicted = evicted.lock().map(|v| v.clone()).unwrap_or_default();
        let (slow_evicted, fast_evicted): (Vec<_>, Vec<_>) =
            evicted.iter().partition(|(c, _)| Some(*c) == slow_client);
        let eviction_times: Vec<f64> = slow_evicted
            .iter()
            .map(|(_, at)| at.saturating_duration_since(start).as_secs_f64())
            .collect();
        let first_eviction_s = eviction_times.iter().copied().fold(f64::NAN, f64::min);
        let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
        if std::env::var_os("DASHBOARD_DEBUG").is_some() {
            eprintln!("{mode:?} slow: {:?}", &samples[0]);
        }
        // Values taken after the first second: the start-up (connections
        // warming, the first reads) is not what is measured.
        let warm = 1_000_000u64;
        let interval_us = slow_every.as_micros() as f64;
        let mut slow: Vec<f64> = samples[0]
            .iter()
            .filter(|(at, _)| *at >= warm)
            .map(|(_, age)| *age as f64 / interval_us)
            .collect();
        slow.sort_by(f64::total_cmp);
        let mut fast: Vec<f64> = samples[1..]
            .iter()
            .flatten()
            .filter(|(at, _)| *at >= warm)
            .map(|(_, age)| *age as f64 / 1000.0)
            .collect();
        fast.sort_by(f64::total_cmp);
        let mut rates: Vec<f64> = samples[1..]
            .iter()
            .map(|s| s.len() as f64 / published)
            .collect();
        Run {
            slow_max: slow.last().copied().unwrap_or(f64::NAN),
            slow_median: net::percentile(&slow, 50.0),
            fast_p99_ms: net::percentile(&fast, 99.0),
            fast_rate: net::median(&mut rates),
            slow_lost: lost.load(std::sync::atomic::Ordering::Relaxed),
            evictions: slow_evicted.len() as u64,
            first_eviction_s,
            fast_evicted: fast_evicted.len() as u64,
            eviction_times,
        }
    })
}

/// `dashboard`: latest values against broadcasts, alternating.
pub(crate) fn scenario(opts: &Options) -> Vec<Figure> {
    let (subscribers, rate, secs, reps) = if opts.quick {
        (20, 1000, 2, 1)
    } else {
        (200, 1000, 10, 3)
    };
    let slow_every = Duration::from_millis(250);
    let mut latest = Vec::new();
    let mut broadcast = Vec::new();
    for rep in 0..reps {
        let order = if rep % 2 == 0 {
            [Mode::Latest, Mode::Broadcast]
        } else {
            [Mode::Broadcast, Mode::Latest]
        };
        for mode in order {
            let r = run_once(mode, subscribers, rate, secs, slow_every);
            eprintln!(
                "  {mode:?}: slow subscriber {:.2} intervals behind at most (median {:.2}), {} sessions ended for lag ({}; at {:.2?} s into the run), {} session losses seen by its client; fast ones p99 {:.1} ms, {:.0} updates/s, {} sessions ended",
                r.slow_max,
                r.slow_median,
                r.evictions,
                if bounded() {
                    format!("max_lag {} s, pings every {} ms", MAX_LAG.as_secs(), PING.as_millis())
                } else {
                    "the server's defaults: no bound this short".to_owned()
                },
                r.eviction_times,
                r.slow_lost,
                r.fast_p99_ms,
                r.fast_rate,
                r.fast_evicted
            );
            match mode {
                Mode::Latest => latest.push(r),
                Mode::Broadcast => broadcast.push(r),
            }
        }
    }
    let col = |runs: &[Run], f: fn(&Run) -> f64| -> Vec<f64> { runs.iter().map(f).collect() };
    let range = |o: &[f64], b: &[f64]| Range {
        ours: min_max(o),
        baseline: min_max(b),
        runs: o.len().min(b.len()),
    };
    let fast_evicted: u64 = latest
        .iter()
        .chain(&broadcast)
        .map(|r| r.fast_evicted)
        .sum();
    let figure = |scenario: String,
                  metric: &'static str,
                  f: fn(&Run) -> f64,
                  higher: bool,
                  kind: Kind,
                  target: Option<f64>| {
        let (mut o, mut b) = (col(&latest, f), col(&broadcast, f));
        let r = range(&o, &b);
        Figure {
            scenario,
            metric,
            ours: net::median(&mut o),
            baseline: net::median(&mut b),
            higher_is_better: higher,
            target,
            kind,
            range: Some(r),
            failed: (fast_evicted > 0).then(|| Failure {
                why: format!("{fast_evicted} fast subscriber sessions ended as slow consumers"),
                ours: true,
            }),
        }
    };
    let bound = if bounded() {
        format!("max_lag {} s", MAX_LAG.as_secs())
    } else {
        "no bound this short".to_owned()
    };
    vec![
        figure(
            format!("dashboard: {rate}/s to {subscribers}, slow subscriber's staleness (latest vs broadcast)"),
            "its processing intervals, at most",
            |r| r.slow_max,
            false,
            Kind::Absolute,
            Some(2.0),
        ),
        figure(
            format!("dashboard: {rate}/s to {subscribers}, fast subscribers' staleness (latest vs broadcast)"),
            "ms, 99th percentile",
            |r| r.fast_p99_ms,
            false,
            Kind::Ratio,
            None,
        ),
        figure(
            format!("dashboard: {rate}/s to {subscribers}, fast subscribers' rate (latest vs broadcast)"),
            "updates/s each, median",
            |r| r.fast_rate,
            true,
            Kind::Ratio,
            None,
        ),
        figure(
            format!("dashboard: {rate}/s to {subscribers}, slow subscriber's sessions ended for lag, {bound} (latest vs broadcast)"),
            "sessions in the run",
            |r| r.evictions as f64,
            false,
            Kind::Absolute,
            None,
        ),
        figure(
            format!("dashboard: {rate}/s to {subscribers}, slow subscriber's first lag eviction (latest vs broadcast)"),
            "s after the first update",
            |r| r.first_eviction_s,
            false,
            Kind::Absolute,
            None,
        ),
    ]
}

/// The least and greatest value (NaN for none: a run without an eviction
/// has no time to its first).
fn min_max(v: &[f64]) -> (f64, f64) {
    let (lo, hi) = v
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        });
    if lo > hi {
        (f64::NAN, f64::NAN)
    } else {
        (lo, hi)
    }
}
