//! A deterministic network for client and server machines.
//!
//! A virtual clock that jumps to the next thing that can happen (a delivery
//! or any machine's deadline), seeded links with latency and jitter that keep
//! each direction in order (as TCP does), and faults: cuts (optionally after
//! a given number of bytes, so a message can be lost mid-flight), half-open
//! links that silently stop delivering, slow links, refused or hanging
//! connects, and server restarts that keep or lose the session registry.
//! Same seed, same run: nothing here reads a clock or the OS.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use kitestring_core::client::{Client, Event, Output, State, TransportError, TransportId};
use kitestring_core::close::CloseCode;
use kitestring_core::config::{ClientConfig, ServerConfig};
use kitestring_core::reliable::{MessageId, SendError};
use kitestring_core::server::{
    ClusterOutput, ConnectionId, EntryOutcome, RoomError, RoomOp, Server, ServerEvent,
    ServerOutput, SessionImage, SharedEntry,
};

use crate::store::{ModelStore, Reply};
use kitestring_core::time::Instant;
use kitestring_core::wire::{ClientId, Payload, SessionId, Transmit};

use core::time::Duration;

/// Link behaviour.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// One-way delay of every message.
    pub latency: Duration,
    /// Extra random delay, uniform in `0..=jitter`; order is still kept.
    pub jitter: Duration,
    /// Bytes per second each direction carries; `None` is unlimited.
    pub bandwidth: Option<u64>,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            latency: Duration::from_millis(20),
            jitter: Duration::ZERO,
            bandwidth: None,
        }
    }
}

/// What happens to a new connection attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reachability {
    /// Accepted after the link latency.
    Up,
    /// Refused after the link latency (server process down).
    Refused,
    /// Never answered (network down): the client's connect timeout decides.
    Hang,
    /// The HTTP upgrade is answered with this status.
    Http(u16),
}

/// One simulated client and everything it reported.
pub struct Peer {
    /// The machine.
    pub client: Client,
    /// Every event, with the time it was drained.
    pub events: Vec<(Instant, Event)>,
    /// Human-readable record of every output, if recording.
    pub transcript: Vec<String>,
    /// Whether to record the transcript.
    pub record: bool,
    /// The identity the HTTP upgrade authenticates for this client.
    pub identity: Option<String>,
    link: Option<usize>,
}

#[derive(Debug)]
enum Ev {
    Opened(usize),
    ConnectFailed(usize, TransportError),
    ToServer(usize, Transmit),
    ToClient(usize, Transmit),
    ServerSeesClose(usize, Option<CloseCode>),
    ClientSeesClose(usize, Option<CloseCode>),
    /// Shared rooms: an operation reaches the store.
    Cluster(ClusterOutput),
    /// The store's answer reaches the server.
    Settled(ClusterOutput, Reply),
    /// An entry the store appended reaches the server.
    Entry(String, u64, SharedEntry),
    /// The server compares its rooms with the store's.
    Beat,
}

#[derive(Debug)]
struct Link {
    client: usize,
    tid: TransportId,
    conn: Option<ConnectionId>,
    /// The client side has let go (saw the close).
    client_gone: bool,
    /// The client asked to close: it sends nothing more.
    client_closing: bool,
    /// The server side has let go.
    server_gone: bool,
    blackhole: bool,
    /// Bytes each direction may still carry before the link is cut.
    cut_after: Option<u64>,
    /// Deliver the next message in each direction twice (a faulty middlebox).
    duplicate_next: [bool; 2],
    /// Silently drop the next message in each direction (a gap).
    drop_next: [bool; 2],
    c2s_free_at: Instant,
    s2c_free_at: Instant,
    c2s_last_at: Instant,
    s2c_last_at: Instant,
}

