//! A chat in the browser: the page (`demo/index.html`), the package it
//! loads (`pkg/`, built by `build.sh`) and the Kitestring sessions it opens,
//! all on one port.
//!
//! ```text
//! bash adapters/web/build.sh                            # once, and after changes
//! cargo run -p kitestring-web --example chat_page     # http://127.0.0.1:8080/
//! cargo run -p kitestring-web --example chat_page -- 127.0.0.1:9000
//! ```
//!
//! Open the page in two windows, pick names, and talk: messages go to
//! every other member of the room `lobby` exactly once, through
//! reconnects (take the network away in the browser's tools and bring it
//! back), and survive a reload of the page. The name a page picks is its
//! identity (a demo: a real application authenticates with a cookie or a
//! ticket, as `tests/browser` does).

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use futures_util::StreamExt;
use kitestring::{AuthRequest, Authenticator, ServerEvent, ServerOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = match std::env::args().nth(1) {
        Some(a) => a.parse()?,
        None => "127.0.0.1:8080".parse()?,
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if !root.join("pkg/kitestring.js").exists() {
        eprintln!("the browser package is not built: run `bash adapters/web/build.sh` first");
        std::process::exit(1);
    }
    let options = ServerOptions {
        // The name the page picked, from its URL: letters and digits only.
        auth: Some(Authenticator::sync(|req: &AuthRequest| {
            Ok(req
                .query_param("name")
                .filter(|n| !n.is_empty() && n.len() <= 32)
                .filter(|n| n.bytes().all(|b| b.is_ascii_alphanumeric()))
                .map(str::to_owned))
        })),
        ..ServerOptions::default()
    };
    let (server, mut events) = kitestring::start(kitestring_tokio::runtime(), options)?;
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                ServerEvent::SessionOpened {
                    identity, resumed, ..
                } => println!(
                    "{} {}",
                    identity.as_deref().unwrap_or("someone"),
                    if resumed { "is back" } else { "arrived" }
                ),
                ServerEvent::SessionEnded { reason, .. } => println!("a session ended: {reason:?}"),
                _ => {}
            }
        }
    });
    let app = Router::new()
        .route(
            "/",
            get(|State(root): State<PathBuf>| async move { file(&root.join("demo/index.html")) }),
        )
        .route(
            "/pkg/{file}",
            get(
                |State(root): State<PathBuf>, Path(name): Path<String>| async move {
                    match name.contains("..") || name.contains('/') {
                        true => StatusCode::NOT_FOUND.into_response(),
                        false => file(&root.join("pkg").join(name)),
                    }
                },
            ),
        )
        .route("/ws", kitestring_axum::route(server))
        .with_state(root);
    let listener = tokio::net::TcpListener::bind(addr).await?.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    println!("chat on http://{addr}/");
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}

fn file(path: &std::path::Path) -> Response {
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
