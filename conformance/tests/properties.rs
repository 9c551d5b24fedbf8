//! Property suites: generated operation sequences against a reference model,
//! with the library's promises checked after every step.
//!
//! 1. Every message the API accepted is delivered to the other side's
//!    application exactly once and in order, in both directions, unless a
//!    session-lost event named it as unconfirmed or unsent. This holds
//!    through hand-overs too: every session exported from a server that
//!    goes away and imported into a new one (`Sim::hand_over`), or taken
//!    out and put back at any point (`Sim::bounce`), loses and duplicates
//!    nothing.
//! 2. Backoff: every retry delay lies within the configured bounds (never
//!    sooner than the base delay), attempts never exceed the maximum, and
//!    `Failed` comes only after the maximum.
//! 3. A black-holed peer is detected within ping interval + pong timeout +
//!    grace.
//! 4. Only transitions `State::can_become` allows, each reported with the
//!    right `old` state; on the server, every session moves only as
//!    `SessionState::can_become` allows (as its events report it) and
//!    `Server::session` agrees with the events; nothing panics.
//! 5. Every queue and window stays within its configured bound.
//! 6. With `Acknowledge::AfterHandled`, every acknowledgment a client
//!    receives covers only messages the server's application handled.
//!
//! `PROPTEST_CASES` sets the number of cases (256 by default); failures are
//! saved in `proptest-regressions/` and replayed first on every run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use kitestring_conformance::sim::{LinkConfig, Reachability, Sim};
use kitestring_core::client::{Event, State};
use kitestring_core::close::CloseCode;
use kitestring_core::config::{Acknowledge, ClientConfig, QueueConfig, ServerConfig};
use kitestring_core::reliable::{BatchConfig, MessageId, ReliabilityConfig};
use kitestring_core::server::{ServerEvent, SessionState};
use kitestring_core::wire::{Codec, Payload, SessionId};
use kitestring_core::Instant;

#[derive(Clone, Debug)]
enum Op {
    ClientSend {
        client: usize,
        count: u8,
    },
    ServerSend {
        client: usize,
        count: u8,
    },
    Advance {
        ms: u32,
    },
    Cut {
        client: usize,
    },
    CutAfter {
        client: usize,
        bytes: u16,
    },
    Blackhole {
        client: usize,
    },
    Restart {
        keep_sessions: bool,
    },
    Unreachable {
        secs: u16,
    },
    Reconnect {
        client: usize,
    },
    Duplicate {
        client: usize,
    },
    Drop {
        client: usize,
    },
    HandOver,
    Bounce {
        client: usize,
    },
    /// The application handles every message it was given so far.
    Handle,
}

fn op(clients: usize) -> impl Strategy<Value = Op> {
    let c = 0..clients;
    prop_oneof![
        6 => (c.clone(), 1u8..8).prop_map(|(client, count)| Op::ClientSend { client, count }),
        6 => (c.clone(), 1u8..8).prop_map(|(client, count)| Op::ServerSend { client, count }),
        6 => (1u32..90_000).prop_map(|ms| Op::Advance { ms }),
        2 => c.clone().prop_map(|client| Op::Cut { client }),
        2 => (c.clone(), 0u16..2000).prop_map(|(client, bytes)| Op::CutAfter { client, bytes }),
        2 => c.clone().prop_map(|client| Op::Blackhole { client }),
        1 => any::<bool>().prop_map(|keep_sessions| Op::Restart { keep_sessions }),
        1 => (1u16..400).prop_map(|secs| Op::Unreachable { secs }),
        1 => c.clone().prop_map(|client| Op::Reconnect { client }),
        2 => c.clone().prop_map(|client| Op::Duplicate { client }),
        2 => c.clone().prop_map(|client| Op::Drop { client }),
        1 => Just(Op::HandOver),
        1 => c.prop_map(|client| Op::Bounce { client }),
        4 => Just(Op::Handle),
    ]
}