/// Client and server machines on a simulated network.
pub struct Sim {
    /// Virtual time.
    pub now: Instant,
    /// The server machine.
    pub server: Server,
    /// The clients.
    pub peers: Vec<Peer>,
    /// Every server event, with the time it was drained.
    pub server_events: Vec<(Instant, ServerEvent)>,
    /// Whether new connections reach the server.
    pub reachability: Reachability,
    /// Link behaviour for new deliveries.
    pub link: LinkConfig,
    server_config: ServerConfig,
    queue: BTreeMap<(Instant, u64), Ev>,
    seq: u64,
    links: Vec<Link>,
    by_conn: HashMap<ConnectionId, usize>,
    rng: u64,
    fresh: u64,
    steps: u64,
    /// Shared rooms ([`Sim::share_rooms`]): the store.
    pub store: Option<ModelStore>,
    /// Entries the store appends next that never reach the server (a
    /// lost notification: the server fills the gap from the log).
    pub drop_entries: u32,
}

impl Sim {
    /// A server and no clients. `seed` drives latency jitter and session ids.
    pub fn new(server_config: ServerConfig, link: LinkConfig, seed: u64) -> Sim {
        let server = match Server::new(server_config.clone()) {
            Ok(s) => s,
            Err(e) => panic!("invalid server config: {e}"),
        };
        Sim {
            now: Instant::ZERO,
            server,
            peers: Vec::new(),
            server_events: Vec::new(),
            reachability: Reachability::Up,
            link,
            server_config,
            queue: BTreeMap::new(),
            seq: 0,
            links: Vec::new(),
            by_conn: HashMap::new(),
            rng: seed ^ 0x5EED_0FC0_FFEE,
            fresh: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            steps: 0,
            store: None,
            drop_entries: 0,
        }
    }

    /// Shares the server's rooms through a model store, as a cluster's
    /// servers do (`kitestring::Backplane`): its room operations go to the
    /// store one latency away, and entries come back numbered. Call before
    /// the first client connects.
    pub fn share_rooms(&mut self) {
        self.server.set_shared_rooms(true);
        self.store = Some(ModelStore::new(self.server_config.history.max_entries));
        let at = self.now + Duration::from_secs(1);
        self.schedule(at, Ev::Beat);
    }

    /// Opens the server's copy of `room` from the store (after `after`).
    fn open_room(&mut self, room: &str, after: u64) {
        let now = self.now;
        let Some(store) = self.store.as_mut() else {
            return;
        };
        let (epoch, last, entries) = store.read(room, after);
        self.server.room_open(now, room, epoch, last, entries);
    }

    /// After a session is imported: its memberships recorded as held
    /// here, as a driver does.
    fn adopt(&mut self, session: SessionId) {
        self.adopt_after(session, Duration::ZERO);
    }

    /// [`adopt`](Self::adopt), the store answering only after `delay`.
    fn adopt_after(&mut self, session: SessionId, delay: Duration) {
        if self.store.is_none() {
            return;
        }
        let Some(member) = self.server.member(session) else {
            return;
        };
        let at = self.now + self.link.latency + delay;
        for room in self.server.rooms_of(session) {
            let presence = self.server.room_presence(&room);
            let join = ClusterOutput::Join {
                room,
                session,
                member: member.clone(),
                presence,
                max_members: self.server_config.max_room_size,
                origin: None,
            };
            self.schedule(at, Ev::Cluster(join));
        }
    }

    /// Whether any session's room operation waits for the store.
    fn room_ops_pending(&self) -> bool {
        self.server
            .session_ids()
            .into_iter()
            .any(|s| self.server.room_ops_pending(s))
    }

    /// Adds a client (not yet connected); returns its index.
    pub fn add_client(&mut self, config: ClientConfig, seed: u64) -> usize {
        let i = self.peers.len();
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
        id[8..].copy_from_slice(&seed.to_be_bytes());
        let client = match Client::new(config, ClientId(id), seed) {
            Ok(c) => c,
            Err(e) => panic!("invalid client config: {e}"),
        };
        self.peers.push(Peer {
            client,
            events: Vec::new(),
            transcript: Vec::new(),
            record: false,
            identity: None,
            link: None,
        });
        i
    }

    /// Starts client `i` connecting.
    pub fn connect(&mut self, i: usize) {
        let now = self.now;
        if let Err(e) = self.peers[i].client.connect(now) {
            panic!("connect: {e}");
        }
        self.pump();
    }

    /// Queues a message on client `i`.
    pub fn client_send(&mut self, i: usize, payload: Payload) -> Result<MessageId, SendError> {
        let now = self.now;
        let r = self.peers[i].client.send(now, payload);
        self.pump();
        r
    }

