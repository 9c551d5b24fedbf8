//! Every tunable of the client and server machines, with the defaults the
//! field has converged on and a `validate` that turns contradictory
//! settings into an error at construction, not a misbehaviour at 3 a.m.
//!
//! The reliability and batching settings live here too (`reliable`
//! re-exports them): `reliable` imports this module, never the reverse.

use core::time::Duration;

use crate::backoff::BackoffConfig;
use crate::link::OWN_CAPS;
use crate::ratelimit::RateLimitConfig;
pub use crate::stream::HistoryConfig;
pub use crate::wire::CompressionConfig;
use crate::wire::{cap_name, CapName, Codec, SUPPORTED_VERSIONS};

/// Application-level heartbeat settings (the client's side).
#[derive(Clone, Debug, PartialEq)]
pub struct HeartbeatConfig {
    /// Time between pings. Default 20 s. The server's `welcome` overrides it.
    /// With the defaults a dead or half-open server is found within
    /// `interval + timeout + grace` = 31 s, idle or busy: every ping needs
    /// an answer (any frame), whatever data is flowing.
    pub interval: Duration,
    /// How long a ping may go unanswered before the peer is suspected dead.
    /// Default 10 s. The server's `welcome` overrides it.
    pub timeout: Duration,
    /// Extra time granted to an overdue liveness deadline so that frames
    /// already waiting in the socket (after a laptop wakes, say) are read
    /// before the peer is declared dead. Default 1 s.
    pub grace: Duration,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            interval: Duration::from_secs(20),
            timeout: Duration::from_secs(10),
            grace: Duration::from_secs(1),
        }
    }
}

/// Bounds on the queue of messages waiting to be sent.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueConfig {
    /// Most messages waiting. Default 100.
    pub max_messages: usize,
    /// Most payload bytes waiting. Default 1 MiB.
    pub max_bytes: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_messages: 100,
            max_bytes: 1 << 20,
        }
    }
}

/// What to do when both the send window and the waiting queue are full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OverflowPolicy {
    /// Refuse the new message with
    /// [`SendError::QueueFull`](crate::reliable::SendError::QueueFull);
    /// nothing already accepted is touched.
    Refuse,
    /// Give up the session: the machine reports every accepted message as
    /// unconfirmed or unsent and starts a fresh session.
    FailSession,
}

/// Reliable-delivery settings.
#[derive(Clone, Debug, PartialEq)]
pub struct ReliabilityConfig {
    /// Most messages sent and not yet acknowledged. Default 1024; 0 counts
    /// as 1.
    pub window_messages: usize,
    /// Most payload bytes sent and not yet acknowledged. Default 4 MiB; 0
    /// counts as 1. One message larger than this still goes out alone, or
    /// it could never be sent.
    pub window_bytes: usize,
    /// A receiver acknowledges on its own at the latest this long after a
    /// delivery (acks also ride on every outgoing message). Default 100 ms.
    pub ack_delay: Duration,
    /// A receiver acknowledges at once after this many unacknowledged
    /// deliveries. Default 32.
    pub ack_every: u32,
    /// Data waiting this long for an acknowledgment with none making
    /// progress (nothing acknowledged since the later of its sending and
    /// the last acknowledgment that released something) means the
    /// connection is stuck: it is closed (4010) and the session resumed on
    /// a new one. A slow link whose acknowledgments keep coming is never
    /// stuck. Default 45 s: longer than the heartbeat's 31 s, so a dead
    /// peer is found by the heartbeat, and this only catches a peer that
    /// answers pings but does not take data.
    pub ack_timeout: Duration,
    /// What happens when the window and the queue are both full.
    pub overflow: OverflowPolicy,
}

impl Default for ReliabilityConfig {
    fn default() -> Self {
        ReliabilityConfig {
            window_messages: 1024,
            window_bytes: 4 << 20,
            ack_delay: Duration::from_millis(100),
            ack_every: 32,
            ack_timeout: Duration::from_secs(45),
            overflow: OverflowPolicy::Refuse,
        }
    }
}

