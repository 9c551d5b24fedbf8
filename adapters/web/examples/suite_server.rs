//! The server the browser suite (`adapters/web/tests/browser`) drives its
//! pages against: the built package and a test page, Kitestring on several
//! paths with different authentication, a chaos proxy in front of it, a
//! second listener whose pages have a foreign origin, and control routes
//! the test runner calls. Not a demo (that is the `chat` example): every
//! route here exists for a test.
//!
//! ```text
//! cargo run -p kitestring-web --example suite_server      # prints {"main":…,"proxy":…,"fallback":…,"foreign":…}
//! ```
//!
//! Routes on the main port (and, for pages only, the foreign one):
//!
//! * `/` the test page, `/pkg/…` the package (`KITESTRING_WEB_PKG`, or
//!   `adapters/web/pkg` built by `build.sh`);
//! * `/login?user=NAME` sets the `sid` cookie; `/ticket?user=NAME` hands
//!   out a single-use ticket for NAME;
//! * `/ws` anyone (the cookie's user as identity, if any); `/ws-auth` the
//!   cookie required (401 without); `/ws-ticket` a ticket in the query;
//!   `/ws-ban` always 403; `/ws-busy` always 503;
//! * `/control/cut`, `/control/blackhole`, `/control/throttle?bps=N` (POST;
//!   no `bps`: unthrottled): the proxy's faults on every connection it
//!   carries; `/control/refuse?on=1` (POST; without `on`: accept again):
//!   the proxy closes every new connection at once, a server that is down;
//!   `/control/tally`: what the server received, per client.
//! * `/control/fallback-refuse`, `/control/fallback-strip`,
//!   `/control/fallback-pass` (POST): what the second proxy, `fallback`,
//!   does with new connections that start with a WebSocket upgrade:
//!   answers them 400 itself, strips their `Upgrade` header (the server
//!   answers 426), or forwards them, as proxies that block WebSocket do and
//!   do not; plain requests always pass, so pages load through it and the
//!   HTTP fallback's requests are theirs (same origin).
//!   `/control/fallback-cut` cuts every connection it carries;
//!   `/control/fallback-throttle?bps=N` throttles them (no `bps`:
//!   unthrottled).
//!
//! The application behind the sessions echoes every message (and
//! datagram) to its sender, answers every request with its own payload, and on
//! `{"op":"push","count":N}` sends N numbered messages `{"s":i}` back.
//! Messages `{"n":i}` are tallied per client: the tally says how many
//! arrived, and how many were duplicates or came out of order.
//!
//! Synced maps: the room `settings` has the maps of [`open_maps`] from the
//! start. Requests (answered when done, with `{"error":…}` if it failed):
//! `{"op":"mapopen","room":R}` opens the same maps in room R;
//! `{"op":"mapset","room":R,"map":M,"key":K,"value":V}` and
//! `{"op":"mapdelete","room":R,"map":M,"key":K}` are the server's own
//! writes; `{"op":"mapread","room":R,"map":M}` answers
//! `{"entries":{K:V,…},"writes":{K:N,…}}`: what the map holds, and how
//! many members' writes of each key the server took.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use futures_util::StreamExt;
use kitestring::{
    AuthReject, AuthRequest, Authenticator, DecodeExt, MapOptions, MapWriters, OriginPolicy,
    ServerError, ServerEvent, ServerHandle, ServerOptions, Stamping,
};
use kitestring_chaos::Upgrades;
use serde_json::{json, Value};

/// What the server received from each client instance, by the numbers in
/// `{"n":i}` messages.
#[derive(Default)]
struct Tally {
    /// client id (hex) -> (last n, received, duplicates, out of order)
    clients: HashMap<String, (u64, u64, u64, u64)>,
    /// client id (hex) -> what happened to its sessions, in order:
    /// `opened`, `resumed`, `detached 1001`, `ended closed`, ...
    lives: HashMap<String, Vec<String>>,
    /// The sessions open now.
    open: Vec<kitestring::SessionId>,
    /// (room, map, key) -> members' writes the server took.
    map_writes: HashMap<(String, String, String), u64>,
}