    /// Queues a message from the server to a session.
    pub fn server_send(
        &mut self,
        session: SessionId,
        payload: Payload,
    ) -> Result<MessageId, SendError> {
        let now = self.now;
        let r = self.server.send(now, session, payload);
        self.pump();
        r
    }

    /// Closes client `i` locally.
    pub fn close(&mut self, i: usize) {
        let now = self.now;
        let _ = self.peers[i].client.close(now);
        self.pump();
    }

    /// Runs any command on client `i`, then carries out its outputs.
    pub fn with_client<R>(&mut self, i: usize, f: impl FnOnce(&mut Client, Instant) -> R) -> R {
        let now = self.now;
        let r = f(&mut self.peers[i].client, now);
        self.pump();
        r
    }

    /// Runs any command on the server, then carries out its outputs.
    pub fn with_server<R>(&mut self, f: impl FnOnce(&mut Server, Instant) -> R) -> R {
        let now = self.now;
        let r = f(&mut self.server, now);
        self.pump();
        r
    }

    /// Cuts client `i`'s current connection: both ends see an abnormal close
    /// (1006) now, and whatever was in flight is lost.
    pub fn cut(&mut self, i: usize) {
        if let Some(l) = self.peers[i].link {
            self.kill_link(l);
        }
        self.pump();
    }

    /// Cuts client `i`'s connection once each direction has carried `bytes`
    /// more bytes: a message that would straddle the limit is lost.
    pub fn cut_after(&mut self, i: usize, bytes: u64) {
        if let Some(l) = self.peers[i].link {
            self.links[l].cut_after = Some(bytes);
        }
    }

    /// Delivers the next message in each direction of client `i`'s
    /// connection twice. TCP never does this; a faulty proxy might, and it
    /// is how the receivers' de-duplication is exercised.
    pub fn duplicate_next(&mut self, i: usize) {
        if let Some(l) = self.peers[i].link {
            self.links[l].duplicate_next = [true; 2];
        }
    }

    /// Silently drops the next message in each direction of client `i`'s
    /// connection, leaving a gap the receivers must detect and have replayed.
    pub fn drop_next(&mut self, i: usize) {
        if let Some(l) = self.peers[i].link {
            self.links[l].drop_next = [true; 2];
        }
    }

    /// Silently drops the next message client `i` sends, and nothing the
    /// server sends: a message lost on a link that otherwise works.
    pub fn drop_next_from_client(&mut self, i: usize) {
        if let Some(l) = self.peers[i].link {
            self.links[l].drop_next[0] = true;
        }
    }

    /// Clears every fault still waiting to happen (byte budgets before a
    /// cut, duplications, drops) and makes the server reachable. Links
    /// already black-holed stay so: the heartbeat finds them.
    pub fn heal(&mut self) {
        self.reachability = Reachability::Up;
        for link in &mut self.links {
            link.cut_after = None;
            link.duplicate_next = [false; 2];
            link.drop_next = [false; 2];
        }
    }

    /// Makes client `i`'s current connection half-open: it stays up at both
    /// ends but silently delivers nothing more, either way.
    pub fn blackhole(&mut self, i: usize) {
        if let Some(l) = self.peers[i].link {
            self.links[l].blackhole = true;
        }
    }

    /// Restarts the server: every connection dies. With `keep_sessions`, the
    /// registry survives (as if stored outside the process); without, the new
    /// server knows no session.
    pub fn restart_server(&mut self, keep_sessions: bool) {
        let live: Vec<usize> = (0..self.links.len())
            .filter(|&l| !self.links[l].client_gone || !self.links[l].server_gone)
            .collect();
        for l in live {
            self.kill_link(l);
        }
        if !keep_sessions {
            self.drain_server();
            self.server = match Server::new(self.server_config.clone()) {
                Ok(s) => s,
                Err(e) => panic!("invalid server config: {e}"),
            };
            self.server.set_shared_rooms(self.store.is_some());
            self.by_conn.clear();
            for link in &mut self.links {
                link.server_gone = true;
            }
        }
        self.pump();
    }