#[derive(Clone, Debug)]
struct Setup {
    clients: usize,
    codec: Codec,
    batching: bool,
    small_buffers: bool,
    jitter_ms: u64,
    seed: u64,
    /// The server acknowledges only what the application handled.
    after_handled: bool,
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        1usize..=3,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        0u64..30,
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(
            |(clients, msgpack, batching, small_buffers, jitter_ms, seed, after_handled)| Setup {
                clients,
                codec: if msgpack { Codec::MsgPack } else { Codec::Json },
                batching,
                small_buffers,
                jitter_ms,
                seed,
                after_handled,
            },
        )
}

/// What the model knows: every accepted message, per client and direction,
/// by the counter carried in its payload.
#[derive(Default)]
struct Model {
    /// client -> (message id -> counter) accepted by the client.
    up_ids: Vec<BTreeMap<MessageId, u64>>,
    /// client -> counters accepted by the server for that client.
    down: Vec<Vec<u64>>,
    /// server message id -> (client, counter).
    down_ids: BTreeMap<MessageId, (usize, u64)>,
    next: u64,
    /// Per session: client messages the server's application was given and
    /// has not handled yet, (seq, client, counter).
    unhandled: BTreeMap<SessionId, Vec<(u64, usize, u64)>>,
    /// (client, counter) of every client message the application handled.
    handled: BTreeSet<(usize, u64)>,
    /// Client messages the application was given and had not handled when
    /// their session moved to another server: that server's application
    /// is given them again (same id), as PROTOCOL.md section 6 says.
    again: BTreeSet<(usize, u64)>,
    /// Server-accepted messages a `SessionEnded` reported unconfirmed.
    reported: BTreeSet<(usize, u64)>,
    /// Server-accepted messages that died with a server process restarted
    /// without its session store: nothing is left to report them.
    crashed: BTreeSet<(usize, u64)>,
    /// Black holes not yet resolved: client -> (when, transport count then).
    blackholed: BTreeMap<usize, Instant>,
}

struct Harness {
    sim: Sim,
    model: Model,
    cfg: ClientConfig,
    /// Per client: index of the next event to check for transitions.
    seen_events: Vec<usize>,
    last_state: Vec<State>,
    /// Every session the server reported and has not ended, as its events
    /// say, and the index of the next server event to check.
    sessions: BTreeMap<SessionId, SessionState>,
    /// Sessions exported and not yet imported, with how their last
    /// connection ended.
    moved: BTreeMap<SessionId, CloseCode>,
    seen_server_events: usize,
    /// `Setup::after_handled`.
    handled_mode: bool,
}

fn payload(client: usize, n: u64) -> Payload {
    Payload::binary(format!("{client}:{n}").into_bytes())
}

fn parse(p: &Payload) -> (usize, u64) {
    let s = std::str::from_utf8(p.data()).unwrap();
    let (c, n) = s.split_once(':').unwrap();
    (c.parse().unwrap(), n.parse().unwrap())
}

impl Harness {
    fn new(s: &Setup) -> Harness {
        let reliability = ReliabilityConfig {
            window_messages: if s.small_buffers { 4 } else { 1024 },
            ..ReliabilityConfig::default()
        };
        let queue = QueueConfig {
            max_messages: if s.small_buffers { 6 } else { 100 },
            max_bytes: 1 << 20,
        };
        let batch = s.batching.then(BatchConfig::default);
        let server = ServerConfig {
            codecs: vec![s.codec, Codec::Json],
            reliability: reliability.clone(),
            queue: queue.clone(),
            batch,
            acknowledge: if s.after_handled {
                Acknowledge::AfterHandled
            } else {
                Acknowledge::OnReceipt
            },
            ..ServerConfig::default()
        };
        let cfg = ClientConfig {
            codecs: vec![s.codec, Codec::Json],
            reliability,
            queue,
            batch,
            ..ClientConfig::default()
        };
        let link = LinkConfig {
            latency: Duration::from_millis(15),
            jitter: Duration::from_millis(s.jitter_ms),
            bandwidth: None,
        };
        let mut sim = Sim::new(server, link, s.seed);
        let mut model = Model::default();
        for i in 0..s.clients {
            sim.add_client(cfg.clone(), s.seed ^ (i as u64 + 1));
            model.up_ids.push(BTreeMap::new());
            model.down.push(Vec::new());
        }
        for i in 0..s.clients {
            sim.connect(i);
        }
        Harness {
            sim,
            model,
            cfg,
            seen_events: vec![0; s.clients],
            last_state: vec![State::Disconnected; s.clients],
            sessions: BTreeMap::new(),
            moved: BTreeMap::new(),
            seen_server_events: 0,
            handled_mode: s.after_handled,
        }
    }