#[derive(Clone)]
struct App {
    server: ServerHandle,
    pkg: PathBuf,
    page: PathBuf,
    proxy: Arc<kitestring_chaos::Proxy>,
    /// In front of pages whose WebSocket upgrades are blocked on the way.
    fallback: Arc<kitestring_chaos::Proxy>,
    tally: Arc<Mutex<Tally>>,
    tickets: Arc<Mutex<HashMap<String, String>>>,
}

fn authenticator(tickets: Arc<Mutex<HashMap<String, String>>>) -> Authenticator {
    Authenticator::sync(move |req: &AuthRequest| match req.path.as_str() {
        "/ws-auth" => match req.cookie("sid") {
            Some(user) if !user.is_empty() => Ok(Some(user)),
            _ => Err(AuthReject::Unauthorized),
        },
        "/ws-ticket" => {
            // Single use: a ticket is spent by the upgrade that shows it.
            let ticket = req.query_param("ticket").unwrap_or_default();
            match tickets.lock().ok().and_then(|mut t| t.remove(ticket)) {
                Some(user) => Ok(Some(user)),
                None => Err(AuthReject::Unauthorized),
            }
        }
        "/ws-ban" => Err(AuthReject::Forbidden),
        "/ws-busy" => Err(AuthReject::Unavailable),
        _ => Ok(req.cookie("sid")),
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let pkg = std::env::var_os("KITESTRING_WEB_PKG")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("pkg"));
    let page = root.join("tests/browser/page.html");
    let main = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let main_addr = main.local_addr()?;
    let foreign = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let foreign_addr = foreign.local_addr()?;
    let proxy = Arc::new(kitestring_chaos::Proxy::start(main_addr)?);
    let proxy_addr = proxy.local_addr();
    let fallback = Arc::new(kitestring_chaos::Proxy::start(main_addr)?);
    let fallback_addr = fallback.local_addr();
    let tickets = Arc::new(Mutex::new(HashMap::new()));
    let mut options = ServerOptions {
        auth: Some(authenticator(tickets.clone())),
        // Pages from the main port, directly or through a proxy; not
        // those of the foreign port.
        origins: OriginPolicy::AllowList(vec![
            format!("http://{main_addr}"),
            format!("http://{proxy_addr}"),
            format!("http://{fallback_addr}"),
        ]),
        ..ServerOptions::default()
    };
    if let Some(grace) = env_ms("SUITE_SESSION_GRACE_MS") {
        options.config.session_grace = grace;
    }
    // A scaled-down heartbeat, for the hidden-tab test: pings every
    // SUITE_PING_MS, closed after 1.5 times that without a frame.
    if let Some(ping) = env_ms("SUITE_PING_MS") {
        options.config.ping_interval = ping;
        options.config.pong_timeout = ping;
        options.config.idle_timeout = ping * 3 / 2;
        options.config.grace = ping / 10;
    }
    let (server, events) = kitestring::start(kitestring_tokio::runtime(), options)?;
    open_maps(&server, "settings").await?;
    let app = App {
        server: server.clone(),
        pkg,
        page,
        proxy: proxy.clone(),
        fallback: fallback.clone(),
        tally: Arc::new(Mutex::new(Tally::default())),
        tickets,
    };
    tokio::spawn(serve_sessions(server.clone(), events, app.tally.clone()));
    let pages = Router::new()
        .route("/", get(page_route))
        .route("/pkg/{*file}", get(pkg_route))
        .route("/login", get(login))
        .route("/ticket", get(ticket));
    let mut router = pages.clone();
    for path in ["/ws", "/ws-auth", "/ws-ticket", "/ws-ban", "/ws-busy"] {
        router = router.route(path, kitestring_axum::route(server.clone()));
    }
    let router = router
        .route(
            "/control/cut",
            post(|State(a): State<App>| async move { a.proxy.cut_all() }),
        )
        .route(
            "/control/blackhole",
            post(|State(a): State<App>| async move { a.proxy.black_hole_all() }),
        )
        .route(
            "/control/throttle",
            post(
                |State(a): State<App>, Query(q): Query<HashMap<String, String>>| async move {
                    let bps = q.get("bps").and_then(|b| b.parse().ok());
                    a.proxy.set_throttle(bps);
                },
            ),
        )
        .route(
            "/control/refuse",
            post(
                |State(a): State<App>, Query(q): Query<HashMap<String, String>>| async move {
                    a.proxy.set_refuse(q.contains_key("on"));
                },
            ),
        )
        .route(
            "/control/fallback-refuse",
            post(|State(a): State<App>| async move { a.fallback.set_upgrades(Upgrades::Refuse) }),
        )
        .route(
            "/control/fallback-strip",
            post(|State(a): State<App>| async move { a.fallback.set_upgrades(Upgrades::Strip) }),
        )
        .route(
            "/control/fallback-pass",
            post(|State(a): State<App>| async move { a.fallback.set_upgrades(Upgrades::Pass) }),
        )
        .route(
            "/control/fallback-cut",
            post(|State(a): State<App>| async move { a.fallback.cut_all() }),
        )
        .route(
            "/control/fallback-throttle",
            post(
                |State(a): State<App>, Query(q): Query<HashMap<String, String>>| async move {
                    let bps = q.get("bps").and_then(|b| b.parse().ok());
                    a.fallback.set_throttle(bps);
                },
            ),
        )
        .route("/control/tally", get(tally))
        .route("/control/sessions", get(sessions))
        .route("/control/push", post(push))
        .with_state(app.clone());
    let pages = pages.with_state(app);
    println!(
        "{}",
        json!({
            "main": main_addr.port(),
            "proxy": proxy_addr.port(),
            "fallback": fallback_addr.port(),
            "foreign": foreign_addr.port(),
        })
    );
    let nodelay = |l: tokio::net::TcpListener| {
        l.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        })
    };
    let foreign = axum::serve(nodelay(foreign), pages.into_make_service());
    tokio::spawn(async move {
        let _ = foreign.await;
    });
    axum::serve(
        nodelay(main),
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}