    /// A deploy: the server exports every session, writes what it had
    /// queued and closes its connections (4011), and goes away; a new
    /// server process (same configuration and resume secret) imports every
    /// image, each carried through JSON as a backplane would store it.
    /// Returns how many sessions moved.
    pub fn hand_over(&mut self) -> usize {
        self.hand_over_with(true)
    }

    /// [`hand_over`](Self::hand_over) into a server that could not open
    /// the sessions' shared rooms first (its store did not answer in
    /// time): their copies are opened when the store's answers come.
    pub fn hand_over_unopened(&mut self) -> usize {
        self.hand_over_with(false)
    }

    fn hand_over_with(&mut self, open_rooms: bool) -> usize {
        // Room operations on their way first, as a driver waits for them.
        self.run_while(Duration::from_secs(5), |sim| sim.room_ops_pending());
        let now = self.now;
        let images: Vec<String> = self
            .server
            .session_ids()
            .into_iter()
            .filter_map(|s| self.server.export_session(now, s))
            .map(|image| serde_json::to_string(&image).expect("an image serializes"))
            .collect();
        self.pump();
        self.restart_server(false);
        for json in &images {
            let image: SessionImage = serde_json::from_str(json).expect("an image reads back");
            let rooms: Vec<String> = image.rooms().map(str::to_owned).collect();
            for room in rooms.iter().filter(|_| open_rooms) {
                if self.server.room_position(room).is_none() {
                    self.open_room(room, 0);
                }
            }
            if let Err(e) = self.server.import_session(now, &image) {
                panic!("the new server refused a session the old one exported: {e}");
            }
            if let Some(session) = image.session() {
                // A store that did not answer in time answers later: the
                // clients are back before their rooms are opened.
                let delay = if open_rooms {
                    Duration::ZERO
                } else {
                    Duration::from_millis(500 + self.rand() % 2500)
                };
                self.adopt_after(session, delay);
            }
        }
        self.pump();
        images.len()
    }

    /// One session taken out of the server and put back into it, through
    /// JSON: its connection, if any, closes (4011) and its client resumes.
    pub fn bounce(&mut self, i: usize) -> bool {
        let now = self.now;
        let Some(session) = self.session(i) else {
            return false;
        };
        if self.server.room_ops_pending(session) {
            return false; // a driver waits for them
        }
        let Some(image) = self.server.export_session(now, session) else {
            return false;
        };
        let json = serde_json::to_string(&image).expect("an image serializes");
        self.pump();
        let image: SessionImage = serde_json::from_str(&json).expect("an image reads back");
        let rooms: Vec<String> = image.rooms().map(str::to_owned).collect();
        for room in rooms {
            if self.server.room_position(&room).is_none() {
                self.open_room(&room, 0);
            }
        }
        if let Err(e) = self.server.import_session(self.now, &image) {
            panic!("the server refused a session it exported: {e}");
        }
        self.adopt(session);
        self.pump();
        true
    }

    /// The session client `i` holds, if any.
    pub fn session(&self, i: usize) -> Option<SessionId> {
        self.peers[i].client.session()
    }

    /// Client `i`'s state.
    pub fn state(&self, i: usize) -> &State {
        self.peers[i].client.state()
    }

    /// Runs until `until` (virtual time), processing everything due.
    pub fn run_until(&mut self, until: Instant) {
        self.pump();
        while let Some(next) = self.next_time() {
            if next > until {
                break;
            }
            self.step_to(next);
        }
        if until > self.now {
            self.now = until;
        }
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    /// Runs until `cond` holds or `limit` of virtual time passes; returns
    /// whether it held.
    pub fn run_while(&mut self, limit: Duration, mut cond: impl FnMut(&Sim) -> bool) -> bool {
        let until = self.now + limit;
        self.pump();
        loop {
            if !cond(self) {
                return true;
            }
            match self.next_time() {
                Some(next) if next <= until => self.step_to(next),
                _ => {
                    self.now = until.max(self.now);
                    return !cond(self);
                }
            }
        }
    }

    /// Steps taken so far (each is one jump of the clock).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The next instant at which anything happens.
    pub fn next_time(&self) -> Option<Instant> {
        let mut t = self.queue.keys().next().map(|(at, _)| *at);
        let mut consider = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        consider(self.server.poll_timeout().map(|d| d.at));
        for p in &self.peers {
            consider(p.client.poll_timeout().map(|d| d.at));
        }
        t
    }

    fn step_to(&mut self, at: Instant) {
        self.steps += 1;
        if at > self.now {
            self.now = at;
        }
        let now = self.now;
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ev = entry.remove();
            self.deliver(ev);
            self.pump();
        }
        if self.server.poll_timeout().is_some_and(|d| d.at <= now) {
            self.server.handle_timeout(now);
            self.pump();
        }
        for i in 0..self.peers.len() {
            if self.peers[i]
                .client
                .poll_timeout()
                .is_some_and(|d| d.at <= now)
            {
                self.peers[i].client.handle_timeout(now);
                self.pump();
            }
        }
    }

