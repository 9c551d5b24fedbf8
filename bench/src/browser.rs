//! Scenarios: the browser package (`adapters/web`). `browser-size`: what a
//! page downloads, gzip -9, against the 120 KB target. `browser-echo`: in
//! one headless Chromium page, echo loops through the package against a
//! plain browser `WebSocket` echo loop (no session layer) in the same run,
//! in both codecs and two payload sizes, with the page's script time per
//! message, with the package's defaults (what the page sends within one
//! turn of its event loop batched into one frame), with batching off, and
//! with a 2 ms batch window; and the round trip of one message at a time
//! with the defaults and with batching off, against the plain socket's.
//! `browser-connect`: a page's connect and resume (the `hello` in
//! the URL) against the Rust client's (the `hello` in the upgrade header).
//!
//! The page half is `adapters/web/tests/browser/bench.mjs`; Chromium,
//! Node.js and playwright-core come from `adapters/web/test.sh --setup`.
//! Without them the scenarios say so and measure nothing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use kitestring::{ClientOptions, Event, ServerEvent, ServerOptions};

use crate::{net, Figure, Kind, Options, Range};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Installs what the page needs and builds the package; `false` (and why,
/// on stderr) if that cannot be done here.
fn setup() -> bool {
    let status = Command::new("bash")
        .arg(root().join("adapters/web/test.sh"))
        .arg("--setup")
        .status();
    match status {
        Ok(s) if s.success() => true,
        other => {
            eprintln!("  browser scenarios skipped: adapters/web/test.sh --setup: {other:?}");
            false
        }
    }
}

fn gzip9(path: &Path) -> Option<u64> {
    let out = Command::new("gzip")
        .args(["-9", "-c"])
        .arg(path)
        .output()
        .ok()?;
    out.status.success().then_some(out.stdout.len() as u64)
}

/// What a page downloads: the module, its glue, the driver and the
/// MessagePack codec, each compressed with gzip -9.
pub(crate) fn size_scenario(_opts: &Options) -> Vec<Figure> {
    if !setup() {
        return Vec::new();
    }
    let pkg = root().join("adapters/web/pkg");
    let files = [
        "kitestring_web_bg.wasm",
        "kitestring_web.js",
        "kitestring.js",
        "msgpack.js",
    ];
    let mut total = 0;
    let mut raw_total = 0;
    for f in files {
        let path = pkg.join(f);
        let raw = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let Some(gz) = gzip9(&path) else {
            eprintln!("  browser-size: cannot gzip {}", path.display());
            return Vec::new();
        };
        eprintln!("  {f}: {raw} bytes, {gz} gzip -9");
        total += gz;
        raw_total += raw;
    }
    eprintln!("  total: {raw_total} bytes, {total} gzip -9");
    vec![Figure {
        scenario: "browser: package size (wasm + glue + driver + msgpack)".into(),
        metric: "KB, gzip -9 (baseline: uncompressed)",
        ours: total as f64 / 1000.0,
        baseline: raw_total as f64 / 1000.0,
        higher_is_better: false,
        target: Some(120.0),
        kind: Kind::Absolute,
        range: None,
        failed: None,
    }]
}

/// Serves the suite's page, the package and Kitestring at `/ws` (the
/// server echoes every message to its sender); a plain WebSocket echo
/// server on another port. Returns (page base URL, plain echo URL).
async fn serve() -> (String, String) {
    // The plain echo server limits nothing: neither does this one (its
    // default flood protection would hold a page to 1 000 messages a
    // second past a burst of 2 000).
    let mut options = ServerOptions::default();
    options.config.rate_limit = None;
    let (server, mut events) =
        kitestring::start(kitestring_tokio::runtime(), options).expect("start");
    let echo = server.clone();
    tokio::spawn(async move {
        while let Some(e) = events.next().await {
            if let ServerEvent::Message { session, message } = e {
                let _ = echo.send_payload(session, message.payload).await;
            }
        }
    });
    let web = root().join("adapters/web");
    let app =
        Router::new()
            .route(
                "/",
                get(|State(web): State<PathBuf>| async move {
                    file(&web.join("tests/browser/page.html"))
                }),
            )
            .route(
                "/pkg/{file}",
                get(
                    |State(web): State<PathBuf>, UrlPath(name): UrlPath<String>| async move {
                        match name.contains("..") || name.contains('/') {
                            true => StatusCode::NOT_FOUND.into_response(),
                            false => file(&web.join("pkg").join(name)),
                        }
                    },
                ),
            )
            .route("/ws", kitestring_axum::route(server))
            .with_state(web);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listener");
    let addr = listener.local_addr().expect("address");
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
    });
    let plain = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("plain listener");
    let plain_addr = plain.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = plain.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                let (mut tx, mut rx) = ws.split();
                while let Some(Ok(m)) = rx.next().await {
                    if (m.is_text() || m.is_binary()) && tx.send(m).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (format!("http://{addr}"), format!("ws://{plain_addr}/"))
}

