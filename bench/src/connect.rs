//! Scenario: connect latency through an axum route (`kitestring-axum`)
//! against `kitestring::bind`'s own listener, both answering the client's
//! `hello` in the upgrade. One client at a time connects, waits for its
//! session to open (`Event::Connected`) and closes; the time to the open
//! session is the figure. The two servers run side by side in this process
//! with the same options, and the repetitions alternate which goes first.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use futures_util::StreamExt;
use kitestring::{ClientOptions, ServerEvents, ServerOptions};

use crate::{net, Figure, Kind, Options, Range};

/// Median microseconds to an open session over `n` connects to `port`
/// (spread over 127.0.0.x so TIME_WAIT never exhausts a port range).
async fn connect_times(
    runtime: &std::sync::Arc<dyn kitestring::Runtime>,
    port: u16,
    n: usize,
) -> f64 {
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let url = format!("ws://{}:{port}/ws", net::spread_host(i));
        let started = Instant::now();
        let (client, _events) =
            net::ours_connect(runtime.clone(), &url, ClientOptions::default()).await;
        times.push(started.elapsed().as_secs_f64() * 1e6);
        let _ = client.close().await;
    }
    net::median(&mut times)
}

/// Takes a server's events so its connection tasks never pause.
fn drain(mut events: ServerEvents) {
    tokio::spawn(async move { while events.next().await.is_some() {} });
}

/// Connect through axum vs `bind`: median per repetition, the median of
/// those, and their range.
pub(crate) fn axum_connect_scenario(opts: &Options) -> Vec<Figure> {
    let (reps, n, warm) = if opts.quick {
        (2, 100, 20)
    } else {
        (7, 1_000, 100)
    };
    let rt = net::tokio_runtime();
    let (axum_medians, bind_medians) = rt.block_on(async {
        let runtime = kitestring_tokio::runtime();
        let any: SocketAddr = "0.0.0.0:0".parse().expect("address");
        let (bound, events) =
            kitestring::bind(runtime.clone(), any, ServerOptions::default()).expect("bind");
        drain(events);
        let bind_port = bound.local_addr().expect("bound").port();
        let (routed, events) =
            kitestring::start(runtime.clone(), ServerOptions::default()).expect("start");
        drain(events);
        // A router as an application has one: a few HTTP routes beside.
        let app = Router::new()
            .route("/", get(|| async { "page" }))
            .route("/login", get(|| async { "login" }))
            .route("/health", get(|| async { "ok" }))
            .route("/ws", kitestring_axum::route(routed.clone()));
        let listener = tokio::net::TcpListener::bind(any)
            .await
            .expect("axum listener");
        let axum_port = listener.local_addr().expect("axum address").port();
        tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
        });
        connect_times(&runtime, axum_port, warm).await;
        connect_times(&runtime, bind_port, warm).await;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for rep in 0..reps {
            if rep % 2 == 0 {
                a.push(connect_times(&runtime, axum_port, n).await);
                b.push(connect_times(&runtime, bind_port, n).await);
            } else {
                b.push(connect_times(&runtime, bind_port, n).await);
                a.push(connect_times(&runtime, axum_port, n).await);
            }
            eprintln!(
                "  axum-connect rep {rep}: axum {:.0} us, bind {:.0} us",
                a[a.len() - 1],
                b[b.len() - 1]
            );
            // TIME_WAIT sockets from the last round on the same addresses.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = bound.shutdown().await;
        let _ = routed.shutdown().await;
        (a, b)
    });
    let spread = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lo, hi)
    };
    let range = Range {
        ours: spread(&axum_medians),
        baseline: spread(&bind_medians),
        runs: reps,
    };
    vec![Figure {
        scenario: "connect: axum route vs bind (hello in the upgrade)".into(),
        metric: "median connect to open session (us)",
        ours: net::median(&mut axum_medians.clone()),
        baseline: net::median(&mut bind_medians.clone()),
        higher_is_better: false,
        target: Some(1.10),
        kind: Kind::Ratio,
        range: Some(range),
        failed: None,
    }]
}