    fn schedule(&mut self, at: Instant, ev: Ev) {
        self.seq += 1;
        self.queue.insert((at, self.seq), ev);
    }

    fn rand(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn delay(&mut self) -> Duration {
        let j = self.link.jitter.as_nanos() as u64;
        let extra = if j == 0 { 0 } else { self.rand() % (j + 1) };
        self.link.latency + Duration::from_nanos(extra)
    }

    /// When a message of `len` bytes sent now arrives. Each direction is a
    /// FIFO, as TCP is: jitter never lets a later message overtake.
    fn arrival(&mut self, l: usize, len: usize, to_server: bool) -> Instant {
        let d = self.delay();
        let serialize = self.link.bandwidth.map_or(Duration::ZERO, |bw| {
            Duration::from_nanos((len as u64).saturating_mul(1_000_000_000) / bw.max(1))
        });
        let now = self.now;
        let link = &mut self.links[l];
        let (free, last) = if to_server {
            (&mut link.c2s_free_at, &mut link.c2s_last_at)
        } else {
            (&mut link.s2c_free_at, &mut link.s2c_last_at)
        };
        let done = (*free).max(now) + serialize;
        *free = done;
        let at = (done + d).max(*last);
        *last = at;
        at
    }

    fn kill_link(&mut self, l: usize) {
        let now = self.now;
        let link = &self.links[l];
        let (client_gone, server_gone) = (link.client_gone, link.server_gone);
        if !server_gone && link.conn.is_some() {
            self.schedule(now, Ev::ServerSeesClose(l, None));
        }
        if !client_gone {
            self.schedule(now, Ev::ClientSeesClose(l, None));
        }
        // Nothing in flight on a dead link arrives.
        self.links[l].blackhole = true;
    }

    fn fresh_session(&mut self) -> SessionId {
        self.fresh = self.fresh.wrapping_add(1);
        let a = self.rand();
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&a.to_be_bytes());
        id[8..].copy_from_slice(&self.fresh.to_be_bytes());
        SessionId(id)
    }

