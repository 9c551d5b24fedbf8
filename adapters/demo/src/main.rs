//! `cargo run --release -p kitestring-demo`: a server, a chaos proxy that
//! cuts and black-holes connections at random, and many clients exchanging
//! reliable messages both ways through it; ends with `lost: N` and
//! `duplicated: N` and exits non-zero if either is not zero.
#![forbid(unsafe_code)]

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kitestring::Runtime;
use kitestring_demo::faults::{FaultInjector, FaultPlan};
use kitestring_demo::harness::{Harness, Settings};
use kitestring_demo::report::{status_line, Report};
use kitestring_demo::Timing;

const USAGE: &str = "\
kitestring-demo: resumable WebSocket sessions under random cuts and black holes

USAGE: kitestring-demo [OPTIONS]

OPTIONS:
  --duration SECS    how long faults and traffic run (default 20)
  --clients N        number of clients (default 20)
  --rate R           messages per second per client, in each direction (default 50)
  --runtime NAME     tokio, async-std or smol (default tokio)
  --fault-rate R     mean faults per connection per second (default 0.15):
                     each second, each live connection is cut or black-holed
                     with probability R
  --black-holes S    share of faults that are black holes rather than cuts,
                     0 to 1 (default 0.4)
  --seed N           seed of the fault schedule (default: from the clock)
  --nodes N          cluster mode: N server processes (kitestring-node) on a
                     private redis-server (installed: Debian redis-server),
                     clients spread over them through a proxy, and faults
                     that kill nodes (SIGKILL), restart them gracefully and
                     cut their Redis connections, besides client cuts
                     (tokio; --fault-rate and --black-holes do not apply)
  -h, --help         this text

The run ends by stopping the faults and waiting (at most 20 s) until every
message is delivered or reported by the library as unconfirmed. `lost`
counts messages that the API accepted, that never arrived, and that no
event named; the exit code is 1 if anything was lost, duplicated or
delivered out of order.";

/// Which async runtime to run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RuntimeKind {
    Tokio,
    AsyncStd,
    Smol,
}

impl RuntimeKind {
    fn name(self) -> &'static str {
        match self {
            RuntimeKind::Tokio => "tokio",
            RuntimeKind::AsyncStd => "async-std",
            RuntimeKind::Smol => "smol",
        }
    }
}

/// Command-line options.
#[derive(Clone, Debug)]
struct Options {
    duration: Duration,
    clients: usize,
    rate: f64,
    runtime: RuntimeKind,
    fault_rate: f64,
    black_holes: f64,
    seed: u64,
    nodes: usize,
}

/// Errors the demo reports before exiting with 2.
#[derive(Debug)]
enum DemoError {
    Usage(String),
    Setup(String),
}

impl std::fmt::Display for DemoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DemoError::Usage(m) => write!(f, "{m}\n\n{USAGE}"),
            DemoError::Setup(m) => write!(f, "{m}"),
        }
    }
}

fn value<T: std::str::FromStr>(
    args: &mut impl Iterator<Item = String>,
    flag: &str,
) -> Result<T, DemoError> {
    let raw = args
        .next()
        .ok_or_else(|| DemoError::Usage(format!("{flag} needs a value")))?;
    raw.parse()
        .map_err(|_| DemoError::Usage(format!("{flag}: cannot use {raw:?}")))
}

