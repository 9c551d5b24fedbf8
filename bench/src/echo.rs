//! Scenarios 2 and 3: pipelined echo throughput and ping-pong latency over
//! loopback.
//!
//! Ours: a Kitestring server whose application echoes every message back
//! to its session (`ServerHandle::send_payload`), and Kitestring clients
//! sending binary payloads with `send_payload`. Baseline: a tokio-tungstenite
//! server echoing every data message, and tokio-tungstenite clients, with the
//! same tungstenite settings. Both pipeline the same way: a client keeps
//! `window` messages in flight, sending while below it and reading otherwise.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_channel::oneshot;
use futures_util::{SinkExt, StreamExt};
use kitestring::{
    ClientEvents, ClientHandle, ClientOptions, Event, Payload, Runtime, ServerEvent, ServerHandle,
    ServerOptions,
};
use tokio_tungstenite::tungstenite::Message;

use crate::net;

/// Messages a pipelined run moves.
#[derive(Clone, Copy)]
pub(crate) struct Load {
    pub(crate) conns: usize,
    pub(crate) size: usize,
    /// Messages per connection.
    pub(crate) per_conn: u64,
    /// Messages in flight per connection.
    pub(crate) window: u64,
}

/// Starts a Kitestring echo server on `runtime`.
pub(crate) fn ours_echo_server(runtime: &Arc<dyn Runtime>) -> (ServerHandle, SocketAddr) {
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let mut options = ServerOptions::default();
    // One connection sends hundreds of thousands of messages a second:
    // flood protection (on by default) would measure the limit, as the
    // tungstenite baseline has none.
    options.config.rate_limit = None;
    let (handle, mut events) = kitestring::bind(runtime.clone(), addr, options).expect("bind");
    let echo = handle.clone();
    // `KITESTRING_BENCH_INLINE=1`: the events are handled on the
    // connection tasks instead of an application task (BENCHMARKS.md).
    if std::env::var_os("KITESTRING_BENCH_INLINE").is_some() {
        events.handle_inline(move |event| {
            if let ServerEvent::Message { session, message } = event {
                let _ = echo.send_payload_now(session, message.payload);
            }
        });
    } else {
        runtime.spawn(Box::pin(async move {
            while let Some(event) = events.next().await {
                if let ServerEvent::Message { session, message } = event {
                    let _ = echo.send_payload(session, message.payload).await;
                }
            }
        }));
    }
    let local = handle.local_addr().expect("local address");
    (handle, local)
}

async fn ours_pipeline(
    client: &ClientHandle,
    events: &mut ClientEvents,
    data: &Bytes,
    count: u64,
    window: u64,
) {
    let (mut sent, mut got) = (0u64, 0u64);
    while got < count {
        if sent < count && sent - got < window {
            client
                .send_payload(Payload::binary(data.clone()))
                .await
                .expect("send");
            sent += 1;
            continue;
        }
        match events.next().await {
            Some(Event::Message(_)) => got += 1,
            Some(_) => {}
            None => panic!("client stopped"),
        }
    }
}

/// Messages per second through Kitestring on `runtime`.
pub(crate) async fn ours_throughput(runtime: Arc<dyn Runtime>, load: Load) -> f64 {
    let (server, addr) = ours_echo_server(&runtime);
    let url = format!("ws://{addr}/");
    let mut clients = Vec::new();
    for _ in 0..load.conns {
        clients.push(net::ours_connect(runtime.clone(), &url, ClientOptions::default()).await);
    }
    let data = Bytes::from(vec![7u8; load.size]);
    let start = Instant::now();
    let mut done = Vec::new();
    for (client, mut events) in clients {
        let (tx, rx) = oneshot::channel();
        let data = data.clone();
        runtime.spawn(Box::pin(async move {
            ours_pipeline(&client, &mut events, &data, load.per_conn, load.window).await;
            let _ = tx.send((client, events));
        }));
        done.push(rx);
    }
    let mut finished = Vec::new();
    for rx in done {
        finished.push(rx.await.expect("pipeline"));
    }
    let secs = start.elapsed().as_secs_f64();
    for (client, _events) in &finished {
        let _ = client.close().await;
    }
    drop(finished);
    let _ = server.shutdown().await;
    (load.per_conn * load.conns as u64) as f64 / secs
}

type BaseWs =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Starts a tokio-tungstenite echo server; abort the handle to stop it.
pub(crate) async fn baseline_echo_server() -> (tokio::task::JoinHandle<()>, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local address");
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            conns.spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(
                    stream,
                    Some(net::baseline_config()),
                )
                .await
                else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if (m.is_binary() || m.is_text()) && ws.send(m).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (task, addr)
}

