//! The books: what each side accepted for sending, what the other side
//! delivered, and what the library named as unconfirmed.
//!
//! Every message carries its stream's sequence number (one stream per
//! client and direction, numbered by the application, independent of the
//! library's own numbering). From the books alone, at the end:
//!
//! * **lost**: accepted by the API (`send` returned `Ok`), never delivered,
//!   and not named by a `SessionLost` / `SessionEnded` event;
//! * **duplicated**: delivered more than once;
//! * **out of order**: delivered after a later message of its stream.
//!
//! The ledger only records; it never decides what the library should have
//! done, so a library bug shows up here as a non-zero count.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kitestring::{CloseCode, MessageId, SessionId};

/// Which way a message travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
    /// Server to every member of a room (a broadcast).
    Room,
}

impl Direction {
    /// A short label for reports.
    pub fn label(self) -> &'static str {
        match self {
            Direction::Up => "client -> server",
            Direction::Down => "server -> client",
            Direction::Room => "room broadcast",
        }
    }
}

/// One client's messages in one direction.
#[derive(Debug, Default)]
struct Stream {
    /// Sequence numbers `0..accepted` were accepted by the sending API.
    accepted: u64,
    /// The library's id of every accepted message, to its sequence number.
    ids: HashMap<MessageId, u64>,
    /// Ids the library reported as unconfirmed or unsent.
    named: HashSet<MessageId>,
    /// Deliveries per sequence number.
    delivered: Vec<u32>,
    /// The highest sequence number delivered so far.
    last: Option<u64>,
    /// Deliveries of a number lower than one already delivered.
    out_of_order: u64,
}

impl Stream {
    fn named_seqs(&self) -> HashSet<u64> {
        self.named
            .iter()
            .filter_map(|id| self.ids.get(id).copied())
            .collect()
    }

    /// Accepted messages neither delivered nor named.
    fn outstanding(&self) -> u64 {
        let named = self.named_seqs();
        (0..self.accepted)
            .filter(|s| self.delivered_count(*s) == 0 && !named.contains(s))
            .count() as u64
    }

    fn delivered_count(&self, seq: u64) -> u32 {
        usize::try_from(seq)
            .ok()
            .and_then(|i| self.delivered.get(i))
            .copied()
            .unwrap_or(0)
    }
}

/// Per-client counters and the session the server knows it by.
#[derive(Debug, Default)]
struct ClientBook {
    up: Stream,
    down: Stream,
    room: Stream,
    session: Option<SessionId>,
    connects: u64,
    resumes: u64,
    new_sessions: u64,
    failed: u64,
}

/// Something that happened to a connection, with when.
#[derive(Clone, Debug, PartialEq)]
pub struct Incident {
    /// The client's index.
    pub client: usize,
    /// When it was recorded.
    pub at: Instant,
    /// What it was.
    pub kind: IncidentKind,
}

/// The kinds of [`Incident`].
#[derive(Clone, Debug, PartialEq)]
pub enum IncidentKind {
    /// The client started reconnecting; the cause as the library named it.
    Reconnecting(String),
    /// The client's heartbeat found the connection dead.
    HeartbeatTimeout,
    /// The server detached the session from its connection with this code.
    Detached(CloseCode),
    /// The client entered `Failed`.
    Failed(String),
    /// A session was given up (client `SessionLost` or server `SessionEnded`).
    SessionLost(String),
    /// The client received a message meant for this other client.
    Misrouted(usize),
}

#[derive(Debug, Default)]
struct Inner {
    clients: Vec<ClientBook>,
    by_session: HashMap<SessionId, usize>,
    latency_up: Vec<u32>,
    latency_down: Vec<u32>,
    latency_room: Vec<u32>,
    /// Members each broadcast was queued for, by broadcast number.
    broadcast_members: Vec<usize>,
    incidents: Vec<Incident>,
    refused_full: u64,
    sessions_lost: u64,
}

/// The shared books. Cheap to lock; every method is short.
#[derive(Debug)]
pub struct Ledger {
    origin: Instant,
    inner: Mutex<Inner>,
}

