//! Scenario: connect latency through an axum route (`kitestring-axum`)
//! against `kitestring::bind`'s own listener, both answering the client's
//! `hello` in the upgrade. One client at a time connects, waits for its
//! session to open (`Event::Connected`) and closes; the time to the open
//! session is the figure. The two servers run side by side in this process
//! with the same options, and the repetitions alternate which goes first.

use std::net::SocketAddr;
use std::time::Instant;

use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use futures_util::StreamExt;
use kitestring::{ClientOptions, ServerEvents, ServerOptions};

use crate::{net, Figure, Kind, Options, Range};

/// Microseconds to an open session for each of `n` connects to `port`,
/// appended to `times` (spread over 127.0.0.x so TIME_WAIT never exhausts a
/// port range; `first` numbers the connects across calls).
async fn connect_times(
    runtime: &std::sync::Arc<dyn kitestring::Runtime>,
    port: u16,
    first: usize,
    n: usize,
    times: &mut Vec<f64>,
) {
    for i in first..first + n {
        let url = format!("ws://{}:{port}/ws", net::spread_host(i));
        let started = Instant::now();
        let (client, _events) =
            net::ours_connect(runtime.clone(), &url, ClientOptions::default()).await;
        times.push(started.elapsed().as_secs_f64() * 1e6);
        let _ = client.close().await;
    }
}

/// Connects in a row to one side before switching to the other.
const BLOCK: usize = 50;

/// Takes a server's events so its connection tasks never pause.
fn drain(mut events: ServerEvents) {
    tokio::spawn(async move { while events.next().await.is_some() {} });
}

/// Connect through axum, and through plain hyper, vs `bind`: the median
/// per repetition, the median of those, and their range.
pub(crate) fn axum_connect_scenario(opts: &Options) -> Vec<Figure> {
    let (reps, n, warm): (usize, usize, usize) = if opts.quick {
        (2, 100, 20)
    } else {
        (7, 1_000, 100)
    };
    let rt = net::tokio_runtime();
    // Per side (axum, hyper, bind): the median of each repetition.
    let medians: [Vec<f64>; 3] = rt.block_on(async {
        let runtime = kitestring_tokio::runtime();
        let any: SocketAddr = "0.0.0.0:0".parse().expect("address");
        let (bound, events) =
            kitestring::bind(runtime.clone(), any, ServerOptions::default()).expect("bind");
        drain(events);
        let bind_port = bound.local_addr().expect("bound").port();
        let (routed, events) =
            kitestring::start(runtime.clone(), ServerOptions::default()).expect("start");
        drain(events);
        let axum_port = serve_axum(&routed, any).await;
        let hyper_port = serve_hyper(&routed, any).await;
        let ports = [axum_port, hyper_port, bind_port];
        let mut scratch = Vec::new();
        for port in ports {
            connect_times(&runtime, port, 0, warm, &mut scratch).await;
        }
        let mut medians: [Vec<f64>; 3] = Default::default();
        let mut first = warm;
        for rep in 0..reps {
            // Blocks of 50 connects, the sides taking turns block by block
            // (in an order that rotates), so that a change in the
            // machine's state (another tenant, frequency) hits all alike.
            let mut times: [Vec<f64>; 3] = Default::default();
            for block in 0..n.div_ceil(BLOCK) {
                for k in 0..3 {
                    let side = (rep + block + k) % 3;
                    connect_times(&runtime, ports[side], first, BLOCK, &mut times[side]).await;
                    first += BLOCK;
                }
            }
            for (side, t) in times.iter_mut().enumerate() {
                medians[side].push(net::median(t));
            }
            eprintln!(
                "  axum-connect rep {rep}: axum {:.1} us, hyper {:.1} us, bind {:.1} us",
                medians[0][rep], medians[1][rep], medians[2][rep]
            );
        }
        let _ = bound.shutdown().await;
        let _ = routed.shutdown().await;
        medians
    });
    let spread = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lo, hi)
    };
    let figure = |scenario: &str, side: usize| Figure {
        scenario: scenario.into(),
        metric: "median connect to open session (us)",
        ours: net::median(&mut medians[side].clone()),
        baseline: net::median(&mut medians[2].clone()),
        higher_is_better: false,
        target: Some(1.10),
        kind: Kind::Ratio,
        range: Some(Range {
            ours: spread(&medians[side]),
            baseline: spread(&medians[2]),
            runs: reps,
        }),
        failed: None,
    };
    vec![
        figure("connect: axum route vs bind (hello in the upgrade)", 0),
        figure("connect: plain hyper vs bind (hello in the upgrade)", 1),
    ]
}

/// An axum app as an application has one (a few HTTP routes beside
/// Kitestring's) on `any`; its port.
async fn serve_axum(server: &kitestring::ServerHandle, any: SocketAddr) -> u16 {
    let app = Router::new()
        .route("/", get(|| async { "page" }))
        .route("/login", get(|| async { "login" }))
        .route("/health", get(|| async { "ok" }))
        .route("/ws", kitestring_axum::route(server.clone()));
    let listener = tokio::net::TcpListener::bind(any)
        .await
        .expect("axum listener");
    let port = listener.local_addr().expect("axum address").port();
    // As `bind`'s listener does, and as README.md tells axum users to.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
    port
}

/// hyper's HTTP/1 server with nothing but Kitestring's service, on `any`;
/// its port.
async fn serve_hyper(server: &kitestring::ServerHandle, any: SocketAddr) -> u16 {
    let listener = tokio::net::TcpListener::bind(any)
        .await
        .expect("hyper listener");
    let port = listener.local_addr().expect("hyper address").port();
    let server = server.clone();
    tokio::spawn(async move {
        while let Ok((tcp, peer)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            let service = server.hyper_service(Some(peer));
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    port
}