/// Connects a tokio-tungstenite client.
pub(crate) async fn baseline_connect(url: &str) -> BaseWs {
    let (ws, _) =
        tokio_tungstenite::connect_async_with_config(url, Some(net::baseline_config()), true)
            .await
            .expect("baseline connect");
    ws
}

async fn baseline_pipeline(ws: &mut BaseWs, data: &Bytes, count: u64, window: u64) {
    let (mut sent, mut got) = (0u64, 0u64);
    while got < count {
        if sent < count && sent - got < window {
            ws.send(Message::Binary(data.clone())).await.expect("send");
            sent += 1;
            continue;
        }
        match ws.next().await {
            Some(Ok(Message::Binary(_))) => got += 1,
            Some(Ok(_)) => {}
            _ => panic!("baseline connection ended"),
        }
    }
}

/// Messages per second through tokio-tungstenite (call on tokio).
pub(crate) async fn baseline_throughput(load: Load) -> f64 {
    let (server, addr) = baseline_echo_server().await;
    let url = format!("ws://{addr}/");
    let mut clients = Vec::new();
    for _ in 0..load.conns {
        clients.push(baseline_connect(&url).await);
    }
    let data = Bytes::from(vec![7u8; load.size]);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for mut ws in clients {
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            baseline_pipeline(&mut ws, &data, load.per_conn, load.window).await;
            ws
        }));
    }
    let mut finished = Vec::new();
    for t in tasks {
        finished.push(t.await.expect("pipeline"));
    }
    let secs = start.elapsed().as_secs_f64();
    for ws in &mut finished {
        let _ = ws.close(None).await;
    }
    server.abort();
    (load.per_conn * load.conns as u64) as f64 / secs
}

/// Round-trip times in microseconds of `n` sequential 32-byte messages
/// through Kitestring (after `warm` unrecorded ones).
pub(crate) async fn ours_latency(runtime: Arc<dyn Runtime>, warm: usize, n: usize) -> Vec<f64> {
    let (server, addr) = ours_echo_server(&runtime);
    let url = format!("ws://{addr}/");
    let (client, mut events) =
        net::ours_connect(runtime.clone(), &url, ClientOptions::default()).await;
    let data = Bytes::from(vec![7u8; 32]);
    let mut rtts = Vec::with_capacity(n);
    for i in 0..warm + n {
        let t = Instant::now();
        client
            .send_payload(Payload::binary(data.clone()))
            .await
            .expect("send");
        loop {
            match events.next().await {
                Some(Event::Message(_)) => break,
                Some(_) => {}
                None => panic!("client stopped"),
            }
        }
        if i >= warm {
            rtts.push(t.elapsed().as_nanos() as f64 / 1000.0);
        }
    }
    let _ = client.close().await;
    let _ = server.shutdown().await;
    rtts
}

/// Round-trip times in microseconds through tokio-tungstenite.
pub(crate) async fn baseline_latency(warm: usize, n: usize) -> Vec<f64> {
    let (server, addr) = baseline_echo_server().await;
    let mut ws = baseline_connect(&format!("ws://{addr}/")).await;
    let data = Bytes::from(vec![7u8; 32]);
    let mut rtts = Vec::with_capacity(n);
    for i in 0..warm + n {
        let t = Instant::now();
        ws.send(Message::Binary(data.clone())).await.expect("send");
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(_))) => break,
                Some(Ok(_)) => {}
                _ => panic!("baseline connection ended"),
            }
        }
        if i >= warm {
            rtts.push(t.elapsed().as_nanos() as f64 / 1000.0);
        }
    }
    let _ = ws.close(None).await;
    server.abort();
    rtts
}

/// The runtimes ours runs on in scenario 2.
#[derive(Clone, Copy)]
enum Rt {
    Tokio,
    Smol,
    AsyncStd,
}

impl Rt {
    fn name(self) -> &'static str {
        match self {
            Rt::Tokio => "tokio",
            Rt::Smol => "smol",
            Rt::AsyncStd => "async-std",
        }
    }

    fn throughput(self, load: Load) -> f64 {
        match self {
            Rt::Tokio => net::tokio_runtime()
                .block_on(async { ours_throughput(kitestring_tokio::runtime(), load).await }),
            Rt::Smol => net::smol_block_on(|runtime| ours_throughput(runtime, load)),
            Rt::AsyncStd => {
                async_std::task::block_on(ours_throughput(kitestring_async_std::runtime(), load))
            }
        }
    }
}

