//! `kitestring-node`: one server of a cluster on Redis, for the demo's
//! cluster mode and the cluster tests that kill real processes.
//!
//! Its application echoes every message back to the session that sent it
//! (room publishes go to the room's members instead, through Redis)
//! and only then marks it handled (`Acknowledge::AfterHandled`: a message
//! is acknowledged once handled, so a crash never loses an acknowledged
//! one), and prints a line for each message it handled. It hands its
//! sessions over to the other nodes and exits when its standard input
//! closes or reads `shutdown`; killed, it loses what it held, as a crashed
//! node does.
//!
//! Lines on standard output: `listening ADDR` once bound, then
//! `handled SESSION ID PAYLOAD` (session in hex, the client's message id,
//! the payload's JSON) per message.
#![forbid(unsafe_code)]

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kitestring::kitestring_core::config::ResumeSecret;
use kitestring::kitestring_core::stream::HistoryConfig;
use kitestring::{Acknowledge, ServerConfig, ServerEvent, ServerOptions};

const USAGE: &str = "\
kitestring-node: one server of a Kitestring cluster on Redis, echoing every message

USAGE: kitestring-node --redis URL --name NAME [OPTIONS]

OPTIONS:
  --listen ADDR         address to serve on (default 127.0.0.1:0)
  --secret HEX          the cluster's resume secret, 32 hex digits (default: a fixed demo secret)
  --node-timeout-ms N   how long a silent node counts as alive (default 10000)
  --history N           entries of each room's history kept for members that were
                        away (default 16384: a killed node's members wait out the
                        node timeout before they resume)

Prints `listening ADDR`, then `handled SESSION ID PAYLOAD` per message.
Hands its sessions over and exits when standard input closes or reads `shutdown`.";

struct Options {
    redis: String,
    name: String,
    listen: std::net::SocketAddr,
    secret: [u8; 16],
    node_timeout: Duration,
    history: usize,
}

fn parse() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let mut redis = None;
    let mut name = None;
    let mut listen = "127.0.0.1:0".to_owned();
    let mut secret = *b"kitestring demo!";
    let mut node_timeout = Duration::from_secs(10);
    let mut history = 16_384;
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--redis" => redis = Some(value()?),
            "--name" => name = Some(value()?),
            "--listen" => listen = value()?,
            "--secret" => {
                let hex = value()?;
                let id =
                    kitestring::SessionId::from_hex(&hex).ok_or("--secret takes 32 hex digits")?;
                secret = id.0;
            }
            "--node-timeout-ms" => {
                let ms: u64 = value()?
                    .parse()
                    .map_err(|e| format!("--node-timeout-ms: {e}"))?;
                node_timeout = Duration::from_millis(ms);
            }
            "--history" => {
                history = value()?.parse().map_err(|e| format!("--history: {e}"))?;
            }
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown option {other}\n\n{USAGE}")),
        }
    }
    Ok(Options {
        redis: redis.ok_or(format!("--redis is required\n\n{USAGE}"))?,
        name: name.ok_or(format!("--name is required\n\n{USAGE}"))?,
        listen: listen.parse().map_err(|e| format!("--listen: {e}"))?,
        secret,
        node_timeout,
        history,
    })
}

fn main() -> ExitCode {
    // Warnings (a backplane that does not answer, a slow consumer closed)
    // on standard error, tagged with the node's name by the caller.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
        .with_ansi(false)
        .try_init();
    let opts = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kitestring-node: no runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kitestring-node: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(opts: Options) -> Result<(), Box<dyn std::error::Error>> {
    let backplane =
        kitestring_redis::RedisBackplane::connect(&opts.redis, opts.name.clone()).await?;
    let options = ServerOptions {
        config: ServerConfig {
            resume_secret: ResumeSecret(opts.secret),
            acknowledge: Acknowledge::AfterHandled,
            history: HistoryConfig {
                max_entries: opts.history,
                max_bytes: 64 << 20,
            },
            ..ServerConfig::default()
        },
        backplane: Some(Arc::new(backplane)),
        node_timeout: opts.node_timeout,
        metrics_interval: None,
        ..ServerOptions::default()
    };
    let (server, mut events) = kitestring::bind(kitestring_tokio::runtime(), opts.listen, options)?;
    let addr = server.local_addr().ok_or("no local address")?;
    say(&format!("listening {addr}"));

    // Standard input closing (or `shutdown`) asks for a graceful stop.
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            match line {
                Ok(l) if l.trim() == "shutdown" => break,
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        let _ = stop_tx.send(());
    });

    let mut stopping = None;
    loop {
        tokio::select! {
            // A graceful stop runs beside the loop: the application goes
            // on handling what it was given, so the sessions it hands over
            // carry nothing half done.
            _ = &mut stop_rx, if stopping.is_none() => {
                let server = server.clone();
                stopping = Some(tokio::spawn(async move { server.shutdown().await }));
            }
            e = events.next() => {
                let Some(e) = e else { break };
                if let ServerEvent::Message { session, message } = e {
                    // Room publishes are the room's to deliver (and are
                    // acknowledged once Redis took them).
                    if message.room.is_some() {
                        continue;
                    }
                    // The payload as JSON text, whichever codec carried it.
                    let text = kitestring::decode::<serde_json::Value>(&message.payload)
                        .map_or_else(|_| "?".to_owned(), |v| v.to_string());
                    // Echo first, then say it was handled: a crash in
                    // between leaves the message unacknowledged, and the
                    // client sends it again (with the same id).
                    if server.send_payload_when_ready(session, message.payload.clone()).await.is_ok() {
                        say(&format!("handled {} {} {text}", session.to_hex(), message.id.0));
                        let _ = server.handled(session, message.seq).await;
                    }
                }
            }
        }
    }
    match stopping {
        Some(task) => task.await??,
        None => server.shutdown().await?,
    }
    say("stopped");
    Ok(())
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