    fn apply(&mut self, op: &Op) {
        let sim = &mut self.sim;
        match *op {
            Op::ClientSend { client, count } => {
                for _ in 0..count {
                    self.model.next += 1;
                    let n = self.model.next;
                    if let Ok(id) = sim.client_send(client, payload(client, n)) {
                        self.model.up_ids[client].insert(id, n);
                    }
                }
            }
            Op::ServerSend { client, count } => {
                let Some(session) = sim.session(client) else {
                    return;
                };
                for _ in 0..count {
                    self.model.next += 1;
                    let n = self.model.next;
                    if let Ok(id) = sim.server_send(session, payload(client, n)) {
                        self.model.down[client].push(n);
                        self.model.down_ids.insert(id, (client, n));
                    }
                }
            }
            Op::Advance { ms } => sim.run_for(Duration::from_millis(u64::from(ms))),
            Op::Cut { client } => sim.cut(client),
            Op::CutAfter { client, bytes } => sim.cut_after(client, u64::from(bytes)),
            Op::Blackhole { client } => {
                if sim.state(client) == &State::Open {
                    self.model.blackholed.entry(client).or_insert(sim.now);
                }
                sim.blackhole(client);
            }
            Op::Restart { keep_sessions } => {
                if !keep_sessions {
                    for (c, sent) in self.model.down.iter().enumerate() {
                        self.model.crashed.extend(sent.iter().map(|n| (c, *n)));
                    }
                }
                sim.restart_server(keep_sessions);
                if !keep_sessions {
                    // What the old server reported on its way down is
                    // checked against what it knew; the new one knows no
                    // session.
                    let _ = self.follow_server_sessions(false);
                    self.sessions.clear();
                }
            }
            Op::Unreachable { secs } => {
                sim.reachability = Reachability::Refused;
                sim.run_for(Duration::from_secs(u64::from(secs)));
                sim.reachability = Reachability::Up;
            }
            Op::Reconnect { client } => {
                let _ = sim.with_client(client, |c, now| c.reconnect(now));
            }
            Op::Duplicate { client } => sim.duplicate_next(client),
            Op::Drop { client } => sim.drop_next(client),
            Op::HandOver => {
                sim.hand_over();
            }
            Op::Bounce { client } => {
                sim.bounce(client);
            }
            Op::Handle => self.handle_all(),
        }
    }

    /// The application handles every message it was given: each session's
    /// up to its last.
    fn handle_all(&mut self) {
        let _ = self.follow_server_sessions(false);
        for (session, msgs) in std::mem::take(&mut self.model.unhandled) {
            let Some(&(last, _, _)) = msgs.last() else {
                continue;
            };
            self.model
                .handled
                .extend(msgs.iter().map(|&(_, c, n)| (c, n)));
            let _ = self.sim.with_server(|s, now| s.handled(now, session, last));
        }
    }