/// Parses the command line; `Ok(None)` means help was printed.
fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Options>, DemoError> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 % 1_000_000)
        .unwrap_or(1);
    let mut o = Options {
        duration: Duration::from_secs(20),
        clients: 20,
        rate: 50.0,
        runtime: RuntimeKind::Tokio,
        fault_rate: 0.15,
        black_holes: 0.4,
        seed,
        nodes: 0,
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        let mut rest = inline.into_iter().chain(&mut args);
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--duration" => {
                let secs: f64 = value(&mut rest, &flag)?;
                if !(secs.is_finite() && secs > 0.0 && secs < 86_400.0) {
                    return Err(DemoError::Usage("--duration must be positive".into()));
                }
                o.duration = Duration::from_secs_f64(secs);
            }
            "--clients" => {
                o.clients = value(&mut rest, &flag)?;
                if o.clients == 0 || o.clients > 4000 {
                    return Err(DemoError::Usage("--clients must be 1 to 4000".into()));
                }
            }
            "--rate" => {
                o.rate = value(&mut rest, &flag)?;
                if !(o.rate.is_finite() && o.rate > 0.0 && o.rate <= 10_000.0) {
                    return Err(DemoError::Usage("--rate must be in (0, 10000]".into()));
                }
            }
            "--runtime" => {
                let name: String = value(&mut rest, &flag)?;
                o.runtime = match name.as_str() {
                    "tokio" => RuntimeKind::Tokio,
                    "async-std" | "async_std" => RuntimeKind::AsyncStd,
                    "smol" => RuntimeKind::Smol,
                    _ => {
                        return Err(DemoError::Usage(format!(
                            "--runtime: {name:?} is not tokio, async-std or smol"
                        )))
                    }
                };
            }
            "--fault-rate" => {
                o.fault_rate = value(&mut rest, &flag)?;
                if !(o.fault_rate.is_finite() && (0.0..=20.0).contains(&o.fault_rate)) {
                    return Err(DemoError::Usage("--fault-rate must be 0 to 20".into()));
                }
            }
            "--black-holes" => {
                o.black_holes = value(&mut rest, &flag)?;
                if !(0.0..=1.0).contains(&o.black_holes) {
                    return Err(DemoError::Usage("--black-holes must be 0 to 1".into()));
                }
            }
            "--seed" => o.seed = value(&mut rest, &flag)?,
            "--nodes" => {
                o.nodes = value(&mut rest, &flag)?;
                if !(1..=16).contains(&o.nodes) {
                    return Err(DemoError::Usage("--nodes must be 1 to 16".into()));
                }
            }
            other => return Err(DemoError::Usage(format!("unknown option {other:?}"))),
        }
    }
    Ok(Some(o))
}