fn env_ms(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
}

async fn page_route(State(app): State<App>) -> Response {
    file(&app.page).await
}

async fn pkg_route(State(app): State<App>, Path(name): Path<String>) -> Response {
    if name.contains("..") {
        return StatusCode::NOT_FOUND.into_response();
    }
    file(&app.pkg.join(name)).await
}

async fn file(path: &std::path::Path) -> Response {
    let kind = match path.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("wasm") => "application/wasm",
        Some("ts") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    };
    // Small files, read at once: the suite loads a handful.
    match std::fs::read(path) {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, kind),
                (header::CACHE_CONTROL, "no-store"),
            ],
            bytes,
        )
            .into_response(),
        Err(_) => (
            StatusCode::NOT_FOUND,
            format!("{} not found\n", path.display()),
        )
            .into_response(),
    }
}

async fn login(Query(q): Query<HashMap<String, String>>) -> Response {
    let user = q.get("user").cloned().unwrap_or_default();
    (
        [(
            header::SET_COOKIE,
            format!("sid={user}; Path=/; SameSite=Strict"),
        )],
        format!("logged in as {user}\n"),
    )
        .into_response()
}

async fn ticket(State(app): State<App>, Query(q): Query<HashMap<String, String>>) -> String {
    let user = q.get("user").cloned().unwrap_or_else(|| "guest".into());
    let t = format!(
        "{:032x}",
        u128::from_le_bytes(std::array::from_fn(|i| {
            (std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), i) & 0xff) as u8
        }))
    );
    if let Ok(mut tickets) = app.tickets.lock() {
        tickets.insert(t.clone(), user);
    }
    t
}

async fn sessions(State(app): State<App>) -> Response {
    let lives = app
        .tally
        .lock()
        .map(|t| json!(t.lives).to_string())
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], lives).into_response()
}