    /// Invariants that hold after every step.
    fn check_step(&mut self) -> Result<(), TestCaseError> {
        let grace = self.cfg.heartbeat.grace;
        let detect = Duration::from_secs(30) + Duration::from_secs(10) + grace;
        for i in 0..self.sim.peers.len() {
            // 4. Transitions.
            let events = &self.sim.peers[i].events;
            for (t, e) in &events[self.seen_events[i]..] {
                // 6. With `AfterHandled`, an acknowledgment covers only
                // messages the application handled.
                if let Event::Acked { first, last } = e {
                    if self.handled_mode {
                        for (_, n) in self.model.up_ids[i].range(*first..=*last) {
                            prop_assert!(
                                self.model.handled.contains(&(i, *n)),
                                "client {}: {} acknowledged, never handled",
                                i,
                                n
                            );
                        }
                    }
                }
                if let Event::StateChanged { old, new } = e {
                    prop_assert_eq!(
                        old,
                        &self.last_state[i],
                        "client {} reported a wrong old state",
                        i
                    );
                    prop_assert!(
                        old.can_become(new),
                        "client {}: illegal {:?} -> {:?}",
                        i,
                        old,
                        new
                    );
                    // 2. Backoff bounds.
                    if let State::Reconnecting { attempt, at, cause } = new {
                        let delay = at.saturating_duration_since(*t);
                        let (lo, hi) = self.cfg.backoff.bounds(*attempt);
                        prop_assert!(
                            lo <= delay && delay <= hi,
                            "client {}: retry {} after {:?} ({:?}), bounds {:?}..={:?}",
                            i,
                            attempt,
                            delay,
                            cause,
                            lo,
                            hi
                        );
                        prop_assert!(*attempt <= self.cfg.backoff.max_attempts.unwrap_or(u32::MAX));
                    }
                    if let State::Failed { .. } = new {
                        prop_assert!(
                            self.sim.peers[i].client.failures()
                                > self.cfg.backoff.max_attempts.unwrap_or(u32::MAX)
                        );
                    }
                    // 3. A black hole ends the open connection in time.
                    if *old == State::Open {
                        if let Some(since) = self.model.blackholed.remove(&i) {
                            let took = t.saturating_duration_since(since);
                            prop_assert!(
                                took <= detect,
                                "client {} found the black hole after {:?}",
                                i,
                                took
                            );
                        }
                    }
                    self.last_state[i] = new.clone();
                }
            }
            self.seen_events[i] = events.len();
            if let Some(since) = self.model.blackholed.get(&i) {
                prop_assert!(
                    self.sim.now.saturating_duration_since(*since) <= detect,
                    "client {} still open {:?} into a black hole",
                    i,
                    self.sim.now.saturating_duration_since(*since)
                );
            }
            // 5. Bounds.
            let c = &self.sim.peers[i].client;
            prop_assert!(c.queued().0 <= self.cfg.queue.max_messages);
            prop_assert!(c.unacknowledged().0 <= self.cfg.reliability.window_messages);
            if let Some(s) = self.sim.session(i).and_then(|s| self.sim.server.session(s)) {
                prop_assert!(s.in_flight <= self.cfg.reliability.window_messages);
                prop_assert!(s.queued <= self.cfg.queue.max_messages);
            }
        }
        // 4. Server session transitions.
        self.follow_server_sessions(true)?;
        // 1. (safety half) nothing twice, nothing out of order, nothing invented.
        self.check_delivery(false)
    }

