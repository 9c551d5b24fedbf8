//! HTTP and Kitestring on one port, with axum: a login form that sets a
//! cookie, a page, the WebSocket at `/ws` (authenticated by that cookie,
//! checked asynchronously), and Prometheus metrics at `/metrics`. The
//! server echoes every message back to its sender.
//!
//! ```text
//! cargo run -p kitestring-axum --example app            # on 127.0.0.1:3000
//! cargo run -p kitestring-axum --example app -- 127.0.0.1:8080
//! ```
//!
//! Open the page, log in, and the page's script opens a session on `/ws`
//! (the browser sends the cookie with the upgrade); or, from a shell:
//!
//! ```text
//! curl -si -d user=alice http://127.0.0.1:3000/login    # Set-Cookie: sid=...
//! curl -s http://127.0.0.1:3000/metrics | grep kitestring_
//! ```
//!
//! The test `tests/app.rs` starts this very program's router and drives it.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use futures_util::StreamExt;
use kitestring::{
    AuthReject, AuthRequest, Authenticator, ServerEvent, ServerEvents, ServerHandle, ServerOptions,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Who a request's cookie says it is: put in the request's extensions by
/// [`current_user`], read by the Kitestring authenticator.
#[derive(Clone, Debug)]
pub struct User(pub String);

/// The login sessions: cookie value to user name. A real application keeps
/// them in its database.
#[derive(Default)]
pub struct Logins(Mutex<HashMap<String, String>>);

impl Logins {
    /// Looks a cookie up, as a database query would: asynchronously.
    async fn find(&self, sid: &str) -> Option<String> {
        tokio::task::yield_now().await;
        self.0.lock().ok()?.get(sid).cloned()
    }
}

/// The application: its router, and the Kitestring server behind `/ws`.
pub struct App {
    /// Every route: `/`, `/login`, `/metrics`, `/ws`.
    pub router: Router,
    /// The Kitestring server.
    pub server: ServerHandle,
    /// Its events (the echo loop takes them: [`echo`]).
    pub events: ServerEvents,
}

/// Builds the application. `metrics_interval`: how often the server
/// publishes its gauges and counters.
pub fn build(
    prometheus: PrometheusHandle,
    metrics_interval: Duration,
) -> Result<App, kitestring::ServeError> {
    let logins = Arc::new(Logins::default());
    let options = ServerOptions {
        // The user was found by the middleware below; the authenticator
        // only reads it. (It could as well look the cookie up itself:
        // `Authenticator::new` takes an async closure, bounded by
        // `auth_timeout`, and a slow lookup holds up no other upgrade.)
        auth: Some(Authenticator::new(|req: AuthRequest| async move {
            match req.extension::<User>() {
                Some(User(name)) => Ok(Some(name.clone())),
                None => Err(AuthReject::Unauthorized),
            }
        })),
        metrics_interval: Some(metrics_interval),
        ..ServerOptions::default()
    };
    let (server, events) = kitestring::start(kitestring_tokio::runtime(), options)?;
    let router = Router::new()
        .route("/", get(page))
        .route("/login", post(login))
        .route(
            "/metrics",
            get(move || {
                let prometheus = prometheus.clone();
                async move { prometheus.render() }
            }),
        )
        .route("/ws", kitestring_axum::route(server.clone()))
        .layer(middleware::from_fn_with_state(logins.clone(), current_user))
        .with_state(logins);
    Ok(App {
        router,
        server,
        events,
    })
}

/// Middleware: the user the `sid` cookie names, if any, into the request's
/// extensions.
async fn current_user(State(logins): State<Arc<Logins>>, mut req: Request, next: Next) -> Response {
    let sid = req
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| kv.trim().strip_prefix("sid=").map(str::to_owned));
    if let Some(sid) = sid {
        if let Some(name) = logins.find(&sid).await {
            req.extensions_mut().insert(User(name));
        }
    }
    next.run(req).await
}

/// `POST /login` with the form `user=NAME`: a fresh login cookie.
async fn login(State(logins): State<Arc<Logins>>, body: String) -> Response {
    let Some(name) = body
        .split('&')
        .find_map(|kv| kv.strip_prefix("user="))
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric()))
    else {
        return (StatusCode::BAD_REQUEST, "user=NAME, letters and digits\n").into_response();
    };
    let sid = fresh_sid();
    if let Ok(mut logins) = logins.0.lock() {
        logins.insert(sid.clone(), name.to_owned());
    }
    (
        [(
            header::SET_COOKIE,
            format!("sid={sid}; Path=/; HttpOnly; SameSite=Strict"),
        )],
        format!("logged in as {name}\n"),
    )
        .into_response()
}

/// 128 bits, hex, from the standard library's randomly keyed hasher: hard
/// to guess for an example; a real application uses its session store's
/// ids.
fn fresh_sid() -> String {
    let half = || {
        let mut h = std::hash::RandomState::new().build_hasher();
        h.write_u64(0);
        h.finish()
    };
    format!("{:016x}{:016x}", half(), half())
}

/// `GET /`: a login form, and a script that opens a session on `/ws`.
async fn page() -> Html<&'static str> {
    Html(PAGE)
}

const PAGE: &str = r#"<!doctype html>
<title>Kitestring on axum</title>
<form method="post" action="/login"><input name="user" placeholder="name"> <button>log in</button></form>
<pre id="log"></pre>
<script>
// The Kitestring protocol by hand, just enough to show the session open:
// the browser sends the login cookie with the upgrade.
const log = (t) => document.getElementById("log").textContent += t + "\n";
const ws = new WebSocket(`ws://${location.host}/ws`);
const client = [...crypto.getRandomValues(new Uint8Array(16))].map(b => b.toString(16).padStart(2, "0")).join("");
ws.onopen = () => ws.send(JSON.stringify({t: "hello", versions: [1], client, caps: [], codecs: ["json"]}));
ws.onmessage = (m) => log("server: " + m.data);
ws.onclose = (e) => log("closed: " + e.code + " (log in first?)");
</script>
"#;

/// Echoes every message back to the session it came from.
pub async fn echo(server: ServerHandle, mut events: ServerEvents) {
    while let Some(event) = events.next().await {
        match event {
            ServerEvent::SessionOpened {
                session, identity, ..
            } => {
                println!("session {} opened for {identity:?}", session.to_hex());
            }
            ServerEvent::Message { session, message } => {
                if let Err(e) = server.send_payload(session, message.payload).await {
                    eprintln!("echo failed: {e}");
                }
            }
            _ => {}
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = match std::env::args().nth(1) {
        Some(a) => a.parse()?,
        None => "127.0.0.1:3000".parse()?,
    };
    // Installed before the server starts, so its metrics go there.
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    let app = build(prometheus, Duration::from_secs(1))?;
    tokio::spawn(echo(app.server.clone(), app.events));
    // Small frames must not wait for Nagle's algorithm (axum leaves it on;
    // Kitestring's own listener turns it off).
    let listener = tokio::net::TcpListener::bind(addr).await?.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    println!("http://{addr}/ (login, page), ws://{addr}/ws, http://{addr}/metrics");
    axum::serve(
        listener,
        app.router
            .into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}