/// Batching settings: several small messages in one frame.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchConfig {
    /// How long the first message of a batch may wait for company. Default 5 ms.
    /// Zero: a message that finds nothing else unacknowledged goes out at
    /// once; those sent behind it wait until the machine's next timeout
    /// call, which the driver makes when it chooses (the browser's, at the
    /// end of the event loop's turn).
    pub window: Duration,
    /// A batch goes out at once when it holds this many messages. Default 64.
    pub max_messages: usize,
    /// A batch goes out at once when its payloads reach this many bytes.
    /// Default 64 KiB.
    pub max_bytes: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            window: Duration::from_millis(5),
            max_messages: 64,
            max_bytes: 64 * 1024,
        }
    }
}

/// Client machine settings.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientConfig {
    /// Reconnect backoff.
    pub backoff: BackoffConfig,
    /// Heartbeats.
    pub heartbeat: HeartbeatConfig,
    /// Time allowed from "open a transport" to a `welcome`; longer counts as a
    /// failed attempt. Default 10 s.
    pub connect_timeout: Duration,
    /// How long a connection must stay open before the attempt counter is
    /// reset. Shorter-lived connections count as failed attempts, so a server
    /// that accepts and drops at once cannot cause a tight loop. Default 10 s.
    pub stability_window: Duration,
    /// Lower bound on the reconnect delay after close code 1013 or 4429
    /// (try again later) when the server gave no `retry` hint. A 429 or 503
    /// on the upgrade without `Retry-After` backs off instead. Default 10 s.
    pub try_later_delay: Duration,
    /// Upper bound on any server-supplied retry-after hint. Default 5 min.
    pub max_retry_after: Duration,
    /// How long a local close waits for the transport to report closed.
    /// Default 5 s.
    pub close_timeout: Duration,
    /// Messages waiting to be sent (while not open, or while the window of
    /// unacknowledged messages is full).
    pub queue: QueueConfig,
    /// Sequencing, acknowledgment and retransmission.
    pub reliability: ReliabilityConfig,
    /// Largest incoming message accepted; larger ones are refused before
    /// decoding. Default 1 MiB.
    pub max_message_size: usize,
    /// Consecutive undecodable frames after which a `Resync` event tells the
    /// application to reload its full state. Default 3: the event fires on the
    /// fourth.
    pub max_decode_failures: u32,
    /// Codecs offered, preferred first. Must include JSON. Default
    /// `[MsgPack, Json]`.
    pub codecs: Vec<Codec>,
    /// Protocol versions offered. Default: every version this crate speaks.
    pub versions: Vec<u8>,
    /// Optional capabilities advertised in the hello.
    pub capabilities: Vec<String>,
    /// Take room messages as room streams (the `stream` capability,
    /// PROTOCOL.md section 3.4): one shared stream per room, recovered
    /// from the server's history after a reconnect. Default true. Off,
    /// room messages come through the session's own sequence, as for a
    /// client without stream support; kept for testing that path.
    pub room_streams: bool,
    /// Take a room's latest values as `lv` frames (the `latest`
    /// capability, PROTOCOL.md section 3.5): the newest value of each key,
    /// never a backlog. Default true. Off, each value comes as a room
    /// message in the session's own sequence, every one of them; kept for
    /// clients that want that and for testing it.
    pub latest_values: bool,
    /// Take the synced maps of the rooms this client is in (the `maps`
    /// capability, PROTOCOL.md section 3.6): a snapshot on every join and
    /// connection, then each change. Default true. Off, the server sends
    /// none; writes still go out.
    pub synced_maps: bool,
    /// Batch small messages into one frame when the server can receive
    /// batches. Default `None`: every message goes out at once.
    pub batch: Option<BatchConfig>,
    /// Updates sent with `send_latest` go out at most once per this interval
    /// per key, latest value winning. Default 1/60 s.
    pub coalesce_interval: Duration,
    /// Most keys `send_latest` tracks at once. Default 1024.
    pub coalesce_keys: usize,
    /// Most requests waiting for a response at once. Default 1024.
    pub max_pending_requests: usize,
    /// Whether the driver can fetch a fresh token. If so, an authentication
    /// failure (HTTP 401, close 4401) is retried once at once; if not, it is
    /// terminal.
    pub can_refresh_token: bool,
    /// Offer the `hello` in the HTTP upgrade request (PROTOCOL.md, section
    /// 4), so a connection is open after one round trip instead of two.
    /// Default `true`. A server that does not answer it gets the `hello` as
    /// the first frame, and the client stops offering it for the rest of its
    /// life (a proxy may strip the header).
    pub hello_in_upgrade: bool,
    /// Offer per-message compression (the `deflate` capability,
    /// PROTOCOL.md section 2.2); used in both directions when the server
    /// agrees. The settings are the client's as a sender: what it
    /// compresses. Default `None`: not offered. Without the core's
    /// `compression` feature it is never offered.
    pub compression: Option<CompressionConfig>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            backoff: BackoffConfig::default(),
            heartbeat: HeartbeatConfig::default(),
            connect_timeout: Duration::from_secs(10),
            stability_window: Duration::from_secs(10),
            try_later_delay: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(300),
            close_timeout: Duration::from_secs(5),
            queue: QueueConfig::default(),
            reliability: ReliabilityConfig::default(),
            max_message_size: 1 << 20,
            max_decode_failures: 3,
            codecs: vec![Codec::MsgPack, Codec::Json],
            versions: SUPPORTED_VERSIONS.to_vec(),
            capabilities: Vec::new(),
            room_streams: true,
            latest_values: true,
            synced_maps: true,
            batch: None,
            coalesce_interval: crate::coalesce::DEFAULT_INTERVAL,
            coalesce_keys: 1024,
            max_pending_requests: 1024,
            can_refresh_token: false,
            hello_in_upgrade: true,
            compression: None,
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A duration that must be positive is zero.
    #[error("`{0}` must be greater than zero")]
    Zero(&'static str),
    /// Two settings contradict each other.
    #[error("{0}")]
    Inconsistent(&'static str),
}

impl ClientConfig {
    /// Checks that the settings can work together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let b = &self.backoff;
        if b.base.is_zero() {
            return Err(ConfigError::Zero("backoff.base"));
        }
        if b.factor == 0 {
            return Err(ConfigError::Zero("backoff.factor"));
        }
        if b.max < b.base {
            return Err(ConfigError::Inconsistent(
                "backoff.max is below backoff.base",
            ));
        }
        if b.max_attempts == Some(0) {
            return Err(ConfigError::Zero("backoff.max_attempts"));
        }
        if self.heartbeat.interval.is_zero() {
            return Err(ConfigError::Zero("heartbeat.interval"));
        }
        if self.heartbeat.timeout.is_zero() {
            return Err(ConfigError::Zero("heartbeat.timeout"));
        }
        if self.connect_timeout.is_zero() {
            return Err(ConfigError::Zero("connect_timeout"));
        }
        if self.queue.max_messages == 0 {
            return Err(ConfigError::Zero("queue.max_messages"));
        }
        // The hello carries these and the client's own; a server takes at
        // most 32 names of 1 to 256 bytes.
        if self.hello_cap_names().count() > crate::wire::MAX_LIST_LEN {
            return Err(ConfigError::Inconsistent(
                "capabilities: the hello carries at most 32 names, the client's own included \
                 (up to six: batch, detach, stream, latest, maps, deflate)",
            ));
        }
        validate_compression(self.compression.as_ref())?;
        if self
            .capabilities
            .iter()
            .any(|c| c.is_empty() || c.len() > crate::wire::MAX_TOKEN_LEN)
        {
            return Err(ConfigError::Inconsistent(
                "capabilities: each name is 1 to 256 bytes",
            ));
        }
        validate_wire(self.max_message_size, &self.codecs, &self.versions)?;
        validate_reliability(&self.reliability)
    }

    /// The `caps` of this configuration's `hello`: the configured names,
    /// then the client's own that its settings turn on (PROTOCOL.md
    /// section 2). An own name in `capabilities` is decided by the
    /// settings, not kept as configured: a server would use what the
    /// `hello` offers.
    pub(crate) fn hello_caps(&self) -> Vec<CapName> {
        self.hello_cap_names()
            .map(|name| cap_name(name.into()))
            .collect()
    }

    /// The names of [`hello_caps`](Self::hello_caps), borrowed.
    fn hello_cap_names(&self) -> impl Iterator<Item = &str> {
        use crate::wire::{CAP_DEFLATE, CAP_LATEST, CAP_MAPS, CAP_STREAM};
        let offers = crate::wire::COMPRESSION_BUILT && self.compression.is_some();
        let own = OWN_CAPS.into_iter().filter(move |name| match *name {
            CAP_STREAM => self.room_streams,
            CAP_LATEST => self.latest_values,
            CAP_MAPS => self.synced_maps,
            _ => true,
        });
        self.capabilities
            .iter()
            .map(String::as_str)
            .filter(|c| !OWN_CAPS.contains(c) && *c != CAP_DEFLATE)
            .chain(own)
            .chain(offers.then_some(CAP_DEFLATE))
    }
}