    /// Follows the server's session events through the lifecycle table and,
    /// if `compare`, checks `Server::session` agrees with them.
    fn follow_server_sessions(&mut self, compare: bool) -> Result<(), TestCaseError> {
        let events = &self.sim.server_events[self.seen_server_events..];
        self.seen_server_events = self.sim.server_events.len();
        for (_, e) in events {
            match e {
                ServerEvent::SessionOpened {
                    connection,
                    session,
                    resumed,
                    ..
                } => {
                    let new = SessionState::Attached(*connection);
                    match self.sessions.insert(*session, new) {
                        Some(old) => {
                            prop_assert!(*resumed, "{session:?} opened twice");
                            prop_assert!(
                                old.can_become(&new),
                                "{session:?}: illegal {old:?} -> {new:?}"
                            );
                        }
                        None => prop_assert!(!resumed, "{session:?} resumed, never opened"),
                    }
                }
                ServerEvent::SessionDetached { session, code } => {
                    let new = SessionState::Detached {
                        code: *code,
                        expires_at: Instant::MAX,
                    };
                    let old = self.sessions.insert(*session, new);
                    prop_assert!(
                        old.is_some_and(|old| old.can_become(&new)),
                        "{session:?}: illegal {old:?} -> {new:?}"
                    );
                }
                ServerEvent::SessionEnded {
                    session,
                    unconfirmed,
                    ..
                } => {
                    let old = self.sessions.remove(session);
                    prop_assert!(old.is_some(), "{session:?} ended, never opened");
                    // Resolved now, before a new server process (after a
                    // restart or a hand-over) gives out the same ids again.
                    for id in unconfirmed {
                        if let Some(&(c, n)) = self.model.down_ids.get(id) {
                            self.model.reported.insert((c, n));
                        }
                    }
                }
                ServerEvent::Message { session, message } => {
                    let (c, n) = parse(&message.payload);
                    self.model
                        .unhandled
                        .entry(*session)
                        .or_default()
                        .push((message.seq, c, n));
                }
                ServerEvent::SessionMoved { session } => {
                    if let Some(msgs) = self.model.unhandled.remove(session) {
                        self.model
                            .again
                            .extend(msgs.iter().map(|&(_, c, n)| (c, n)));
                    }
                    // An attached session's connection is closed with 4011;
                    // a detached one keeps how its connection ended.
                    let code = match self.sessions.remove(session) {
                        Some(SessionState::Detached { code, .. }) => code,
                        Some(_) => CloseCode::ROTATE,
                        None => {
                            return Err(TestCaseError::fail(format!(
                                "{session:?} moved, never opened"
                            )))
                        }
                    };
                    self.moved.insert(*session, code);
                }
                ServerEvent::SessionArrived { session, .. } => {
                    let code = self.moved.remove(session);
                    prop_assert!(code.is_some(), "{session:?} arrived, never moved");
                    let new = SessionState::Detached {
                        code: code.unwrap_or(CloseCode::ROTATE),
                        expires_at: Instant::MAX,
                    };
                    let old = self.sessions.insert(*session, new);
                    prop_assert!(old.is_none(), "{session:?} arrived while here");
                }
                _ => {}
            }
        }
        if compare {
            for (id, state) in &self.sessions {
                let held = self.sim.server.session(*id).map(|i| i.state);
                let agrees = match (state, held) {
                    (SessionState::Attached(a), Some(SessionState::Attached(b))) => *a == b,
                    (
                        SessionState::Detached { code, .. },
                        Some(SessionState::Detached { code: held, .. }),
                    ) => *code == held,
                    _ => false,
                };
                prop_assert!(
                    agrees,
                    "{id:?}: events say {state:?}, server holds {held:?}"
                );
            }
        }
        Ok(())
    }

    fn check_delivery(&self, complete: bool) -> Result<(), TestCaseError> {
        let clients = self.sim.peers.len();
        let mut up_got: Vec<Vec<u64>> = vec![Vec::new(); clients];
        for (_, e) in &self.sim.server_events {
            if let ServerEvent::Message { message, .. } = e {
                let (c, n) = parse(&message.payload);
                // Given again after a move, unhandled: counted once.
                if self.model.again.contains(&(c, n)) && up_got[c].contains(&n) {
                    continue;
                }
                up_got[c].push(n);
            }
        }
        let down_lost: BTreeSet<(usize, u64)> = self
            .model
            .crashed
            .union(&self.model.reported)
            .copied()
            .collect();
        for (i, up_got) in up_got.iter().enumerate() {
            let mut down_got = Vec::new();
            let mut up_lost = BTreeSet::new();
            for (_, e) in &self.sim.peers[i].events {
                match e {
                    Event::Message(m) => {
                        let (c, n) = parse(&m.payload);
                        prop_assert_eq!(c, i, "message for client {} reached client {}", c, i);
                        down_got.push(n);
                    }
                    Event::SessionLost {
                        unconfirmed,
                        unsent,
                        ..
                    } => {
                        for id in unconfirmed.iter().chain(unsent) {
                            if let Some(n) = self.model.up_ids[i].get(id) {
                                up_lost.insert(*n);
                            }
                        }
                    }
                    _ => {}
                }
            }
            let up_sent: Vec<u64> = self.model.up_ids[i].values().copied().collect();
            check_stream("up", i, &up_sent, up_got, &up_lost, complete)?;
            let lost: BTreeSet<u64> = down_lost
                .iter()
                .filter(|(c, _)| *c == i)
                .map(|(_, n)| *n)
                .collect();
            check_stream("down", i, &self.model.down[i], &down_got, &lost, complete)?;
        }
        Ok(())
    }

