//! Kitestring benchmarks, each measured against a plain-tungstenite
//! baseline in the same run, reported as ratios; the peers scenarios
//! ([`peers`]) measure socketioxide and the Node.js socket.io server in the
//! same run too.
//!
//! ```text
//! cargo run --release -p kitestring-bench -- all            # every scenario
//! cargo run --release -p kitestring-bench -- core-cost      # one scenario
//! cargo run --release -p kitestring-bench -- compression    # bytes and CPU with and without compression
//! cargo run --release -p kitestring-bench -- dashboard      # latest values to 200 subscribers, one of them slow
//! cargo run --release -p kitestring-bench -- fallback       # the HTTP fallback against WebSocket
//! cargo run --release -p kitestring-bench -- cluster-fanout cluster-resume   # nodes sharing a Redis
//! cargo run --release -p kitestring-bench -- all --quick    # smoke run (CI)
//! cargo run --release -p kitestring-bench -- all --json out.json
//! cargo run --release -p kitestring-bench -- peers          # against socket.io and the floor
//! cargo run --release -p kitestring-bench -- browser-size browser-echo browser-connect   # the page package
//! ```
//!
//! Figures are never asserted: BENCHMARKS.md records them with the machine
//! and the date.

use std::process::{Command, ExitCode};
use std::time::Instant as StdInstant;

use kitestring_core::wire::Codec;

mod alloc;
mod browser;
mod child;
mod cluster;
mod compression;
mod connect;
mod core_cost;
mod dashboard;
mod echo;
mod fallback;
mod fleet;
mod net;
mod peers;

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

/// One figure: ours, the baseline's, and how they compare.
struct Figure {
    scenario: String,
    metric: &'static str,
    ours: f64,
    baseline: f64,
    /// Whether a bigger number is better (throughput) or worse (cost).
    higher_is_better: bool,
    target: Option<f64>,
    /// How ours is compared with the baseline.
    kind: Kind,
    /// For medians of repetitions: the spread behind them.
    range: Option<Range>,
    /// Why the figure cannot be trusted: a message lost, duplicated or
    /// out of order, a connection refused or dropped.
    failed: Option<Failure>,
}

/// A delivery check that failed.
struct Failure {
    why: String,
    /// Whether this repository's code failed it (Kitestring, or the floor
    /// it is measured against), which fails the run; another server's
    /// failure is reported the same way but is that server's behaviour.
    ours: bool,
}

/// The spread behind two medians: the least and greatest value of each
/// side over `runs` repetitions.
struct Range {
    ours: (f64, f64),
    baseline: (f64, f64),
    runs: usize,
}

/// How a figure is compared.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// ours / baseline, against the target.
    Ratio,
    /// ours - baseline, against the target (same unit as the figures).
    Difference,
    /// ours alone against the target; the baseline is for reference.
    Absolute,
}

impl Figure {
    /// The compared value: the ratio, the difference, or ours alone.
    fn ratio(&self) -> f64 {
        match self.kind {
            Kind::Difference => return self.ours - self.baseline,
            Kind::Absolute => return self.ours,
            Kind::Ratio => {}
        }
        if self.baseline == 0.0 {
            return f64::NAN;
        }
        self.ours / self.baseline
    }

    fn meets(&self) -> Option<bool> {
        let t = self.target?;
        let r = self.ratio();
        Some(if self.higher_is_better {
            r >= t
        } else {
            r <= t
        })
    }
}