/// The server's secret for resume keys (PROTOCOL.md, section 6): each
/// session's key is a keyed hash (SipHash-2-4, 128 bits) of its id under this
/// secret, so the server keeps no key per session and every process that
/// shares the secret can check a key. Its `Debug` form hides it.
///
/// The default (all zeros) makes keys computable by anyone who knows a
/// session's id: the driver draws a random secret when it is left at the
/// default. Set the same secret on every process that must resume the
/// same sessions.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ResumeSecret(pub [u8; 16]);

impl ResumeSecret {
    /// Whether this is the all-zero default, which must not be used where
    /// sessions are worth protecting.
    pub fn is_unset(&self) -> bool {
        self.0 == [0; 16]
    }
}

impl std::fmt::Debug for ResumeSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_unset() {
            "ResumeSecret(unset)"
        } else {
            "ResumeSecret(…)"
        })
    }
}

/// Server machine settings.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerConfig {
    /// Ping interval the server tells clients to use. Default 20 s (a dead
    /// server is found by its clients within 31 s with the defaults).
    pub ping_interval: Duration,
    /// Pong timeout the server tells clients to use. Default 10 s.
    pub pong_timeout: Duration,
    /// A connection that sends nothing for this long is dead. Must exceed
    /// `ping_interval`. Default 30 s: a client pings every 20 s, so a dead
    /// or half-open client is found within 31 s (with the grace), idle or
    /// busy.
    pub idle_timeout: Duration,
    /// Extra time for an overdue idle deadline (see [`HeartbeatConfig::grace`]).
    /// Default 1 s.
    pub grace: Duration,
    /// How far behind in time a member may read. A member whose connection
    /// has not read up to what the server wrote `max_lag` ago is a slow
    /// consumer: its connection is closed with 4009 and its session ended
    /// (`SessionEnd::SlowConsumer`), as when its buffers fill during a
    /// broadcast. Default `Some(30 s)`; `None` bounds members by counts
    /// only. Must not be zero.
    ///
    /// The server measures it with `ping`s that the client answers once it
    /// has read everything written before them (PROTOCOL.md, section 7),
    /// at most one outstanding per connection, sent at most every
    /// `max_lag / 4` and only to connections whose session is in a room or
    /// has messages in flight or queued. A connection falling ever further
    /// behind is therefore ended once it is between `max_lag` and
    /// `2¼ × max_lag` behind: the probe it does not answer in time went out
    /// a quarter of the bound after it answered the one before.
    ///
    /// A `ping` unanswered for `max_lag` ends the session only if the
    /// client was heard from since it was sent (its acknowledgments,
    /// messages, its own `ping`s every `ping_interval`) and is awake: heard
    /// within the last `max_lag / 2`, or else at its next frame. A client
    /// that sends nothing is the idle timeout's to find (`idle_timeout`,
    /// 4008, the session kept for a resume), never this bound's, however
    /// the two compare; and one heard again after a pause (a laptop waking)
    /// gets `max_lag` anew from then, so a sleeping laptop keeps its
    /// session. A member that sends nothing but its `ping`s (a room stream
    /// member: stream entries are not acknowledged) is heard every
    /// `ping_interval`: with `ping_interval` at most `max_lag / 2` it is
    /// ended at `max_lag` like any other, otherwise up to about one
    /// `max_lag` and one `ping_interval` later (a gap between its `ping`s
    /// may pass for a pause).
    pub max_lag: Option<Duration>,
    /// Time allowed between the transport opening and the client's `hello`.
    /// Default 10 s.
    pub hello_timeout: Duration,
    /// Largest incoming message accepted. Default 1 MiB.
    pub max_message_size: usize,
    /// Consecutive undecodable frames after which a connection is closed with
    /// 1007 (invalid payload). Default 3: the fourth closes it.
    pub max_decode_failures: u32,
    /// Codecs accepted, preferred first when the client has no preference
    /// the server shares. Must include JSON. Default `[MsgPack, Json]`.
    pub codecs: Vec<Codec>,
    /// Protocol versions accepted. Default: every version this crate speaks.
    pub versions: Vec<u8>,
    /// Optional features announced in the welcome.
    pub features: Vec<String>,
    /// Outbound messages waiting per session beyond the send window.
    pub queue: QueueConfig,
    /// Sequencing, acknowledgment and retransmission.
    pub reliability: ReliabilityConfig,
    /// Batch small messages into one frame for clients that can receive
    /// batches. Default `None`.
    pub batch: Option<BatchConfig>,
    /// How long a session outlives its connection, buffering outbound
    /// messages, so that a client can resume it. Default 60 s.
    pub session_grace: Duration,
    /// The secret resume keys are derived from. Default: unset (all
    /// zeros), which the driver replaces with a random secret.
    pub resume_secret: ResumeSecret,
    /// Per-connection limits on messages and bytes a client may send per
    /// second, with bursts; what happens beyond them is the limit's policy
    /// (push back by pausing reads, refuse by id, or close with 1008).
    /// Default: on, [`RateLimitConfig::default`] (1 000 messages and 4 MiB
    /// a second, throttled), which no interactive client meets. `None`
    /// turns flood protection off.
    pub rate_limit: Option<RateLimitConfig>,
    /// Most members in one room. Default 10 000.
    pub max_room_size: usize,
    /// How much of each room's stream is kept for members that were away
    /// (PROTOCOL.md, section 3.4). Default 1 024 entries and 4 MiB per
    /// room.
    pub history: HistoryConfig,
    /// Most rooms one session is in. Default 64.
    pub max_rooms_per_session: usize,
    /// Most latest values (keys) one room holds
    /// (`Server::broadcast_latest`, PROTOCOL.md section 3.5). Default 256.
    pub max_latest_keys: usize,
    /// Most synced maps open at once, over all rooms (`Server::open_map`,
    /// PROTOCOL.md section 3.6). Default 1 024.
    pub max_maps: usize,
    /// Whether a client's publish to a room is also delivered back to it.
    /// Default false.
    pub echo_publish: bool,
    /// Connections older than this are asked to reconnect (`goaway` 4011) and
    /// resume on a fresh connection, invisibly to the application; each
    /// connection's age limit is shortened by up to 10 % so a fleet does not
    /// rotate at once. Default `None`.
    pub max_connection_age: Option<Duration>,
    /// Most sessions held at once (connected or in their grace period).
    /// New connections beyond it are rejected with 1013. Default 100 000.
    pub max_sessions: usize,
    /// When a client's message is acknowledged. Default
    /// [`Acknowledge::OnReceipt`].
    pub acknowledge: Acknowledge,
    /// Agree to per-message compression with clients that offer it (the
    /// `deflate` capability, PROTOCOL.md section 2.2): both directions of
    /// such a connection then compress. The settings are the server's as
    /// a sender. Default `None`: never agreed. Without the core's
    /// `compression` feature it is never agreed.
    pub compression: Option<CompressionConfig>,
}