/// Totals for the status line and the report.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Totals {
    /// Messages accepted for sending, client to server.
    pub sent_up: u64,
    /// Messages accepted for sending, server to client.
    pub sent_down: u64,
    /// Deliveries, client to server (duplicates included).
    pub delivered_up: u64,
    /// Deliveries, server to client (duplicates included).
    pub delivered_down: u64,
    /// Connections opened after each client's first.
    pub reconnects: u64,
    /// Connections that resumed the previous session.
    pub resumes: u64,
    /// Sessions given up.
    pub sessions_lost: u64,
    /// Clients that entered `Failed` (counted each time).
    pub failed: u64,
    /// Sends refused with `QueueFull` (retried by the sender, not lost).
    pub refused_full: u64,
}

/// Per-direction delivery verdict.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verdict {
    /// Accepted by the sending API.
    pub accepted: u64,
    /// Distinct messages delivered.
    pub delivered: u64,
    /// Accepted, never delivered, not named by any event.
    pub lost: u64,
    /// Extra deliveries of a message already delivered.
    pub duplicated: u64,
    /// Deliveries that came after a later message of their stream.
    pub out_of_order: u64,
    /// Named unconfirmed or unsent by the library.
    pub named: u64,
    /// Of those named, how many arrived anyway.
    pub named_but_delivered: u64,
    /// Delivered with a sequence number that was never accepted (a bug in
    /// the books or the library; always expected to be zero).
    pub unexpected: u64,
    /// Clients with at least one lost message.
    pub clients_with_loss: Vec<usize>,
}