struct Options {
    quick: bool,
    json: Option<String>,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // 10 000 connections take as many files on each side.
    net::raise_file_limit();
    if args.first().map(String::as_str) == Some("inner") {
        if args.get(1).map(String::as_str) == Some("server") {
            return child::run(&args[2..]);
        }
        return inner(&args[1..]);
    }
    let mut opts = Options {
        quick: false,
        json: None,
    };
    let mut scenarios = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--json" => match it.next() {
                Some(p) => opts.json = Some(p.clone()),
                None => return usage("--json needs a path"),
            },
            "all" => scenarios.extend(SCENARIOS.iter().map(|(n, _)| (*n).to_string())),
            "peers" => scenarios.extend(
                SCENARIOS
                    .iter()
                    .filter(|(n, _)| n.starts_with("peers-"))
                    .map(|(n, _)| (*n).to_string()),
            ),
            s if SCENARIOS.iter().any(|(n, _)| *n == s) => scenarios.push(s.to_string()),
            other => return usage(&format!("unknown argument `{other}`")),
        }
    }
    if scenarios.is_empty() {
        return usage("name a scenario or `all`");
    }
    let mut figures = Vec::new();
    for name in &scenarios {
        let Some((_, run)) = SCENARIOS.iter().find(|(n, _)| n == name) else {
            continue;
        };
        eprintln!("== {name}");
        figures.extend(run(&opts));
    }
    report(&figures);
    if let Some(path) = &opts.json {
        if let Err(e) = std::fs::write(path, to_json(&figures)) {
            eprintln!("writing {path}: {e}");
            return ExitCode::FAILURE;
        }
    }
    let failed: Vec<&Failure> = figures.iter().filter_map(|f| f.failed.as_ref()).collect();
    if !failed.is_empty() {
        eprintln!(
            "FAILED: {} row(s) rest on messages lost, duplicated or out of order, or \
             connections refused or dropped (see the rows)",
            failed.len()
        );
        if failed.iter().any(|f| f.ours) {
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

type Scenario = fn(&Options) -> Vec<Figure>;

const SCENARIOS: &[(&str, Scenario)] = &[
    ("core-cost", core_cost_scenario),
    ("compression", compression::scenario),
    ("dashboard", dashboard::scenario),
    ("throughput", echo::throughput_scenario),
    ("latency", echo::latency_scenario),
    ("idle", fleet::idle_scenario),
    ("fanout", fleet::fanout_scenario),
    ("storm", fleet::storm_scenario),
    ("churn", fleet::churn_scenario),
    ("axum-connect", connect::axum_connect_scenario),
    ("fallback", fallback::scenario),
    ("cluster-fanout", cluster::fanout_scenario),
    ("cluster-resume", cluster::resume_scenario),
    ("peers-idle", peers::idle_scenario),
    ("peers-fanout", peers::fanout_scenario),
    ("peers-echo", peers::echo_scenario),
    ("peers-echo-work", peers::echo_work_scenario),
    ("peers-connect", peers::connect_scenario),
    ("browser-size", browser::size_scenario),
    ("browser-echo", browser::echo_scenario),
    ("browser-connect", browser::connect_scenario),
];

fn usage(problem: &str) -> ExitCode {
    eprintln!("{problem}");
    eprintln!(
        "usage: kitestring-bench <all | peers | {}>... [--quick] [--json PATH]",
        SCENARIOS
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(" | ")
    );
    ExitCode::FAILURE
}

/// Runs one side of a scenario `n` times; used under callgrind.
fn inner(args: &[String]) -> ExitCode {
    let n: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let done = match args.first().map(String::as_str) {
        Some("core-msgpack") => core_cost::CorePair::new(Codec::MsgPack).run(n),
        Some("core-json") => core_cost::CorePair::new(Codec::Json).run(n),
        Some("tungstenite") => core_cost::TungPair::new().run(n),
        // `inner echo-ours|echo-base N [size] [connections] [mt]`: N
        // messages per connection (default 32 B, 1 connection) on one
        // thread, or on tokio's multi-threaded runtime with `mt`; for
        // profiling the socket path (callgrind, perf).
        Some(side @ ("echo-ours" | "echo-base")) => {
            let size = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(32);
            let conns = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
            let built = if args.get(4).map(String::as_str) == Some("mt") {
                tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()
            } else {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            };
            let Ok(rt) = built else {
                return ExitCode::FAILURE;
            };
            let window = match (conns, size > 1024) {
                (1, false) => 128,
                (1, true) => 32,
                (_, false) => 16,
                (_, true) => 4,
            };
            let load = echo::Load {
                conns,
                size,
                per_conn: n,
                window,
            };
            if side == "echo-ours" {
                rt.block_on(async {
                    echo::ours_throughput(kitestring_tokio::runtime(), load).await
                });
            } else {
                rt.block_on(echo::baseline_throughput(load));
            }
            n
        }
        _ => return ExitCode::FAILURE,
    };
    if done == n {
        ExitCode::SUCCESS
    } else {
        eprintln!("only {done} of {n} messages went through");
        ExitCode::FAILURE
    }
}

/// Instructions one run of `inner <what> <n>` executes, by callgrind.
fn callgrind(what: &str, n: u64) -> Option<u64> {
    let exe = std::env::current_exe().ok()?;
    let out = std::env::temp_dir().join(format!(
        "kitestring-callgrind-{}-{what}-{n}.out",
        std::process::id()
    ));
    let status = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(exe)
        .args(["inner", what, &n.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .ok()?;
    let text = std::fs::read_to_string(&out).ok();
    let _ = std::fs::remove_file(&out);
    if !status.success() {
        return None;
    }
    text?
        .lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Instructions per message: the difference between two run lengths cancels
/// process start-up and set-up.
fn instructions_per_message(what: &str, n1: u64, n2: u64) -> Option<f64> {
    let a = callgrind(what, n1)?;
    let b = callgrind(what, n2)?;
    Some(b.saturating_sub(a) as f64 / (n2 - n1) as f64)
}

fn time_per_message(mut run: impl FnMut(u64) -> u64, n: u64) -> f64 {
    run(n / 10);
    let t = StdInstant::now();
    run(n);
    t.elapsed().as_nanos() as f64 / n as f64
}

fn allocations_per_message(mut run: impl FnMut(u64) -> u64, n: u64) -> f64 {
    run(n / 5);
    alloc::start();
    let before = alloc::allocations();
    run(n);
    let counted = alloc::allocations() - before;
    alloc::stop();
    counted as f64 / n as f64
}

fn core_cost_scenario(opts: &Options) -> Vec<Figure> {
    let (n1, n2, timed) = if opts.quick {
        (200, 1_200, 5_000)
    } else {
        (2_000, 22_000, 200_000)
    };
    let mut figures = Vec::new();
    let base_instr = instructions_per_message("tungstenite", n1, n2);
    let mut tung = core_cost::TungPair::new();
    let base_ns = time_per_message(|n| tung.run(n), timed);
    let base_allocs = allocations_per_message(|n| tung.run(n), timed / 2);
    for (codec, name, target) in [(Codec::MsgPack, "msgpack", 1.5), (Codec::Json, "json", 2.5)] {
        let what = format!("core-{name}");
        let ours_instr = instructions_per_message(&what, n1, n2);
        let mut pair = core_cost::CorePair::new(codec);
        let ours_ns = time_per_message(|n| pair.run(n), timed);
        let ours_allocs = allocations_per_message(|n| pair.run(n), timed / 2);
        // The target applies to instruction counts; the timed figure
        // carries it only where callgrind is unavailable.
        let counted = ours_instr.is_some() && base_instr.is_some();
        match (ours_instr, base_instr) {
            (Some(o), Some(b)) => figures.push(Figure {
                scenario: format!("core cost, 32 B, {name}"),
                metric: "instructions/message (callgrind)",
                ours: o,
                baseline: b,
                higher_is_better: false,
                target: Some(target),
                kind: Kind::Ratio,
                range: None,
                failed: None,
            }),
            _ => eprintln!("valgrind unavailable: instruction counts skipped"),
        }
        figures.push(Figure {
            scenario: format!("core cost, 32 B, {name}"),
            metric: "ns/message (timed)",
            ours: ours_ns,
            baseline: base_ns,
            higher_is_better: false,
            target: (!counted).then_some(target),
            kind: Kind::Ratio,
            range: None,
            failed: None,
        });
        figures.push(Figure {
            scenario: format!("core cost, 32 B, {name}"),
            metric: "heap allocations/message",
            ours: ours_allocs,
            baseline: base_allocs,
            higher_is_better: false,
            target: None,
            kind: Kind::Ratio,
            range: None,
            failed: None,
        });
    }
    figures
}

fn report(figures: &[Figure]) {
    println!(
        "{:<34} {:<34} {:>14} {:>14} {:>8} {:>8}",
        "scenario", "metric", "kitestring", "baseline", "compare", "target"
    );
    for f in figures {
        let op = match (f.kind, f.higher_is_better) {
            (Kind::Ratio, true) => "x>=",
            (Kind::Ratio, false) => "x<=",
            (Kind::Difference, _) => "+<=",
            (Kind::Absolute, true) => ">=",
            (Kind::Absolute, false) => "<=",
        };
        let target = match (f.target, f.meets(), &f.failed) {
            (_, _, Some(_)) => "FAILED".into(),
            (Some(t), Some(true), _) => format!("{op}{t} ok"),
            (Some(t), _, _) => format!("{op}{t} MISS"),
            (None, _, _) => "-".into(),
        };
        println!(
            "{:<34} {:<34} {:>14.2} {:>14.2} {:>8.3} {:>8}",
            f.scenario,
            f.metric,
            f.ours,
            f.baseline,
            f.ratio(),
            target
        );
        if let Some(r) = &f.range {
            println!(
                "{:<34} {:<34} {:>14} {:>14}",
                "",
                format!("  range of {} runs", r.runs),
                format!("{:.2}-{:.2}", r.ours.0, r.ours.1),
                format!("{:.2}-{:.2}", r.baseline.0, r.baseline.1),
            );
        }
        if let Some(failure) = &f.failed {
            println!("  FAILED: {}", failure.why);
        }
    }
}

fn to_json(figures: &[Figure]) -> String {
    let rows: Vec<serde_json::Value> = figures
        .iter()
        .map(|f| {
            serde_json::json!({
                "scenario": f.scenario,
                "metric": f.metric,
                "ours": f.ours,
                "baseline": f.baseline,
                "compare": match f.kind {
                    Kind::Ratio => "ratio",
                    Kind::Difference => "difference",
                    Kind::Absolute => "absolute",
                },
                "ratio": f.ratio(),
                "higher_is_better": f.higher_is_better,
                "target": f.target,
                "meets_target": f.meets(),
                "ours_range": f.range.as_ref().map(|r| [r.ours.0, r.ours.1]),
                "baseline_range": f.range.as_ref().map(|r| [r.baseline.0, r.baseline.1]),
                "runs": f.range.as_ref().map(|r| r.runs),
                "failed": f.failed.as_ref().map(|x| &x.why),
            })
        })
        .collect();
    serde_json::to_string_pretty(&rows).unwrap_or_default()
}
