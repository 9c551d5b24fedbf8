//! Shared pieces of the socket scenarios: runtimes, the baseline's
//! tungstenite settings, child processes, and /proc readings.

use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kitestring::{ClientEvents, ClientHandle, ClientOptions, Event, Runtime, State};
use tungstenite::protocol::WebSocketConfig;

/// Raises this process's soft limit on open files to its hard limit (the
/// machine caps files at 20 000 per process; 10 000 connections take as
/// many on each side). Child processes, node included, inherit it.
pub(crate) fn raise_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for getrlimit to fill and for
    // setrlimit to read.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// The largest message any scenario sends, with room to spare.
pub(crate) const MAX_MESSAGE: usize = 1 << 20;

/// A two-worker tokio runtime (the machine has two cores).
pub(crate) fn tokio_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Runs the future `run` makes on this thread, with a smol executor of
/// two threads for what it spawns, as [`tokio_runtime`] gives tokio two
/// workers (smol's global executor runs on one thread unless `SMOL_THREADS`
/// says otherwise).
pub(crate) fn smol_block_on<T, F: std::future::Future<Output = T>>(
    run: impl FnOnce(Arc<dyn Runtime>) -> F,
) -> T {
    let executor = Arc::new(smol::Executor::new());
    let (stop, stopped) = smol::channel::bounded::<()>(1);
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (executor, stopped) = (executor.clone(), stopped.clone());
            std::thread::spawn(move || {
                smol::block_on(executor.run(async move {
                    let _ = stopped.recv().await;
                }))
            })
        })
        .collect();
    let out = smol::block_on(run(kitestring_smol::runtime_on(executor)));
    drop(stop);
    for thread in threads {
        let _ = thread.join();
    }
    out
}

/// The baseline's tungstenite settings: exactly the driver's (4 KiB read
/// buffer, the same write buffer and size limits). The baseline sends with
/// `SinkExt::send`, which flushes every message, as hand-written loops do.
pub(crate) fn baseline_config() -> WebSocketConfig {
    kitestring::websocket_config(MAX_MESSAGE)
}

/// Destination address number `i` of a server bound to `0.0.0.0:port`:
/// connections are spread over 127.0.0.1 to 127.0.0.64 so that tens of
/// thousands of them (and their TIME_WAIT remains) never exhaust the
/// ephemeral ports of one address pair.
pub(crate) fn spread_host(i: usize) -> String {
    format!("127.0.0.{}", 1 + i % 64)
}

/// `ws://` URL number `i` for a server on `port`.
pub(crate) fn spread_url(i: usize, port: u16) -> String {
    format!("ws://{}:{port}/", spread_host(i))
}

/// Starts a Kitestring client and waits until its session is open.
pub(crate) async fn ours_connect(
    runtime: Arc<dyn Runtime>,
    url: &str,
    options: ClientOptions,
) -> (ClientHandle, ClientEvents) {
    let (handle, mut events) = kitestring::connect(runtime, url, options).expect("client");
    loop {
        match events.next().await {
            Some(Event::Connected { .. }) => return (handle, events),
            Some(Event::StateChanged {
                new: State::Failed { reason },
                ..
            }) => panic!("client failed: {reason:?}"),
            Some(_) => {}
            None => panic!("client stopped before connecting"),
        }
    }
}

/// The median of `v` (sorted in place); NaN when empty.
pub(crate) fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Percentile `p` (0 to 100) of sorted `v`.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p / 100.0).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// This bench binary run as a child: `inner <args>`, talking by lines on
/// its stdin and stdout.
pub(crate) struct Child {
    child: std::process::Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Child {
    pub(crate) fn spawn(args: &[&str]) -> Child {
        let exe = std::env::current_exe().expect("own executable");
        let mut child = Command::new(exe)
            .arg("inner")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("child stdout"));
        Child {
            child,
            stdin,
            stdout,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Writes one line to the child.
    pub(crate) fn send(&mut self, line: &str) {
        if let Some(stdin) = &mut self.stdin {
            let _ = writeln!(stdin, "{line}");
            let _ = stdin.flush();
        }
    }

    /// The child's next line (blocking); empty at end of output.
    pub(crate) fn line(&mut self) -> String {
        let mut s = String::new();
        let _ = self.stdout.read_line(&mut s);
        s.trim().to_owned()
    }

    /// The next line, from inside an async task on a multi-thread tokio
    /// runtime.
    pub(crate) fn line_async(&mut self) -> String {
        tokio::task::block_in_place(|| self.line())
    }

    /// Reads lines until one starts with `prefix`; returns the rest.
    pub(crate) fn expect(&mut self, prefix: &str) -> String {
        loop {
            let l = self.line();
            if let Some(rest) = l.strip_prefix(prefix) {
                return rest.trim().to_owned();
            }
            if l.is_empty() {
                panic!("child ended before `{prefix}`");
            }
        }
    }

    /// Resident memory of the child in KiB.
    pub(crate) fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    /// User plus system CPU time of the child, in seconds.
    pub(crate) fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid())
    }

    /// The child's CPU time to the nanosecond, as its threads' scheduler
    /// statistics count it (see [`thread_cpu_seconds`]).
    pub(crate) fn thread_cpu_seconds(&self) -> f64 {
        thread_cpu_seconds(self.pid())
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // End of stdin tells the child to exit; give it a moment, then kill it.
        self.stdin = None;
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// VmRSS of process `pid` in KiB.
pub(crate) fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of process `pid` in seconds (clock ticks of 1/100 s).
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at `) `.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 11 and 12 here.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i)?.parse::<u64>().ok())
        .sum();
    ticks as f64 / 100.0
}

/// The CPU time of process `pid`'s threads, summed from each one's
/// `/proc/<pid>/task/<tid>/schedstat` (nanoseconds on the CPU), for
/// measurements too short for the 10 ms ticks of [`cpu_seconds`]. Threads
/// that have exited no longer count, so this is for processes whose threads
/// live as long as they do (a tokio runtime's workers, node's threads);
/// [`cpu_seconds`] where the statistics are missing.
pub(crate) fn thread_cpu_seconds(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return cpu_seconds(pid);
    };
    let mut ns = 0u64;
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            return cpu_seconds(pid);
        };
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    ns as f64 / 1e9
}

/// The child side: a thread forwarding stdin lines into a channel; the
/// process exits when stdin ends (the parent dropped its [`Child`]).
pub(crate) fn stdin_lines() -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
        std::process::exit(0);
    });
    rx
}

/// The child side: writes one line to stdout and flushes it.
pub(crate) fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