/// When the server acknowledges a client's message ([`ServerConfig::acknowledge`]).
///
/// An acknowledgment tells the client it may forget the message: it will
/// never send it again. What it promises depends on this setting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Acknowledge {
    /// When the message is handed to the application (queued as a
    /// `ServerEvent::Message`). The fastest; a server process that dies
    /// with messages still in its application's queue loses them, and
    /// they were acknowledged.
    #[default]
    OnReceipt,
    /// Only once the application says it has handled the message
    /// (`Server::handled`, through the message's `seq`). A process that
    /// dies before that leaves the message unacknowledged, so the client
    /// sends it again to the server it reaches next: nothing acknowledged
    /// is ever lost, and a message handled but not yet acknowledged
    /// arrives twice, with the same id. Messages the server handles
    /// itself (room joins, leaves and publishes, refusals) need no word
    /// from the application. Unhandled messages count against the
    /// client's send window, so an application that stops handling
    /// pushes back on its clients.
    AfterHandled,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            grace: Duration::from_secs(1),
            max_lag: Some(Duration::from_secs(30)),
            hello_timeout: Duration::from_secs(10),
            max_message_size: 1 << 20,
            max_decode_failures: 3,
            codecs: vec![Codec::MsgPack, Codec::Json],
            versions: SUPPORTED_VERSIONS.to_vec(),
            features: Vec::new(),
            queue: QueueConfig {
                max_messages: 1024,
                max_bytes: 1 << 20,
            },
            reliability: ReliabilityConfig::default(),
            batch: None,
            resume_secret: ResumeSecret::default(),
            rate_limit: Some(RateLimitConfig::default()),
            max_room_size: 10_000,
            history: HistoryConfig::default(),
            max_rooms_per_session: 64,
            max_latest_keys: 256,
            max_maps: 1024,
            echo_publish: false,
            max_connection_age: None,
            session_grace: Duration::from_secs(60),
            max_sessions: 100_000,
            acknowledge: Acknowledge::OnReceipt,
            compression: None,
        }
    }
}