    fn deliver(&mut self, ev: Ev) {
        let now = self.now;
        match ev {
            Ev::Cluster(c) => {
                let Some(store) = self.store.as_mut() else {
                    return;
                };
                let (reply, appended) = store.apply(&c);
                let at = now + self.link.latency;
                // The store's answer and its notification travel apart:
                // either may arrive first.
                let entry_first = self.rand() & 1 == 0;
                if !entry_first {
                    self.schedule(at, Ev::Settled(c.clone(), reply.clone()));
                }
                if let Some((room, epoch, e)) = appended {
                    if self.drop_entries > 0 {
                        self.drop_entries -= 1;
                    } else {
                        self.schedule(at, Ev::Entry(room, epoch, e));
                    }
                }
                if entry_first {
                    self.schedule(at, Ev::Settled(c, reply));
                }
            }
            Ev::Entry(room, epoch, e) => match self.server.room_entry(now, &room, epoch, e) {
                EntryOutcome::Gap { after } => self.open_room(&room, after),
                EntryOutcome::OtherEpoch => self.open_room(&room, 0),
                _ => {}
            },
            Ev::Settled(c, reply) => self.settle(c, reply),
            Ev::Beat => {
                let at = now + Duration::from_secs(1);
                self.schedule(at, Ev::Beat);
                for room in self.server.followed_rooms() {
                    let Some((epoch, last)) = self.server.room_position(&room) else {
                        continue;
                    };
                    let top = self.store.as_ref().and_then(|s| s.top(&room));
                    match top {
                        Some((e, t)) if e == epoch && t <= last => {}
                        Some((e, _)) if e == epoch => self.open_room(&room, last),
                        _ => self.open_room(&room, 0),
                    }
                }
            }
            Ev::Opened(l) => {
                if self.links[l].client_gone || self.links[l].client_closing {
                    return;
                }
                let i = self.links[l].client;
                let identity = self.peers[i].identity.clone();
                let fresh = self.fresh_session();
                let tid = self.links[l].tid;
                // A third of the connections carry the hello in the
                // upgrade request (and the answer in the response), a third
                // in the request's URL (and the answer as the first frame,
                // as a browser page does), the others as the first frame:
                // every handshake is exercised.
                let (conn, answer) = match self.rand() % 3 {
                    0 => match self.peers[i].client.upgrade_hello(tid) {
                        Some(hello) => self.server.handle_upgrade(now, identity, fresh, &hello),
                        None => (self.server.handle_connection(now, identity, fresh), None),
                    },
                    1 => match self.peers[i].client.url_hello(tid) {
                        Some(hello) => (
                            self.server
                                .handle_request_hello(now, identity, fresh, &hello),
                            None,
                        ),
                        None => (self.server.handle_connection(now, identity, fresh), None),
                    },
                    _ => (self.server.handle_connection(now, identity, fresh), None),
                };
                self.links[l].conn = Some(conn);
                self.by_conn.insert(conn, l);
                self.peers[i]
                    .client
                    .handle_upgraded(now, tid, answer.as_deref());
            }
            Ev::ConnectFailed(l, err) => {
                if self.links[l].client_gone || self.links[l].client_closing {
                    return;
                }
                self.links[l].client_gone = true;
                let (i, tid) = (self.links[l].client, self.links[l].tid);
                self.peers[i].client.handle_transport_error(now, tid, err);
            }
            Ev::ToServer(l, t) => {
                let link = &self.links[l];
                if link.server_gone || link.blackhole {
                    return;
                }
                if let Some(conn) = link.conn {
                    self.server.handle_message(now, conn, t.as_incoming());
                }
            }
            Ev::ToClient(l, t) => {
                let link = &self.links[l];
                if link.client_gone || link.blackhole {
                    return;
                }
                let (i, tid) = (link.client, link.tid);
                self.peers[i]
                    .client
                    .handle_message(now, tid, t.as_incoming());
            }
            Ev::ServerSeesClose(l, code) => {
                if self.links[l].server_gone {
                    return;
                }
                self.links[l].server_gone = true;
                if let Some(conn) = self.links[l].conn {
                    self.server.handle_connection_closed(now, conn, code);
                }
            }
            Ev::ClientSeesClose(l, code) => {
                if self.links[l].client_gone {
                    return;
                }
                self.links[l].client_gone = true;
                let (i, tid) = (self.links[l].client, self.links[l].tid);
                self.peers[i]
                    .client
                    .handle_transport_closed(now, tid, code, "");
            }
        }
    }

    /// What the store did with a room operation, to the server (as a
    /// driver hands it over).
    fn settle(&mut self, c: ClusterOutput, reply: Reply) {
        let now = self.now;
        match (c, reply) {
            (
                ClusterOutput::Publish {
                    origin: Some(op), ..
                },
                _,
            ) => self.server.room_published(now, op),
            (
                ClusterOutput::Join {
                    room,
                    session,
                    origin,
                    presence,
                    ..
                },
                Reply::Joined(joined),
            ) => {
                if self
                    .server
                    .room_position(&room)
                    .is_none_or(|(e, _)| e != joined.epoch)
                {
                    self.open_room(&room, 0);
                }
                if !self.server.room_joined(now, session, &room, joined, origin) {
                    let leave = ClusterOutput::repair_leave(&room, session, presence);
                    let at = now + self.link.latency;
                    self.schedule(at, Ev::Cluster(leave));
                }
            }
            (
                ClusterOutput::Join {
                    room,
                    session,
                    origin,
                    ..
                },
                _,
            ) => {
                let max = self.server_config.max_room_size;
                match origin {
                    Some(op) => {
                        let full = RoomError::RoomFull { max };
                        self.server.room_failed(now, op, &room, RoomOp::Join, full)
                    }
                    // An adoption into a room that filled meanwhile.
                    None => self.server.room_left(now, session, &room, None),
                }
                self.server.room_close_if_empty(now, &room);
            }
            // Only a client's leave takes effect here now (one without
            // origin was carried out already, or repairs the store).
            (
                ClusterOutput::Leave {
                    room,
                    session,
                    origin: Some(op),
                    ..
                },
                _,
            ) => self.server.room_left(now, session, &room, Some(op)),
            _ => {}
        }
    }

