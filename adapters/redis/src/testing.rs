//! A private `redis-server` for tests and benchmarks: started on a free
//! loopback port in a temporary directory, with nothing saved to disk, and
//! stopped (and its directory removed) when dropped.
//!
//! It needs the `redis-server` binary (Debian: `apt-get install
//! redis-server`); the workspace's test script installs it.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server` of this process's own.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

/// Why a test Redis could not start.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot start redis-server: {}", self.0)
    }
}

impl std::error::Error for StartError {}

impl RedisServer {
    /// Starts one on a free port and waits until it answers. The port is
    /// free when chosen and may be taken before the server binds it (tests
    /// run in parallel): then another port is tried, up to five.
    pub fn start() -> Result<RedisServer, StartError> {
        let mut last = StartError("no attempt".into());
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| StartError(e.to_string()))?
                .port();
            let dir = std::env::temp_dir()
                .join(format!("kitestring-redis-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).map_err(|e| StartError(e.to_string()))?;
            let mut server = RedisServer {
                child: None,
                port,
                dir,
            };
            match server.spawn() {
                Ok(()) => return Ok(server),
                // Dropping it stops the child and removes its directory.
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn spawn(&mut self) -> Result<(), StartError> {
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(&bin)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                StartError(format!("{bin}: {e} (Debian: apt-get install redis-server)"))
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            // Exited: it could not bind the port (another process took it).
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(StartError(format!(
                    "it exited ({status}): port {} taken?",
                    self.port
                )));
            }
            // Whatever answers on the port must be this Redis: a `PING`
            // gets `+PONG`.
            if pong(self.port) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(StartError("it did not answer within 10 s".into()))
    }

    /// `redis://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills it (as a crash would) without removing its directory.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty (nothing was saved).
    pub fn restart(&mut self) -> Result<(), StartError> {
        self.kill();
        self.spawn()
    }
}

/// Whether a Redis answers `PING` on `port`.
fn pong(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut answer = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut answer).is_ok() && &answer == b"+PONG\r\n"
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
