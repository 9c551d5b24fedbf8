//! Kitestring under fire.
//!
//! The `kitestring-demo` binary starts a server, a chaos TCP proxy that cuts
//! and black-holes connections at random, and many clients exchanging
//! reliable messages with the server in both directions through it. At the
//! end it stops the faults, lets everything drain and counts what was lost
//! or duplicated (see [`ledger`] for the exact definitions).
//!
//! The pieces are a library so that the chaos end-to-end tests
//! (`conformance/chaos`) drive exactly the same harness on every runtime:
//!
//! * [`harness`]: server, proxy, clients and traffic, on any
//!   [`kitestring::Runtime`];
//! * [`ledger`]: the books, from which loss, duplication and order are judged;
//! * [`faults`]: random cuts and black holes that can be switched off;
//! * [`report`]: the status line and the final report;
//! * [`cluster`]: the cluster mode (`--nodes N`): node processes on a
//!   private Redis, with kills, graceful restarts and Redis cuts.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod cluster;
pub mod faults;
pub mod harness;
pub mod ledger;
pub mod report;

use std::time::Duration;

use kitestring::kitestring_core::backoff::Jitter;
use kitestring::{ClientConfig, ClientOptions, ServerConfig, ServerOptions};

/// Heartbeat and backoff settings short enough that a black hole is found
/// in about two seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    /// Server ping interval (clients adopt it from the welcome).
    pub ping: Duration,
    /// Pong timeout (clients adopt it too).
    pub pong_timeout: Duration,
    /// Liveness grace on both sides.
    pub grace: Duration,
    /// Server idle timeout: no frame for this long closes the connection.
    pub idle: Duration,
    /// First reconnect delay.
    pub backoff_base: Duration,
    /// Largest reconnect delay.
    pub backoff_cap: Duration,
    /// A connection open this long resets the failure count.
    pub stability: Duration,
    /// A detached session is kept this long for a resume.
    pub session_grace: Duration,
}

impl Timing {
    /// The demo's settings: ping 1 s, pong timeout 1 s, grace 250 ms, idle
    /// 3 s, backoff 100 ms doubling to 2 s, stability 1 s, session grace 30 s.
    pub fn demo() -> Timing {
        Timing {
            ping: Duration::from_secs(1),
            pong_timeout: Duration::from_secs(1),
            grace: Duration::from_millis(250),
            idle: Duration::from_secs(3),
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(2),
            stability: Duration::from_secs(1),
            session_grace: Duration::from_secs(30),
        }
    }

    /// Tighter settings for tests: ping 500 ms, pong timeout 500 ms, grace
    /// 200 ms, idle 2 s, backoff 50 ms to 500 ms.
    pub fn fast() -> Timing {
        Timing {
            ping: Duration::from_millis(500),
            pong_timeout: Duration::from_millis(500),
            grace: Duration::from_millis(200),
            idle: Duration::from_secs(2),
            backoff_base: Duration::from_millis(50),
            backoff_cap: Duration::from_millis(500),
            stability: Duration::from_millis(500),
            session_grace: Duration::from_secs(20),
        }
    }

    /// Server options with these timings.
    pub fn server(&self) -> ServerOptions {
        ServerOptions {
            config: ServerConfig {
                ping_interval: self.ping,
                pong_timeout: self.pong_timeout,
                idle_timeout: self.idle,
                grace: self.grace,
                session_grace: self.session_grace,
                ..ServerConfig::default()
            },
            close_timeout: Duration::from_millis(500),
            ..ServerOptions::default()
        }
    }

    /// Client options with these timings. The offline queue holds 1 000
    /// messages, so a client that is reconnecting keeps accepting sends for
    /// a while; reconnect attempts are unlimited (a client never gives up
    /// while faults keep coming).
    pub fn client(&self) -> ClientOptions {
        let mut config = ClientConfig::default();
        config.backoff.base = self.backoff_base;
        config.backoff.max = self.backoff_cap;
        config.backoff.jitter = Jitter::Full;
        config.backoff.max_attempts = None;
        config.heartbeat.interval = self.ping;
        config.heartbeat.timeout = self.pong_timeout;
        config.heartbeat.grace = self.grace;
        config.stability_window = self.stability;
        config.connect_timeout = Duration::from_secs(3);
        config.queue.max_messages = 1000;
        ClientOptions {
            config,
            close_timeout: Duration::from_millis(500),
            ..ClientOptions::default()
        }
    }
}

impl std::fmt::Display for Timing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_millis();
        write!(
            f,
            "ping {} ms, pong timeout {} ms, grace {} ms, idle {} ms, backoff {} ms to {} ms (full jitter), stability {} ms, session grace {} s",
            ms(self.ping),
            ms(self.pong_timeout),
            ms(self.grace),
            ms(self.idle),
            ms(self.backoff_base),
            ms(self.backoff_cap),
            ms(self.stability),
            self.session_grace.as_secs()
        )
    }
}