    /// Carries out every pending output of every machine.
    pub fn pump(&mut self) {
        loop {
            let mut progress = false;
            for i in 0..self.peers.len() {
                while let Some(o) = self.peers[i].client.poll_output() {
                    progress = true;
                    self.on_client_output(i, o);
                }
            }
            while let Some(o) = self.server.poll_output() {
                progress = true;
                self.on_server_output(o);
            }
            if !progress {
                break;
            }
        }
    }

    fn drain_server(&mut self) {
        while let Some(o) = self.server.poll_output() {
            if let ServerOutput::Event(e) = o {
                self.server_events.push((self.now, e));
            }
        }
    }

    fn budget(&mut self, l: usize, len: usize) -> bool {
        let link = &mut self.links[l];
        match link.cut_after {
            Some(left) if (len as u64) > left => {
                link.cut_after = Some(0);
                false
            }
            Some(left) => {
                link.cut_after = Some(left - len as u64);
                true
            }
            None => true,
        }
    }

    fn on_client_output(&mut self, i: usize, o: Output) {
        let now = self.now;
        if self.peers[i].record {
            let line = describe(now, &o);
            self.peers[i].transcript.push(line);
        }
        match o {
            Output::Connect(tid) => {
                let l = self.links.len();
                self.links.push(Link {
                    client: i,
                    tid,
                    conn: None,
                    client_gone: false,
                    client_closing: false,
                    server_gone: false,
                    blackhole: false,
                    cut_after: None,
                    duplicate_next: [false; 2],
                    drop_next: [false; 2],
                    c2s_free_at: now,
                    s2c_free_at: now,
                    c2s_last_at: now,
                    s2c_last_at: now,
                });
                self.peers[i].link = Some(l);
                let at = now + self.link.latency;
                match self.reachability {
                    Reachability::Up => self.schedule(at, Ev::Opened(l)),
                    Reachability::Refused => self.schedule(
                        at,
                        Ev::ConnectFailed(l, TransportError::Io("connection refused".into())),
                    ),
                    Reachability::Http(status) => self.schedule(
                        at,
                        Ev::ConnectFailed(
                            l,
                            TransportError::Http {
                                status,
                                retry_after: None,
                            },
                        ),
                    ),
                    Reachability::Hang => {}
                }
            }
            Output::Transmit(tid, t) => {
                let Some(l) = self.peers[i].link.filter(|&l| self.links[l].tid == tid) else {
                    return;
                };
                if self.links[l].client_gone || self.links[l].client_closing {
                    return;
                }
                if !self.budget(l, t.len()) {
                    self.kill_link(l);
                    return;
                }
                if core::mem::take(&mut self.links[l].drop_next[0]) {
                    return;
                }
                let at = self.arrival(l, t.len(), true);
                if core::mem::take(&mut self.links[l].duplicate_next[0]) {
                    self.schedule(at, Ev::ToServer(l, t.clone()));
                }
                self.schedule(at, Ev::ToServer(l, t));
            }
            Output::Disconnect(tid, code, _) => {
                let Some(l) = self.peers[i].link.filter(|&l| self.links[l].tid == tid) else {
                    return;
                };
                self.peers[i].link = None;
                if self.links[l].client_gone || self.links[l].client_closing {
                    return;
                }
                self.links[l].client_closing = true;
                if self.links[l].conn.is_none() || self.links[l].blackhole {
                    // Nothing to tell (an attempt that never opened, or a
                    // half-open link: the server finds out by its idle timeout).
                    self.schedule(now, Ev::ClientSeesClose(l, Some(code)));
                } else {
                    // The close handshake: the server sees the close frame,
                    // the client sees the answer one latency later.
                    let at = self.arrival(l, 0, true);
                    self.schedule(at, Ev::ServerSeesClose(l, Some(code)));
                    let back = at + self.link.latency;
                    self.schedule(back, Ev::ClientSeesClose(l, Some(code)));
                }
            }
            Output::Event(e) => self.peers[i].events.push((now, e)),
        }
    }