impl ServerConfig {
    /// Checks that the settings can work together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.ping_interval.is_zero() {
            return Err(ConfigError::Zero("ping_interval"));
        }
        if self.pong_timeout.is_zero() {
            return Err(ConfigError::Zero("pong_timeout"));
        }
        if self.idle_timeout <= self.ping_interval {
            return Err(ConfigError::Inconsistent(
                "idle_timeout must exceed ping_interval, or healthy clients are cut",
            ));
        }
        if self.hello_timeout.is_zero() {
            return Err(ConfigError::Zero("hello_timeout"));
        }
        if self.max_lag.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::Zero("max_lag"));
        }
        validate_compression(self.compression.as_ref())?;
        validate_wire(self.max_message_size, &self.codecs, &self.versions)?;
        if self.queue.max_messages == 0 {
            return Err(ConfigError::Zero("queue.max_messages"));
        }
        if self.max_sessions == 0 {
            return Err(ConfigError::Zero("max_sessions"));
        }
        if let Some(r) = &self.rate_limit {
            if r.validate().is_err() {
                return Err(ConfigError::Zero("rate_limit rates and bursts"));
            }
            if r.policy != crate::ratelimit::RateLimitPolicy::Throttle
                && r.byte_burst < self.max_message_size as u64
            {
                return Err(ConfigError::Inconsistent(
                    "rate_limit.byte_burst is below max_message_size: the largest messages could never pass",
                ));
            }
        }
        validate_reliability(&self.reliability)
    }
}