fn main() -> ExitCode {
    let options = match parse(std::env::args().skip(1)) {
        Ok(Some(o)) => o,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if options.nodes > 0 {
        return cluster_main(&options);
    }
    let result = match options.runtime {
        RuntimeKind::Tokio => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| DemoError::Setup(format!("cannot start tokio: {e}")))
            .and_then(|rt| {
                let handle: Arc<dyn Runtime> = Arc::new(
                    kitestring_tokio::TokioRuntime::with_handle(rt.handle().clone()),
                );
                rt.block_on(run(handle, options))
            }),
        RuntimeKind::AsyncStd => {
            async_std::task::block_on(run(kitestring_async_std::runtime(), options))
        }
        RuntimeKind::Smol => smol::block_on(run(kitestring_smol::runtime(), options)),
    };
    match result {
        Ok(report) if report.ok() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(rt: Arc<dyn Runtime>, o: Options) -> Result<Report, DemoError> {
    let timing = Timing::demo();
    println!(
        "kitestring demo on {}: {} clients, {} msg/s each way per client, {:.0} s of faults",
        o.runtime.name(),
        o.clients,
        o.rate,
        o.duration.as_secs_f64()
    );
    println!(
        "faults: {} per connection-second, {:.0} % black holes, seed {}",
        o.fault_rate,
        o.black_holes * 100.0,
        o.seed
    );
    println!("timing: {timing}");
    let settings = Settings {
        clients: o.clients,
        server: timing.server(),
        client: timing.client(),
        padding: 44,
        reconnect_failed: true,
        own_proxy: Vec::new(),
    };
    let harness = Harness::start(rt.clone(), settings, Duration::from_secs(20))
        .await
        .map_err(|e| DemoError::Setup(e.to_string()))?;
    println!(
        "server behind chaos proxy {}; all {} clients connected",
        harness.proxy.local_addr(),
        o.clients
    );

    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    harness.start_traffic(o.rate);
    let mut injector = FaultInjector::start(
        harness.proxy.clone(),
        FaultPlan {
            rate: o.fault_rate,
            black_hole_share: o.black_holes,
            seed: o.seed,
        },
    )
    .map_err(|e| DemoError::Setup(format!("cannot start the fault injector: {e}")))?;
    let counts = injector.counts();
    let status = |last_plain: &mut Instant, force: bool| {
        let line = status_line(
            start.elapsed(),
            &harness.ledger.totals(),
            counts.get(),
            harness.ledger.outstanding(),
        );
        let mut err = std::io::stderr().lock();
        if tty {
            let _ = write!(err, "\r{line}\x1b[K");
            let _ = err.flush();
        } else if force || last_plain.elapsed() >= Duration::from_secs(2) {
            let _ = writeln!(err, "{line}");
            *last_plain = Instant::now();
        }
    };
    let mut last_plain = Instant::now();
    while start.elapsed() < o.duration {
        kitestring::util::sleep(&*rt, Duration::from_millis(250)).await;
        status(&mut last_plain, false);
    }

    injector.stop();
    let stopped = harness.stop_traffic(Duration::from_secs(10)).await;
    if tty {
        eprintln!();
    }
    eprintln!(
        "faults stopped{}; draining (every message delivered or reported, at most 20 s)",
        if stopped {
            ""
        } else {
            " (some senders did not stop)"
        }
    );
    let drain_start = Instant::now();
    let mut drained = false;
    while drain_start.elapsed() < Duration::from_secs(20) {
        if harness.drain(Duration::from_millis(250)).await {
            drained = true;
            break;
        }
        status(&mut last_plain, false);
    }
    status(&mut last_plain, true);
    if tty {
        eprintln!();
    }
    let report = Report::collect(
        &harness.ledger,
        counts.get(),
        drained,
        drain_start.elapsed(),
    );
    harness.stop().await;
    println!();
    println!("{report}");
    Ok(report)
}

/// `--nodes N`: the cluster mode ([`kitestring_demo::cluster`]).
fn cluster_main(options: &Options) -> ExitCode {
    let node_bin = match std::env::current_exe() {
        Ok(p) => p.with_file_name(format!("kitestring-node{}", std::env::consts::EXE_SUFFIX)),
        Err(e) => {
            eprintln!("cannot find kitestring-node: {e}");
            return ExitCode::from(2);
        }
    };
    let settings = kitestring_demo::cluster::ClusterSettings {
        node_bin,
        nodes: options.nodes,
        clients: options.clients,
        rate: options.rate.min(200.0),
        duration: options.duration,
        seed: options.seed,
        node_timeout: Duration::from_secs(3),
    };
    println!(
        "kitestring-demo --nodes {}: {} clients, {}/s each, {:.0} s, seed {}",
        settings.nodes,
        settings.clients,
        settings.rate,
        settings.duration.as_secs_f64(),
        settings.seed
    );
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start tokio: {e}");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let report = rt.block_on(kitestring_demo::cluster::run(settings, |line| {
        println!("[{:5.1}s] {line}", started.elapsed().as_secs_f64());
    }));
    match report {
        Ok(r) => {
            println!("{}", r.lines());
            if r.lost == 0 && r.duplicated == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn parses_options() {
        let o = parse(args(
            "--duration 5 --clients=3 --runtime smol --fault-rate 0.5 --seed 9",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(o.duration, Duration::from_secs(5));
        assert_eq!(o.clients, 3);
        assert_eq!(o.runtime, RuntimeKind::Smol);
        assert_eq!(o.fault_rate, 0.5);
        assert_eq!(o.seed, 9);
        assert!(parse(args("--help")).unwrap().is_none());
        assert!(parse(args("--runtime glommio")).is_err());
        assert!(parse(args("--clients")).is_err());
        assert!(parse(args("--bogus")).is_err());
    }
}