    fn on_server_output(&mut self, o: ServerOutput) {
        let now = self.now;
        match o {
            // Written at once, as a driver with nothing else to write does.
            ServerOutput::Latest(conn, v) => {
                self.on_server_output(ServerOutput::Transmit(conn, v.transmit))
            }
            ServerOutput::Transmit(conn, t) => {
                let Some(&l) = self.by_conn.get(&conn) else {
                    return;
                };
                if self.links[l].server_gone {
                    return;
                }
                if !self.budget(l, t.len()) {
                    self.kill_link(l);
                    return;
                }
                if core::mem::take(&mut self.links[l].drop_next[1]) {
                    return;
                }
                let at = self.arrival(l, t.len(), false);
                if core::mem::take(&mut self.links[l].duplicate_next[1]) {
                    self.schedule(at, Ev::ToClient(l, t.clone()));
                }
                self.schedule(at, Ev::ToClient(l, t));
            }
            ServerOutput::Disconnect(conn, code, _) => {
                let Some(&l) = self.by_conn.get(&conn) else {
                    return;
                };
                if self.links[l].server_gone {
                    return;
                }
                self.links[l].server_gone = true;
                if !self.links[l].client_gone && !self.links[l].blackhole {
                    let at = self.arrival(l, 0, false);
                    self.schedule(at, Ev::ClientSeesClose(l, Some(code)));
                }
            }
            ServerOutput::Event(e) => self.server_events.push((now, e)),
            // One server: its maps have no other copy to reach.
            ServerOutput::Map(_) => {}
            // The simulated server hands every member its own frames; room
            // feeds are checked against that by the `server_machine` fuzz
            // target, which runs both and compares what each connection
            // is sent.
            ServerOutput::Feed(f) => panic!("room feeds are off in the simulator: {f:?}"),
            ServerOutput::Cluster(c) => {
                assert!(
                    self.store.is_some(),
                    "a cluster output without shared rooms: {c:?}"
                );
                // A join needs the room's copy here first, as a driver
                // opens it before the store takes the join.
                if let ClusterOutput::Join { room, .. } = &c {
                    if self.server.room_position(room).is_none() {
                        let room = room.to_string();
                        self.open_room(&room, 0);
                    }
                }
                let at = now + self.link.latency;
                self.schedule(at, Ev::Cluster(c));
            }
        }
    }
}

/// One line per output, for golden transcripts.
pub fn describe(now: Instant, o: &Output) -> String {
    let mut s = format!("{now:?} ");
    let _ = match o {
        Output::Connect(t) => write!(s, "connect #{}", t.0),
        Output::Transmit(t, Transmit::Text(b)) => {
            write!(s, "send #{} {}", t.0, String::from_utf8_lossy(b))
        }
        Output::Transmit(t, Transmit::Binary(b)) => {
            write!(s, "send #{} binary {} bytes", t.0, b.len())
        }
        Output::Disconnect(t, code, why) => write!(s, "disconnect #{} {} ({why})", t.0, code.0),
        Output::Event(Event::StateChanged { old, new }) => {
            write!(s, "state {} -> {}", state_line(old), state_line(new))
        }
        Output::Event(e) => write!(s, "event {e:?}"),
    };
    s
}

fn state_line(st: &State) -> String {
    match st {
        State::Connecting { attempt } => format!("connecting({attempt})"),
        State::Handshaking { attempt } => format!("handshaking({attempt})"),
        State::Reconnecting { attempt, at, cause } => {
            format!("reconnecting({attempt} at {at:?}, {cause:?})")
        }
        State::Closed { code } => format!("closed({})", code.0),
        State::Failed { reason } => format!("failed({reason:?})"),
        other => other.name().to_string(),
    }
}