/// Scenario 2: pipelined echo throughput.
pub(crate) fn throughput_scenario(opts: &crate::Options) -> Vec<crate::Figure> {
    let (reps, scale) = if opts.quick { (1, 20) } else { (3, 1) };
    let loads = [
        (1, 32, 40_000, 128),
        (1, 16 * 1024, 10_000, 32),
        (100, 32, 400, 16),
        (100, 16 * 1024, 100, 4),
    ];
    let runtimes = [Rt::Tokio, Rt::Smol, Rt::AsyncStd];
    let mut figures = Vec::new();
    for (conns, size, per_conn, window) in loads {
        // `KITESTRING_BENCH_ECHO_LOAD=100/16384` runs one load alone
        // (connections/bytes), for profiling it.
        if let Ok(only) = std::env::var("KITESTRING_BENCH_ECHO_LOAD") {
            if only != format!("{conns}/{size}") {
                continue;
            }
        }
        let load = Load {
            conns,
            size,
            per_conn: (per_conn / scale).max(4),
            window,
        };
        // `KITESTRING_BENCH_ECHO_SIDE=tokio` (or `smol`, `async-std`,
        // `baseline`) runs one side alone, to profile it: its rate is
        // printed, and no ratio is reported.
        let side = std::env::var("KITESTRING_BENCH_ECHO_SIDE").ok();
        let runs = |name: &str| side.as_deref().is_none_or(|s| s == name);
        let mut base = Vec::new();
        let mut ours: Vec<Vec<f64>> = vec![Vec::new(); runtimes.len()];
        for _ in 0..reps {
            if runs("baseline") {
                base.push(net::tokio_runtime().block_on(baseline_throughput(load)));
            }
            for (i, rt) in runtimes.iter().enumerate() {
                if runs(rt.name()) {
                    ours[i].push(rt.throughput(load));
                }
            }
        }
        if side.is_some() {
            for (name, rates) in std::iter::once(("baseline", &mut base))
                .chain(runtimes.iter().map(|rt| rt.name()).zip(ours.iter_mut()))
            {
                if !rates.is_empty() {
                    let r = net::median(rates);
                    eprintln!("  echo {conns} conn(s) {size} B {name} alone: {r:.0} msg/s");
                }
            }
            continue;
        }
        let base = net::median(&mut base);
        let label = if size >= 1024 {
            format!("{} KiB", size / 1024)
        } else {
            format!("{size} B")
        };
        for (i, rt) in runtimes.iter().enumerate() {
            let o = net::median(&mut ours[i]);
            eprintln!(
                "  echo {conns} conn(s) {label} {}: {o:.0} msg/s vs {base:.0}",
                rt.name()
            );
            figures.push(crate::Figure {
                scenario: format!("echo {conns}c {label} {}", rt.name()),
                metric: "messages/s",
                ours: o,
                baseline: base,
                higher_is_better: true,
                target: Some(if size >= 1024 { 0.95 } else { 0.90 }),
                kind: crate::Kind::Ratio,
                range: None,
                failed: None,
            });
        }
    }
    figures
}

/// Scenario 3: ping-pong latency, 32 B, one connection, on tokio.
pub(crate) fn latency_scenario(opts: &crate::Options) -> Vec<crate::Figure> {
    let (reps, warm, n) = if opts.quick {
        (1, 100, 500)
    } else {
        (3, 1_000, 10_000)
    };
    let (mut b50, mut b99, mut o50, mut o99) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let mut b = net::tokio_runtime().block_on(baseline_latency(warm, n));
        let mut o = net::tokio_runtime()
            .block_on(async { ours_latency(kitestring_tokio::runtime(), warm, n).await });
        b.sort_by(f64::total_cmp);
        o.sort_by(f64::total_cmp);
        b50.push(net::percentile(&b, 50.0));
        b99.push(net::percentile(&b, 99.0));
        o50.push(net::percentile(&o, 50.0));
        o99.push(net::percentile(&o, 99.0));
    }
    vec![
        crate::Figure {
            scenario: "ping-pong 32 B, tokio".into(),
            metric: "p50 round trip (us)",
            ours: net::median(&mut o50),
            baseline: net::median(&mut b50),
            higher_is_better: false,
            target: Some(2.0),
            kind: crate::Kind::Difference,
            range: None,
            failed: None,
        },
        crate::Figure {
            scenario: "ping-pong 32 B, tokio".into(),
            metric: "p99 round trip (us)",
            ours: net::median(&mut o99),
            baseline: net::median(&mut b99),
            higher_is_better: false,
            target: Some(1.2),
            kind: crate::Kind::Ratio,
            range: None,
            failed: None,
        },
    ]
}