/// Compression settings that can work: a level deflate has.
fn validate_compression(c: Option<&CompressionConfig>) -> Result<(), ConfigError> {
    match c.filter(|_| crate::wire::COMPRESSION_BUILT) {
        Some(c) if !(1..=9).contains(&c.level) => Err(ConfigError::Inconsistent(
            "compression.level: 1 (fastest) to 9 (smallest)",
        )),
        _ => Ok(()),
    }
}

/// What both sides must satisfy to hold a handshake at all.
fn validate_wire(
    max_message_size: usize,
    codecs: &[Codec],
    versions: &[u8],
) -> Result<(), ConfigError> {
    if max_message_size < 1024 {
        return Err(ConfigError::Inconsistent(
            "max_message_size is below 1024 bytes: handshakes would not fit",
        ));
    }
    if !codecs.contains(&Codec::Json) {
        return Err(ConfigError::Inconsistent("codecs must include JSON"));
    }
    if versions.is_empty() || versions.iter().any(|v| !SUPPORTED_VERSIONS.contains(v)) {
        return Err(ConfigError::Inconsistent(
            "versions must be a non-empty subset of SUPPORTED_VERSIONS",
        ));
    }
    Ok(())
}

fn validate_reliability(r: &ReliabilityConfig) -> Result<(), ConfigError> {
    if r.window_messages == 0 {
        return Err(ConfigError::Zero("reliability.window_messages"));
    }
    if r.ack_every == 0 {
        return Err(ConfigError::Zero("reliability.ack_every"));
    }
    if r.ack_timeout <= r.ack_delay {
        return Err(ConfigError::Inconsistent(
            "reliability.ack_timeout must exceed reliability.ack_delay",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn defaults_are_valid() {
        ClientConfig::default().validate().unwrap();
        ServerConfig::default().validate().unwrap();
    }

    #[test]
    fn contradictions_are_rejected() {
        let c = ClientConfig {
            codecs: vec![Codec::MsgPack],
            ..ClientConfig::default()
        };
        assert!(c.validate().is_err());
        let mut c = ClientConfig::default();
        c.backoff.max = Duration::from_millis(1);
        assert!(c.validate().is_err());
        let s = ServerConfig {
            idle_timeout: Duration::from_secs(20),
            ..ServerConfig::default()
        };
        assert!(s.validate().is_err());
        let s = ServerConfig {
            max_lag: Some(Duration::ZERO),
            ..ServerConfig::default()
        };
        assert_eq!(s.validate(), Err(ConfigError::Zero("max_lag")));
    }

    /// A hello a server would refuse is refused at construction instead:
    /// every configuration that validates sends a `hello` a server
    /// decodes, and the limit counts the client's own names as the
    /// settings turn them on.
    #[test]
    fn capabilities_fit_the_hello() {
        use crate::wire::{decode, encode, Frame, Hello, Limits};
        let caps = |n: usize, len: usize| ClientConfig {
            capabilities: (0..n).map(|i| format!("{i:0>len$}")).collect(),
            ..ClientConfig::default()
        };
        let decodes = |config: &ClientConfig| {
            let hello = Frame::Hello(Hello {
                versions: config.versions.clone(),
                client: crate::ids::ClientId([7; 16]),
                resume: None,
                caps: config.hello_caps(),
                codecs: config.codecs.clone(),
                join: Vec::new(),
            });
            let sent = encode(&hello, Codec::Json, 1).unwrap();
            let limits = Limits {
                max_message: 1 << 20,
                version: 1,
            };
            decode(sent.as_incoming(), &limits).map(|got| assert_eq!(got, hello))
        };
        // Own names: batch, detach, stream, latest and maps by default.
        let mut last_valid = None;
        for n in 0..=32 {
            let config = caps(n, 256);
            let valid = config.validate().is_ok();
            assert_eq!(valid, decodes(&config).is_ok(), "{n} names");
            if valid {
                last_valid = Some(n);
            }
        }
        assert_eq!(last_valid, Some(27));
        // Without room streams, latest values and maps, two own names.
        let few = |n| ClientConfig {
            room_streams: false,
            latest_values: false,
            synced_maps: false,
            ..caps(n, 8)
        };
        few(30).validate().unwrap();
        decodes(&few(30)).unwrap();
        assert!(few(31).validate().is_err());
        // An own name configured is not counted twice.
        let mut dup = caps(27, 8);
        dup.capabilities.push("batch".into());
        dup.validate().unwrap();
        assert_eq!(dup.hello_caps().iter().filter(|c| *c == "batch").count(), 1);
        assert!(caps(1, 257).validate().is_err());
        let empty = ClientConfig {
            capabilities: vec![String::new()],
            ..ClientConfig::default()
        };
        assert!(empty.validate().is_err());
    }
}