/// `POST /control/push?count=N`: N numbered messages `{"s":i}` to every
/// open session, queued at once (whether or not its link carries them).
async fn push(State(app): State<App>, Query(q): Query<HashMap<String, String>>) -> Response {
    let count: u64 = q.get("count").and_then(|c| c.parse().ok()).unwrap_or(1);
    let open = app.tally.lock().map(|t| t.open.clone()).unwrap_or_default();
    for session in open {
        for s in 1..=count {
            if app.server.send(session, &json!({"s": s})).await.is_err() {
                return StatusCode::INTERNAL_SERVER_ERROR.into_response();
            }
        }
    }
    StatusCode::OK.into_response()
}

async fn tally(State(app): State<App>) -> Response {
    let tally = app.tally.lock().map(|t| {
        t.clients
            .iter()
            .map(|(client, (last, received, dups, gaps))| {
                (
                    client.clone(),
                    json!({"last": last, "received": received, "duplicates": dups, "outOfOrder": gaps}),
                )
            })
            .collect::<serde_json::Map<_, _>>()
    });
    match tally {
        Ok(t) => (
            [(header::CONTENT_TYPE, "application/json")],
            Value::Object(t).to_string(),
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// The synced maps of `room` the suite's pages use: `app`, which members
/// write (its `theme` is `"dark"` to start with), `locked`, which only the
/// server writes (its `mode` is `"strict"`), and `stamped`, whose writers
/// stamp their own writes (its `at` is `"server"`, stamped now: a page's
/// later write wins only if its clock says later). Opening them again
/// keeps what they hold and sets the three keys again.
async fn open_maps(server: &ServerHandle, room: &str) -> Result<(), ServerError> {
    server.open_map(room, "app", MapOptions::default()).await?;
    let locked = MapOptions::default().writers(MapWriters::Server);
    server.open_map(room, "locked", locked).await?;
    let stamped = MapOptions::default().stamping(Stamping::Peers);
    server.open_map(room, "stamped", stamped).await?;
    server.map_set(room, "app", "theme", "dark").await?;
    server.map_set(room, "locked", "mode", "strict").await?;
    server.map_set(room, "stamped", "at", "server").await?;
    Ok(())
}

/// A page's request about the synced maps (see the module's docs), carried
/// out; its answer. `None`: not such a request.
async fn map_op(server: &ServerHandle, v: &Value, tally: &Mutex<Tally>) -> Option<Value> {
    let op = v.get("op").and_then(Value::as_str)?;
    let field = |name: &str| v.get(name).and_then(Value::as_str).unwrap_or_default();
    let (room, map, key) = (field("room"), field("map"), field("key"));
    let done = |r: Result<(), ServerError>| match r {
        Ok(()) => json!(true),
        Err(e) => json!({ "error": e.to_string() }),
    };
    Some(match op {
        "mapopen" => done(open_maps(server, room).await),
        "mapset" => {
            let value = v.get("value").unwrap_or(&Value::Null);
            done(server.map_set(room, map, key, value).await.map(drop))
        }
        "mapdelete" => done(server.map_delete(room, map, key).await.map(drop)),
        "mapread" => {
            let entries = match server.map_entries(room, map).await {
                Ok(entries) => entries.unwrap_or_default(),
                Err(e) => return Some(json!({ "error": e.to_string() })),
            };
            let entries: serde_json::Map<String, Value> = entries
                .into_iter()
                .map(|(k, p)| {
                    let v = kitestring::decode::<Value>(&p).unwrap_or(Value::Null);
                    (k.to_string(), v)
                })
                .collect();
            let writes: serde_json::Map<String, Value> = tally
                .lock()
                .map(|t| {
                    t.map_writes
                        .iter()
                        .filter(|((r, m, _), _)| r == room && m == map)
                        .map(|((_, _, k), n)| (k.clone(), json!(n)))
                        .collect()
                })
                .unwrap_or_default();
            json!({ "entries": entries, "writes": writes })
        }
        _ => return None,
    })
}

/// The application: echo, answer, push, tally.
async fn serve_sessions(
    server: ServerHandle,
    mut events: kitestring::ServerEvents,
    tally: Arc<Mutex<Tally>>,
) {
    let mut clients = HashMap::new();
    while let Some(event) = events.next().await {
        match event {
            ServerEvent::SessionOpened {
                session,
                client,
                resumed,
                ..
            } => {
                clients.insert(session, client.to_hex());
                if let Ok(mut t) = tally.lock() {
                    let life = if resumed { "resumed" } else { "opened" };
                    t.lives
                        .entry(client.to_hex())
                        .or_default()
                        .push(life.into());
                    t.open.retain(|s| *s != session);
                    t.open.push(session);
                }
            }
            ServerEvent::SessionDetached { session, code } => {
                if let (Ok(mut t), Some(client)) = (tally.lock(), clients.get(&session)) {
                    let life = format!("detached {}", code.0);
                    t.lives.entry(client.clone()).or_default().push(life);
                }
            }
            ServerEvent::SessionEnded {
                session, reason, ..
            } => {
                if let (Ok(mut t), Some(client)) = (tally.lock(), clients.remove(&session)) {
                    let life = format!("ended {reason:?}");
                    t.lives.entry(client).or_default().push(life);
                    t.open.retain(|s| *s != session);
                }
            }
            ServerEvent::MapChanged {
                room,
                map,
                key,
                by: Some(_),
                ..
            } => {
                if let Ok(mut t) = tally.lock() {
                    let id = (room.to_string(), map.to_string(), key.to_string());
                    *t.map_writes.entry(id).or_default() += 1;
                }
            }
            ServerEvent::Datagram { session, data } => {
                let _ = server.send_datagram(session, data).await;
            }
            ServerEvent::Message { session, message } => {
                let value = message.decode::<Value>().ok();
                if let (Some(n), Some(client)) = (
                    value
                        .as_ref()
                        .and_then(|v| v.get("n"))
                        .and_then(Value::as_u64),
                    clients.get(&session),
                ) {
                    if let Ok(mut t) = tally.lock() {
                        let e = t.clients.entry(client.clone()).or_default();
                        e.1 += 1;
                        if n <= e.0 {
                            e.2 += 1;
                        } else if n != e.0 + 1 {
                            e.3 += 1;
                        }
                        e.0 = e.0.max(n);
                    }
                }
                if message.room.is_some() {
                    continue;
                }
                if message.request {
                    if let Some(answer) = match &value {
                        Some(v) => map_op(&server, v, &tally).await,
                        None => None,
                    } {
                        let _ = server.respond(session, message.id, &answer).await;
                        continue;
                    }
                    let _ = server
                        .respond_payload(session, message.id, message.payload)
                        .await;
                    continue;
                }
                // `{"op":"board","count":N}`: the session joins a room of
                // its own whose latest value of "tick" is set N times.
                let board = value
                    .as_ref()
                    .filter(|v| v.get("op").and_then(Value::as_str) == Some("board"))
                    .and_then(|v| v.get("count"))
                    .and_then(Value::as_u64);
                if let Some(count) = board {
                    let server = server.clone();
                    let room = format!("board-{}", session.to_hex());
                    tokio::spawn(async move {
                        if server.join(session, &room).await.is_err() {
                            return;
                        }
                        for s in 1..=count {
                            let v = json!({ "s": s });
                            if server.broadcast_latest(&room, "tick", &v).await.is_err() {
                                break;
                            }
                        }
                    });
                    continue;
                }
                let push = value
                    .as_ref()
                    .filter(|v| v.get("op").and_then(Value::as_str) == Some("push"))
                    .and_then(|v| v.get("count"))
                    .and_then(Value::as_u64);
                match push {
                    Some(count) => {
                        let server = server.clone();
                        tokio::spawn(async move {
                            for s in 1..=count {
                                if server
                                    .send_when_ready(session, &json!({"s": s}))
                                    .await
                                    .is_err()
                                {
                                    break;
                                }
                            }
                        });
                    }
                    None => {
                        let _ = server.send_payload(session, message.payload).await;
                    }
                }
            }
            _ => {}
        }
    }
}