/// Latency percentiles from send to delivery.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Percentiles {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Largest.
    pub max: Duration,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // A panicking test thread cannot leave counters inconsistent: go on.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Ledger {
    /// Books for `clients` clients.
    pub fn new(clients: usize) -> Ledger {
        let mut inner = Inner::default();
        inner.clients.resize_with(clients, ClientBook::default);
        Ledger {
            origin: Instant::now(),
            inner: Mutex::new(inner),
        }
    }

    /// Microseconds since the ledger was created: the timestamp messages carry.
    pub fn stamp(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// The next sequence number to send on a stream.
    pub fn next_seq(&self, client: usize, dir: Direction) -> u64 {
        let g = lock(&self.inner);
        g.clients.get(client).map_or(0, |c| stream(c, dir).accepted)
    }

    /// The sending API accepted message `seq` with library id `id`.
    pub fn accepted(&self, client: usize, dir: Direction, seq: u64, id: MessageId) {
        let mut g = lock(&self.inner);
        if let Some(c) = g.clients.get_mut(client) {
            let s = stream_mut(c, dir);
            s.accepted = s.accepted.max(seq + 1);
            s.ids.insert(id, seq);
        }
    }

    /// Broadcast number `seq` was queued for `members` room members; every
    /// client is expected to get it (the scenarios put every client in the room).
    pub fn broadcast_accepted(&self, seq: u64, members: usize) {
        let mut g = lock(&self.inner);
        for c in &mut g.clients {
            c.room.accepted = c.room.accepted.max(seq + 1);
        }
        let Ok(i) = usize::try_from(seq) else { return };
        if g.broadcast_members.len() <= i {
            g.broadcast_members.resize(i + 1, 0);
        }
        g.broadcast_members[i] = members;
    }

    /// The number of the next broadcast.
    pub fn next_broadcast(&self) -> u64 {
        lock(&self.inner).broadcast_members.len() as u64
    }

    /// How many members each broadcast was queued for.
    pub fn broadcast_members(&self) -> Vec<usize> {
        lock(&self.inner).broadcast_members.clone()
    }

    /// A send was refused because the queue was full (it will be retried).
    pub fn refused_full(&self) {
        lock(&self.inner).refused_full += 1;
    }

    /// The receiving side delivered message `seq`, stamped `sent_us`.
    pub fn delivered(&self, client: usize, dir: Direction, seq: u64, sent_us: u64) {
        let now = self.stamp();
        let latency = u32::try_from(now.saturating_sub(sent_us)).unwrap_or(u32::MAX);
        let mut g = lock(&self.inner);
        match dir {
            Direction::Up => g.latency_up.push(latency),
            Direction::Down => g.latency_down.push(latency),
            Direction::Room => g.latency_room.push(latency),
        }
        let Some(c) = g.clients.get_mut(client) else {
            return;
        };
        let s = stream_mut(c, dir);
        let Ok(i) = usize::try_from(seq) else { return };
        if s.delivered.len() <= i {
            s.delivered.resize(i + 1, 0);
        }
        s.delivered[i] = s.delivered[i].saturating_add(1);
        match s.last {
            Some(last) if seq <= last => s.out_of_order += u64::from(seq < last),
            _ => s.last = Some(seq),
        }
    }

    /// The library named these ids of a stream as unconfirmed or unsent.
    pub fn named(&self, client: usize, dir: Direction, ids: &[MessageId]) {
        let mut g = lock(&self.inner);
        if let Some(c) = g.clients.get_mut(client) {
            stream_mut(c, dir).named.extend(ids.iter().copied());
        }
    }

    /// A session of `client` was given up (not by an orderly close).
    pub fn session_lost(&self, client: usize, why: String) {
        let mut g = lock(&self.inner);
        g.sessions_lost += 1;
        g.incidents.push(Incident {
            client,
            at: Instant::now(),
            kind: IncidentKind::SessionLost(why),
        });
    }

    /// A client's session opened (`resumed`: the previous one resumed).
    pub fn connected(&self, client: usize, resumed: bool) {
        let mut g = lock(&self.inner);
        if let Some(c) = g.clients.get_mut(client) {
            c.connects += 1;
            if resumed {
                c.resumes += 1;
            } else if c.connects > 1 {
                c.new_sessions += 1;
            }
        }
    }

    /// The server opened (or resumed) `session` for `client`.
    pub fn server_session(&self, client: usize, session: SessionId) {
        let mut g = lock(&self.inner);
        if let Some(c) = g.clients.get_mut(client) {
            c.session = Some(session);
        }
        g.by_session.insert(session, client);
    }

    /// The client a server session belongs to.
    pub fn client_of(&self, session: SessionId) -> Option<usize> {
        lock(&self.inner).by_session.get(&session).copied()
    }

    /// The server's current session for `client`, if it has one.
    pub fn session_of(&self, client: usize) -> Option<SessionId> {
        lock(&self.inner)
            .clients
            .get(client)
            .and_then(|c| c.session)
    }

    /// Forgets the server's session for `client` if it is still `session`.
    pub fn session_ended(&self, client: usize, session: SessionId) {
        let mut g = lock(&self.inner);
        if let Some(c) = g.clients.get_mut(client) {
            if c.session == Some(session) {
                c.session = None;
            }
        }
    }

    /// Records an incident.
    pub fn incident(&self, client: usize, kind: IncidentKind) {
        let mut g = lock(&self.inner);
        if let IncidentKind::Failed(_) = kind {
            if let Some(c) = g.clients.get_mut(client) {
                c.failed += 1;
            }
        }
        g.incidents.push(Incident {
            client,
            at: Instant::now(),
            kind,
        });
    }

    /// Every incident so far, in the order recorded.
    pub fn incidents(&self) -> Vec<Incident> {
        lock(&self.inner).incidents.clone()
    }

    /// How many times `client` connected (first connection included).
    pub fn connects(&self, client: usize) -> u64 {
        lock(&self.inner)
            .clients
            .get(client)
            .map_or(0, |c| c.connects)
    }

    /// How many of `client`'s connections resumed its session.
    pub fn resumes(&self, client: usize) -> u64 {
        lock(&self.inner)
            .clients
            .get(client)
            .map_or(0, |c| c.resumes)
    }

    /// Clients that have connected at least once.
    pub fn connected_clients(&self) -> usize {
        lock(&self.inner)
            .clients
            .iter()
            .filter(|c| c.connects > 0)
            .count()
    }

    /// Running totals.
    pub fn totals(&self) -> Totals {
        let g = lock(&self.inner);
        let mut t = Totals {
            sessions_lost: g.sessions_lost,
            refused_full: g.refused_full,
            ..Totals::default()
        };
        for c in &g.clients {
            t.sent_up += c.up.accepted;
            t.sent_down += c.down.accepted;
            t.delivered_up += c.up.delivered.iter().map(|&n| u64::from(n)).sum::<u64>();
            t.delivered_down += c.down.delivered.iter().map(|&n| u64::from(n)).sum::<u64>();
            t.reconnects += c.connects.saturating_sub(1);
            t.resumes += c.resumes;
            t.failed += c.failed;
        }
        t
    }

    /// Accepted messages, over every stream, neither delivered nor named yet.
    pub fn outstanding(&self) -> u64 {
        let g = lock(&self.inner);
        g.clients
            .iter()
            .map(|c| c.up.outstanding() + c.down.outstanding() + c.room.outstanding())
            .sum()
    }

    /// The verdict for one direction, over all clients (or only `only`).
    pub fn verdict(&self, dir: Direction, only: Option<&[usize]>) -> Verdict {
        let g = lock(&self.inner);
        let mut v = Verdict::default();
        for (i, c) in g.clients.iter().enumerate() {
            if only.is_some_and(|o| !o.contains(&i)) {
                continue;
            }
            let s = stream(c, dir);
            let named = s.named_seqs();
            let mut lost = 0;
            for seq in 0..s.accepted {
                let n = s.delivered_count(seq);
                let is_named = named.contains(&seq);
                if n > 0 {
                    v.delivered += 1;
                    if is_named {
                        v.named_but_delivered += 1;
                    }
                } else if !is_named {
                    lost += 1;
                }
            }
            v.accepted += s.accepted;
            v.lost += lost;
            if lost > 0 {
                v.clients_with_loss.push(i);
            }
            v.named += named.len() as u64;
            v.out_of_order += s.out_of_order;
            for (seq, &n) in s.delivered.iter().enumerate() {
                v.duplicated += u64::from(n.saturating_sub(1));
                if n > 0 && seq as u64 >= s.accepted {
                    v.unexpected += 1;
                }
            }
        }
        v
    }

    /// Send-to-delivery latency percentiles for one direction.
    pub fn latency(&self, dir: Direction) -> Percentiles {
        let mut samples = {
            let g = lock(&self.inner);
            match dir {
                Direction::Up => g.latency_up.clone(),
                Direction::Down => g.latency_down.clone(),
                Direction::Room => g.latency_room.clone(),
            }
        };
        samples.sort_unstable();
        let at = |q: f64| -> Duration {
            if samples.is_empty() {
                return Duration::ZERO;
            }
            let i = ((samples.len() - 1) as f64 * q).round() as usize;
            Duration::from_micros(u64::from(samples[i.min(samples.len() - 1)]))
        };
        Percentiles {
            count: samples.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

fn stream(c: &ClientBook, dir: Direction) -> &Stream {
    match dir {
        Direction::Up => &c.up,
        Direction::Down => &c.down,
        Direction::Room => &c.room,
    }
}

fn stream_mut(c: &mut ClientBook, dir: Direction) -> &mut Stream {
    match dir {
        Direction::Up => &mut c.up,
        Direction::Down => &mut c.down,
        Direction::Room => &mut c.room,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_run_has_no_loss() {
        let l = Ledger::new(1);
        for seq in 0..5 {
            l.accepted(0, Direction::Up, seq, MessageId(seq + 1));
            l.delivered(0, Direction::Up, seq, l.stamp());
        }
        let v = l.verdict(Direction::Up, None);
        assert_eq!(
            (v.accepted, v.delivered, v.lost, v.duplicated),
            (5, 5, 0, 0)
        );
        assert_eq!(l.outstanding(), 0);
        assert_eq!(l.latency(Direction::Up).count, 5);
    }

    #[test]
    fn missing_duplicate_and_reordered_messages_are_counted() {
        let l = Ledger::new(2);
        for seq in 0..6 {
            l.accepted(1, Direction::Down, seq, MessageId(100 + seq));
        }
        // 0, 2, 1 (out of order), 2 again (duplicate); 3 and 4 missing; 5 named.
        for seq in [0, 2, 1, 2] {
            l.delivered(1, Direction::Down, seq, 0);
        }
        l.named(1, Direction::Down, &[MessageId(105)]);
        let v = l.verdict(Direction::Down, None);
        assert_eq!(v.lost, 2, "{v:?}");
        assert_eq!(v.duplicated, 1);
        assert_eq!(v.out_of_order, 1, "1 after 2");
        assert_eq!(v.named, 1);
        assert_eq!(v.clients_with_loss, vec![1]);
        assert_eq!(l.outstanding(), 2);
        assert_eq!(l.verdict(Direction::Up, None), Verdict::default());
    }

    #[test]
    fn named_messages_are_not_lost_even_if_named_before_acceptance_was_booked() {
        let l = Ledger::new(1);
        l.named(0, Direction::Up, &[MessageId(7)]);
        l.session_lost(0, "race".into());
        l.accepted(0, Direction::Up, 0, MessageId(7));
        assert_eq!(l.verdict(Direction::Up, None).lost, 0);
        assert_eq!(l.totals().sessions_lost, 1);
    }

    #[test]
    fn a_delivery_never_accepted_is_unexpected() {
        let l = Ledger::new(1);
        l.delivered(0, Direction::Up, 3, 0);
        assert_eq!(l.verdict(Direction::Up, None).unexpected, 1);
    }
}