    /// Heals the network and runs until everything settles, then checks
    /// that nothing was lost.
    fn heal_and_check(&mut self) -> Result<(), TestCaseError> {
        self.sim.heal();
        for _ in 0..4 {
            self.sim.run_for(Duration::from_secs(120));
            self.check_step()?;
            self.handle_all();
            for i in 0..self.sim.peers.len() {
                if matches!(self.sim.state(i), State::Failed { .. }) {
                    let _ = self.sim.with_client(i, |c, now| c.reconnect(now));
                }
            }
        }
        self.check_step()?;
        self.check_delivery(true)
    }
}

/// `got` must be an in-order subsequence of `sent` with no repeats; when
/// `complete`, every sent message not in `lost` must be in it.
fn check_stream(
    dir: &str,
    client: usize,
    sent: &[u64],
    got: &[u64],
    lost: &BTreeSet<u64>,
    complete: bool,
) -> Result<(), TestCaseError> {
    let sent_set: BTreeSet<u64> = sent.iter().copied().collect();
    for w in got.windows(2) {
        prop_assert!(
            w[0] < w[1],
            "{} client {}: {} delivered after {} (duplicate or reorder)",
            dir,
            client,
            w[1],
            w[0]
        );
    }
    for n in got {
        prop_assert!(
            sent_set.contains(n),
            "{} client {}: {} delivered but never accepted",
            dir,
            client,
            n
        );
    }
    if complete {
        let got_set: BTreeSet<u64> = got.iter().copied().collect();
        let missing: Vec<u64> = sent
            .iter()
            .copied()
            .filter(|n| !got_set.contains(n) && !lost.contains(n))
            .collect();
        prop_assert!(
            missing.is_empty(),
            "{} client {}: lost without a word: {:?}",
            dir,
            client,
            missing
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn promises_hold_under_faults(s in setup(), ops in prop::collection::vec(op(3), 1..40)) {
        let mut h = Harness::new(&s);
        for o in &ops {
            let o = match o.clone() {
                Op::ClientSend { client, count } => Op::ClientSend { client: client % s.clients, count },
                Op::ServerSend { client, count } => Op::ServerSend { client: client % s.clients, count },
                Op::Cut { client } => Op::Cut { client: client % s.clients },
                Op::CutAfter { client, bytes } => Op::CutAfter { client: client % s.clients, bytes },
                Op::Blackhole { client } => Op::Blackhole { client: client % s.clients },
                Op::Reconnect { client } => Op::Reconnect { client: client % s.clients },
                Op::Duplicate { client } => Op::Duplicate { client: client % s.clients },
                Op::Drop { client } => Op::Drop { client: client % s.clients },
                Op::Bounce { client } => Op::Bounce { client: client % s.clients },
                other => other,
            };
            h.apply(&o);
            h.check_step()?;
        }
        h.heal_and_check()?;
    }

    #[test]
    fn same_seed_same_run(s in setup(), ops in prop::collection::vec(op(3), 1..20)) {
        let run = || {
            let mut h = Harness::new(&s);
            for o in &ops {
                let o = match o.clone() {
                    Op::ClientSend { client, count } => Op::ClientSend { client: client % s.clients, count },
                    Op::ServerSend { client, count } => Op::ServerSend { client: client % s.clients, count },
                    Op::Cut { client } => Op::Cut { client: client % s.clients },
                    Op::CutAfter { client, bytes } => Op::CutAfter { client: client % s.clients, bytes },
                    Op::Blackhole { client } => Op::Blackhole { client: client % s.clients },
                    Op::Reconnect { client } => Op::Reconnect { client: client % s.clients },
                    Op::Duplicate { client } => Op::Duplicate { client: client % s.clients },
                    Op::Drop { client } => Op::Drop { client: client % s.clients },
                    Op::Bounce { client } => Op::Bounce { client: client % s.clients },
                    other => other,
                };
                h.apply(&o);
            }
            h.sim.peers.iter().map(|p| format!("{:?}", p.events)).collect::<Vec<_>>().join("\n")
                + &format!("{:?}", h.sim.server_events)
        };
        prop_assert_eq!(run(), run());
    }
}