fn file(path: &Path) -> Response {
    let kind = match path.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("wasm") => "application/wasm",
        _ => "application/octet-stream",
    };
    match std::fs::read(path) {
        Ok(bytes) => ([(header::CONTENT_TYPE, kind)], bytes).into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Runs the page half; its JSON.
fn page_half(base: &str, plain: &str, config: &serde_json::Value) -> Option<serde_json::Value> {
    let script = root().join("adapters/web/tests/browser/bench.mjs");
    let out = Command::new("nice")
        .args(["-n", "19", "node"])
        .arg(&script)
        .args([base, plain, &config.to_string()])
        .env(
            "CHROMIUM",
            std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
        )
        .stderr(std::process::Stdio::inherit())
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("  bench.mjs failed: {}", out.status);
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn numbers(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
        .unwrap_or_default()
}

fn spread(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

fn figure(
    scenario: String,
    metric: &'static str,
    ours: &[f64],
    base: &[f64],
    higher_is_better: bool,
    target: Option<f64>,
) -> Figure {
    Figure {
        scenario,
        metric,
        ours: net::median(&mut ours.to_vec()),
        baseline: net::median(&mut base.to_vec()),
        higher_is_better,
        target,
        kind: Kind::Ratio,
        range: Some(Range {
            ours: spread(ours),
            baseline: spread(base),
            runs: ours.len(),
        }),
        failed: None,
    }
}

/// The echo rate and script time of the package against a plain
/// `WebSocket` loop in the same page and run.
pub(crate) fn echo_scenario(opts: &Options) -> Vec<Figure> {
    if !setup() {
        return Vec::new();
    }
    let (reps, n, latency) = if opts.quick {
        (1, 2_000, 200)
    } else {
        (5, 20_000, 1_000)
    };
    let rt = net::tokio_runtime();
    let (base, plain) = rt.block_on(serve());
    let config =
        serde_json::json!({"reps": reps, "n": n, "window": 64, "connects": 2, "latency": latency});
    let Some(result) = page_half(&base, &plain, &config) else {
        return Vec::new();
    };
    let mut figures = Vec::new();
    for codec in ["json", "msgpack"] {
        for size in [60, 1024] {
            let key = format!("{codec}-{size}");
            let e = &result["echo"][&key];
            let mut f = figure(
                format!("browser echo {codec} {size} B: package vs plain WebSocket"),
                "msg/s, one page, window 64",
                &numbers(&e["ours"]),
                &numbers(&e["plain"]),
                true,
                Some(0.8),
            );
            if e["bad"].as_u64().unwrap_or(0) > 0 {
                f.failed = Some(crate::Failure {
                    why: format!("{} echoes out of order", e["bad"]),
                    ours: true,
                });
            }
            figures.push(f);
            figures.push(figure(
                format!("browser echo {codec} {size} B: package, batching off, vs plain"),
                "msg/s, one page, window 64",
                &numbers(&e["unbatched"]),
                &numbers(&e["plain"]),
                true,
                None,
            ));
            figures.push(figure(
                format!("browser echo {codec} {size} B: package, batch 2 ms, vs plain"),
                "msg/s, one page, window 64",
                &numbers(&e["batched"]),
                &numbers(&e["plain"]),
                true,
                Some(0.8),
            ));
            figures.push(figure(
                format!("browser script time {codec} {size} B: package vs plain"),
                "us of script per message (ScriptDuration)",
                &numbers(&e["oursScriptUs"]),
                &numbers(&e["plainScriptUs"]),
                false,
                None,
            ));
            figures.push(figure(
                format!("browser script time {codec} {size} B: package, batching off, vs plain"),
                "us of script per message (ScriptDuration)",
                &numbers(&e["unbatchedScriptUs"]),
                &numbers(&e["plainScriptUs"]),
                false,
                None,
            ));
            figures.push(figure(
                format!("browser script time {codec} {size} B: package, batch 2 ms, vs plain"),
                "us of script per message (ScriptDuration)",
                &numbers(&e["batchedScriptUs"]),
                &numbers(&e["plainScriptUs"]),
                false,
                None,
            ));
        }
    }
    let l = &result["latency"];
    for (kind, what) in [("ours", "package"), ("unbatched", "package, batching off,")] {
        figures.push(figure(
            format!("browser round trip JSON 60 B: {what} vs plain WebSocket"),
            "us, mean of one message at a time",
            &numbers(&l[kind]),
            &numbers(&l["plain"]),
            false,
            None,
        ));
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    figures
}

/// A page's connect and resume against the Rust client's, in ms.
pub(crate) fn connect_scenario(opts: &Options) -> Vec<Figure> {
    if !setup() {
        return Vec::new();
    }
    let connects = if opts.quick { 5 } else { 50 };
    let rt = net::tokio_runtime();
    let (base, plain) = rt.block_on(serve());
    // The Rust client against the same server, the hello in the upgrade.
    let (rust_fresh, rust_resumed) = rt.block_on(async {
        let url = format!("{}/ws", base.replace("http", "ws"));
        let runtime = kitestring_tokio::runtime();
        let (mut fresh, mut resumed) = (Vec::new(), Vec::new());
        for _ in 0..connects {
            let started = Instant::now();
            let (client, mut events) =
                kitestring::connect(runtime.clone(), &url, ClientOptions::default())
                    .expect("connect");
            while let Some(e) = events.next().await {
                if matches!(e, Event::Connected { .. }) {
                    break;
                }
            }
            fresh.push(started.elapsed().as_secs_f64() * 1e3);
            let _ = client.send_acked(&1).await;
            let started = Instant::now();
            let _ = client.reconnect().await;
            while let Some(e) = events.next().await {
                if matches!(e, Event::Connected { resumed: true, .. }) {
                    break;
                }
            }
            resumed.push(started.elapsed().as_secs_f64() * 1e3);
            let _ = client.close().await;
        }
        (fresh, resumed)
    });
    let config = serde_json::json!({"reps": 0, "n": 0, "connects": connects});
    let Some(result) = page_half(&base, &plain, &config) else {
        return Vec::new();
    };
    let page_fresh = numbers(&result["connect"]["fresh"]);
    let page_resumed = numbers(&result["connect"]["resumed"]);
    let page_plain = numbers(&result["connect"]["plain"]);
    rt.shutdown_timeout(Duration::from_secs(1));
    vec![
        figure(
            "browser connect: page (hello in the URL) vs Rust client (in the upgrade)".into(),
            "ms to an open session",
            &page_fresh,
            &rust_fresh,
            false,
            None,
        ),
        figure(
            "browser resume: page (hello in the URL) vs Rust client (in the upgrade)".into(),
            "ms from reconnect() to the resumed session",
            &page_resumed,
            &rust_resumed,
            false,
            None,
        ),
        figure(
            "browser connect: page's session vs a plain page WebSocket's open".into(),
            "ms",
            &page_fresh,
            &page_plain,
            false,
            None,
        ),
    ]
}
