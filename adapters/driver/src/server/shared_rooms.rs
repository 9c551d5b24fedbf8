//! Rooms shared by the servers of a cluster, on the driver's side: the
//! queue of room operations on their way to the backplane, the task that
//! takes them there in order and hands the outcomes to the core, and the
//! copies of the rooms this node follows kept whole.
//!
//! Owns [`SharedRooms`]: the outbox of room operations the core produced
//! ([`ClusterOutput`]) or the node needs (a moved session's rooms taken up
//! here), bounded by [`OUTBOX`], with what a full one does (a client's
//! operation refused `unavailable`, an application's call failed, the
//! rest repaired by a reconciliation); the entries of followed rooms as
//! the backplane delivers them, handed to the core in offset order, with
//! gaps filled from the room's log; and, every third of the node timeout,
//! a comparison of each followed room with its log (what a lost
//! notification would leave behind), the removal of the members of nodes
//! that are gone (PROTOCOL.md, section 6), and, after a failure, a
//! reconciliation of this node's memberships with the store's.
//!
//! One task does all of it, so the backplane sees this node's operations
//! in the order the core gave them (a publisher's messages stay in order)
//! and the core sees each room's entries in order. It never holds the
//! server's lock across an `.await`, and never decides membership or
//! numbers an entry: the store numbers, the core decides.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use futures_channel::oneshot;
use futures_util::task::AtomicWaker;
use futures_util::StreamExt;
use kitestring_core::rooms::{Member, Presence};
use kitestring_core::server::{
    ClientOp, ClusterOutput, EntryOutcome, JoinedAt, RoomError, RoomOp, SharedEntry,
};
use kitestring_core::wire::{MsgKind, Payload, PayloadKind, SessionId};
use tracing::{debug, error, warn};

use crate::backplane::{
    node_key, Backplane, BackplaneError, RoomCommand, RoomLog, RoomNews, RoomReply, RoomTop,
};

use super::shared::ServerShared;

/// Room operations waiting for the backplane, at most. Past it a client's
/// operation is refused (`unavailable`), an application's call fails, and
/// a leave the core already carried out is repaired by the next
/// reconciliation.
pub(super) const OUTBOX: usize = 65_536;

/// Operations sent to the backplane in one batch (one round trip).
const BATCH: usize = 64;

/// What an application's broadcast hears: the room's members, or why not.
pub(super) type PublishReply = oneshot::Sender<Result<usize, String>>;
/// What an application's join hears.
pub(super) type JoinReply = oneshot::Sender<Result<(), RoomError>>;

/// One operation on its way to the backplane.
enum Job {
    /// From the core, with the application's call waiting for it, if any.
    Core {
        output: ClusterOutput,
        publish: Option<PublishReply>,
        join: Option<JoinReply>,
        /// A publish's key, so that it is appended once however often it
        /// is sent: the client's (session, message id), or this process's
        /// own for the application's broadcasts.
        once: Option<(String, u64)>,
    },
    /// A session that arrived here is a member of `room` held here.
    Adopt {
        session: SessionId,
        room: String,
        member: Vec<u8>,
        presence: bool,
        max: usize,
    },
}

#[derive(Default)]
struct Queue {
    outbox: VecDeque<Job>,
    /// Applications' broadcasts and joins waiting for their outputs (one
    /// per output without origin, in order).
    publishes: VecDeque<PublishReply>,
    joins: VecDeque<JoinReply>,
    /// Rooms to open before a session is imported, and who waits.
    opens: Vec<(Vec<String>, oneshot::Sender<bool>)>,
    /// Sessions that arrived: their rooms to adopt.
    adopts: Vec<SessionId>,
}

/// This node's shared rooms (module docs).
pub(super) struct SharedRooms {
    queue: Mutex<Queue>,
    task: AtomicWaker,
    /// A change the store may have missed: reconcile at the next beat.
    dirty: AtomicBool,
    /// The store did not take the last batch: new operations are refused
    /// at once until it does.
    down: AtomicBool,
    /// This process's publisher key for the application's broadcasts, and
    /// their count.
    publisher: String,
    broadcasts: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SharedRooms {
    pub(super) fn new() -> SharedRooms {
        SharedRooms {
            queue: Mutex::new(Queue::default()),
            task: AtomicWaker::new(),
            // A node starts by reconciling: what its previous process held
            // and no longer does.
            dirty: AtomicBool::new(true),
            down: AtomicBool::new(false),
            publisher: format!(
                "app-{}",
                kitestring_core::wire::SessionId(crate::util::random16().unwrap_or_default())
                    .to_hex()
            ),
            broadcasts: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// An application's broadcast is about to produce a publish without
    /// origin (under the server's lock, before the core's outputs are
    /// drained).
    pub(super) fn expect_publish(&self, reply: PublishReply) {
        lock(&self.queue).publishes.push_back(reply);
    }

    /// Likewise for an application's join.
    pub(super) fn expect_join(&self, reply: JoinReply) {
        lock(&self.queue).joins.push_back(reply);
    }

    /// The join expected last produced no output (the core refused it).
    pub(super) fn cancel_join(&self) {
        lock(&self.queue).joins.pop_back();
    }

    /// The broadcast expected last produced no output.
    pub(super) fn cancel_publish(&self) {
        lock(&self.queue).publishes.pop_back();
    }

    /// Takes a core output (under the server's lock); gives it back when
    /// the outbox is full, with the application's waiter failed.
    pub(super) fn push(&self, output: ClusterOutput) -> Option<ClusterOutput> {
        let mut q = lock(&self.queue);
        let (publish, join) = match &output {
            ClusterOutput::Publish { origin: None, .. } => (q.publishes.pop_front(), None),
            ClusterOutput::Join { origin: None, .. } => (None, q.joins.pop_front()),
            _ => (None, None),
        };
        // A leave without origin repairs the store (the session is gone
        // here): it waits for the store, unless there is no room left.
        let repair = matches!(output, ClusterOutput::Leave { origin: None, .. });
        let why = if q.outbox.len() >= OUTBOX {
            Some("too many room operations waiting for the backplane")
        } else if self.down.load(Ordering::Relaxed) && !repair {
            Some("the backplane is unreachable")
        } else {
            None
        };
        if let Some(why) = why {
            drop(q);
            if let Some(p) = publish {
                let _ = p.send(Err(why.into()));
            }
            if let Some(j) = join {
                let _ = j.send(Err(RoomError::Unavailable(why.into())));
            }
            if repair {
                self.dirty.store(true, Ordering::Relaxed);
            }
            return Some(output);
        }
        let once = match &output {
            ClusterOutput::Publish {
                origin: Some(op), ..
            } => Some((op.session.to_hex(), op.id.0)),
            ClusterOutput::Publish { origin: None, .. } => Some((
                self.publisher.clone(),
                self.broadcasts.fetch_add(1, Ordering::Relaxed) + 1,
            )),
            _ => None,
        };
        q.outbox.push_back(Job::Core {
            output,
            publish,
            join,
            once,
        });
        drop(q);
        self.task.wake();
        None
    }

    /// Opens `rooms` here (follows them, their copies whole) before a
    /// session that is a member is imported; waits for it. False if they
    /// could not be opened in time (the store unreachable): the session
    /// must not be imported, or its member would follow no copy.
    pub(super) async fn open(&self, shared: &ServerShared, rooms: Vec<String>) -> bool {
        if rooms.is_empty() {
            return true;
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.queue).opens.push((rooms, tx));
        self.task.wake();
        let limit = shared.options.handshake_timeout / 2;
        matches!(
            crate::util::timeout(&*shared.runtime, limit, rx).await,
            Some(Ok(true))
        )
    }

    /// This node's records in the store may be gone (it was cut off long
    /// enough for the others to count it gone, or the store lost its
    /// data): reconcile at the next beat.
    pub(super) fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// A session arrived here: its memberships are recorded as held here.
    pub(super) fn adopt(&self, session: SessionId) {
        lock(&self.queue).adopts.push(session);
        self.task.wake();
    }
}

/// What the core's [`ClusterOutput`] the outbox refused (full, or the
/// store unreachable) does now: the client's operation is refused by id.
pub(super) fn refuse_full(
    server: &mut kitestring_core::server::Server,
    now: kitestring_core::Instant,
    output: ClusterOutput,
) {
    let unavailable = || {
        RoomError::Unavailable(
            "the backplane is unreachable or too many room operations wait for it".into(),
        )
    };
    match output {
        ClusterOutput::Publish {
            room,
            origin: Some(op),
            ..
        } => server.room_failed(now, op, &room, RoomOp::Publish, unavailable()),
        ClusterOutput::Join {
            room,
            origin: Some(op),
            ..
        } => server.room_failed(now, op, &room, RoomOp::Join, unavailable()),
        ClusterOutput::Leave {
            room,
            origin: Some(op),
            ..
        } => server.room_failed(now, op, &room, RoomOp::Leave, unavailable()),
        _ => {}
    }
}

// ---- entries ---------------------------------------------------------------

/// An entry as this server writes it to a room's log: `M`, a flags byte
/// (1: an `except` session follows), the session's 16 bytes if so, the
/// payload's kind (0 JSON, 1 MessagePack, 2 bytes), the payload.
fn encode_entry(payload: &Payload, except: Option<SessionId>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 19);
    out.push(b'M');
    match except {
        Some(s) => {
            out.push(1);
            out.extend_from_slice(&s.0);
        }
        None => out.push(0),
    }
    out.push(match payload.kind() {
        PayloadKind::Json => 0,
        PayloadKind::MsgPack => 1,
        _ => 2,
    });
    out.extend_from_slice(payload.data());
    out
}

/// An entry of a room's log as the core takes it: a message this server
/// (or another) wrote, or the store's announcement of a join (`J`) or of
/// leaves (`L`), as a presence diff. `None` for bytes that are neither.
fn decode_entry(offset: u64, bytes: &[u8]) -> Option<SharedEntry> {
    let (&tag, rest) = bytes.split_first()?;
    match tag {
        b'M' => {
            let (&flags, rest) = rest.split_first()?;
            let (except, rest) = if flags & 1 == 1 {
                let id: [u8; 16] = rest.get(..16)?.try_into().ok()?;
                (Some(SessionId(id)), &rest[16..])
            } else {
                (None, rest)
            };
            let (&kind, data) = rest.split_first()?;
            let payload = match kind {
                0 => Payload::json(data.to_vec()).ok()?,
                1 => Payload::msgpack(data.to_vec()).ok()?,
                2 => Payload::binary(data.to_vec()),
                _ => return None,
            };
            Some(SharedEntry {
                offset,
                kind: MsgKind::Plain,
                payload,
                except,
            })
        }
        b'J' => {
            let session = SessionId::from_hex(std::str::from_utf8(rest.get(..32)?).ok()?)?;
            let member: Member = serde_json::from_slice(&rest[32..]).ok()?;
            presence(
                offset,
                Presence {
                    snapshot: false,
                    joined: vec![member],
                    left: Vec::new(),
                },
                Some(session),
            )
        }
        b'L' => {
            let left = rest
                .split(|&b| b == b'\n')
                .map(serde_json::from_slice::<Member>)
                .collect::<Result<Vec<_>, _>>()
                .ok()?;
            presence(
                offset,
                Presence {
                    snapshot: false,
                    joined: Vec::new(),
                    left,
                },
                None,
            )
        }
        _ => None,
    }
}

fn presence(offset: u64, diff: Presence, except: Option<SessionId>) -> Option<SharedEntry> {
    let payload = Payload::json(serde_json::to_vec(&diff).ok()?).ok()?;
    Some(SharedEntry {
        offset,
        kind: MsgKind::Presence,
        payload,
        except,
    })
}

/// An entry that does not read (written by something else than a
/// server): its offset still counts, as an empty presence diff members
/// ignore, so the room's stream goes on.
fn unreadable(offset: u64) -> SharedEntry {
    error!(
        offset,
        "an unreadable entry in a shared room's log; delivered as an empty notice"
    );
    presence(offset, Presence::default(), None).unwrap_or(SharedEntry {
        offset,
        kind: MsgKind::Presence,
        payload: Payload::binary(Vec::new()),
        except: None,
    })
}

// ---- the task --------------------------------------------------------------

/// The rooms task's own state.
struct Worker {
    shared: Arc<ServerShared>,
    bp: Arc<dyn Backplane>,
    node: String,
    /// Rooms whose entries the backplane delivers here.
    following: HashSet<String>,
    history: usize,
}

enum Wake {
    News(Option<RoomNews>),
    Work,
    Beat,
}

/// Starts the rooms task.
pub(super) fn spawn(shared: Arc<ServerShared>, bp: Arc<dyn Backplane>, node_timeout: Duration) {
    let Some(cluster) = shared.cluster.clone() else {
        return;
    };
    let history = shared.options.config.history.max_entries.max(1);
    let runtime = shared.runtime.clone();
    runtime.spawn(Box::pin(async move {
        let rooms = &cluster.rooms;
        let mut news = Some(bp.room_news());
        let mut w = Worker {
            node: bp.node().to_owned(),
            shared: shared.clone(),
            bp,
            following: HashSet::new(),
            history,
        };
        let beat = node_timeout / 3;
        let mut next_beat = shared.runtime.now() + beat.min(Duration::from_secs(1));
        loop {
            let mut timer = shared.runtime.new_timer(next_beat);
            let wake = std::future::poll_fn(|cx| {
                rooms.task.register(cx.waker());
                if let Some(n) = news.as_mut() {
                    if let Poll::Ready(item) = n.poll_next_unpin(cx) {
                        return Poll::Ready(Wake::News(item));
                    }
                }
                if has_work(&lock(&rooms.queue)) {
                    return Poll::Ready(Wake::Work);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Beat);
                }
                Poll::Pending
            })
            .await;
            // After the server stopped, what is queued still goes out
            // (a shutdown hands sessions over only once their room
            // operations settled).
            if shared.lock().stopped && !has_work(&lock(&rooms.queue)) {
                break;
            }
            match wake {
                Wake::News(Some(n)) => w.on_news(n).await,
                Wake::News(None) => {
                    warn!("the backplane stopped delivering room entries; rooms catch up at each beat");
                    news = None;
                }
                Wake::Work => w.work(rooms).await,
                Wake::Beat => {
                    next_beat = shared.runtime.now() + beat;
                    w.beat(rooms).await;
                }
            }
        }
    }));
}

fn has_work(q: &Queue) -> bool {
    !q.outbox.is_empty() || !q.opens.is_empty() || !q.adopts.is_empty()
}

impl Worker {
    /// Reads `room`'s log after `after` into the core's copy (opening it).
    async fn read(&mut self, room: &str, after: u64) -> Result<(), BackplaneError> {
        if !self.following.contains(room) {
            self.bp.room_follow(room.to_owned()).await?;
            self.following.insert(room.to_owned());
        }
        let mut log = self.bp.room_read(room.to_owned(), after).await?;
        // A copy made from part of the log would lack the history a member
        // that arrives later recovers from: if there is no copy here now
        // (it went while the log was read), the whole log.
        let have = self
            .shared
            .run(None, |st, _| st.server.room_position(room).is_some());
        if after > 0 && !have {
            log = self.bp.room_read(room.to_owned(), 0).await?;
        }
        self.apply_log(room, log);
        Ok(())
    }

    fn apply_log(&self, room: &str, log: RoomLog) {
        let history: Vec<SharedEntry> = log
            .entries
            .into_iter()
            .map(|(o, e)| decode_entry(o, &e).unwrap_or_else(|| unreadable(o)))
            .collect();
        self.shared.run(None, |st, now| {
            st.server.room_open(now, room, log.epoch, log.last, history)
        });
    }

    /// Opens `room` here if there is no copy yet.
    async fn ensure_open(&mut self, room: &str) -> Result<(), BackplaneError> {
        let have = self
            .shared
            .run(None, |st, _| st.server.room_position(room).is_some());
        if have && self.following.contains(room) {
            return Ok(());
        }
        self.read(room, 0).await
    }

    async fn on_news(&mut self, news: RoomNews) {
        match news {
            RoomNews::Entry {
                room,
                epoch,
                offset,
                entry,
            } => {
                let entry = decode_entry(offset, &entry).unwrap_or_else(|| unreadable(offset));
                let outcome = self.shared.run(None, |st, now| {
                    st.server.room_entry(now, &room, epoch, entry)
                });
                let after = match outcome {
                    EntryOutcome::Applied | EntryOutcome::Duplicate => return,
                    EntryOutcome::NotFollowed => return,
                    EntryOutcome::Gap { after } => after,
                    EntryOutcome::OtherEpoch => 0,
                };
                debug!(%room, after, ?outcome, "filling a gap in a shared room from its log");
                if let Err(e) = self.read(&room, after).await {
                    debug!(%room, error = %e, "cannot read a shared room's log; the next beat tries again");
                }
            }
            RoomNews::Resync => {
                debug!("room entries may have been missed; reading every followed room");
                self.catch_up_all().await;
            }
        }
    }

    /// Reads what each followed room's copy lacks.
    async fn catch_up_all(&mut self) {
        let rooms: Vec<(String, u64)> = self.shared.run(None, |st, _| {
            st.server
                .followed_rooms()
                .into_iter()
                .filter_map(|r| Some((r.to_string(), st.server.room_position(&r)?.1)))
                .collect()
        });
        for (room, last) in rooms {
            if let Err(e) = self.read(&room, last).await {
                debug!(%room, error = %e, "cannot read a shared room's log; the next beat tries again");
            }
        }
    }

    /// Opens, adopts, then a batch of the outbox.
    async fn work(&mut self, rooms: &SharedRooms) {
        let (opens, adopts) = {
            let mut q = lock(&rooms.queue);
            (std::mem::take(&mut q.opens), std::mem::take(&mut q.adopts))
        };
        for (list, done) in opens {
            let mut all = true;
            for room in list {
                if let Err(e) = self.ensure_open(&room).await {
                    debug!(%room, error = %e, "cannot open a shared room");
                    all = false;
                }
            }
            let _ = done.send(all);
        }
        if !adopts.is_empty() {
            let jobs: Vec<Job> = self.shared.run(None, |st, _| {
                let mut jobs = Vec::new();
                for session in adopts {
                    let Some(member) = st.server.member(session) else {
                        continue;
                    };
                    let Ok(member) = serde_json::to_vec(&member) else {
                        continue;
                    };
                    for room in st.server.rooms_of(session) {
                        jobs.push(Job::Adopt {
                            session,
                            room: room.to_string(),
                            member: member.clone(),
                            presence: st.server.room_presence(&room),
                            max: st.server.config().max_room_size,
                        });
                    }
                }
                jobs
            });
            lock(&rooms.queue).outbox.extend(jobs);
        }
        let jobs: Vec<Job> = {
            let mut q = lock(&rooms.queue);
            let n = q.outbox.len().min(BATCH);
            q.outbox.drain(..n).collect()
        };
        // A repair (a leave without origin) for a session that is a member
        // here by now (it arrived since the repair was decided: a node
        // restarted under its name takes up sessions its previous process
        // held) is dropped: the store must not lose a member that is here.
        let jobs: Vec<Job> = self.shared.run(None, |st, _| {
            jobs.into_iter()
                .filter(|job| match job {
                    Job::Core {
                        output:
                            ClusterOutput::Leave {
                                room,
                                session,
                                origin: None,
                                ..
                            },
                        ..
                    } => !st.server.rooms_of(*session).iter().any(|r| r == room),
                    _ => true,
                })
                .collect()
        });
        if jobs.is_empty() {
            return;
        }
        // A join needs the room's copy here first: the entries after its
        // offset must reach the new member.
        for job in &jobs {
            let room = match job {
                Job::Core {
                    output: ClusterOutput::Join { room, .. },
                    ..
                } => room.to_string(),
                Job::Adopt { room, .. } => room.clone(),
                _ => continue,
            };
            if let Err(e) = self.ensure_open(&room).await {
                debug!(%room, error = %e, "cannot open a shared room");
            }
        }
        let commands: Vec<RoomCommand> = jobs.iter().map(command).collect();
        // Until the store answers: every operation is safe to send again
        // (joins and leaves are idempotent, publishes carry their key), and
        // one the store may have carried out must not be called refused.
        // New operations are refused meanwhile (`down`).
        let mut wait = Duration::from_millis(100);
        let mut stopped_since = None;
        let replies = loop {
            match self.bp.room_batch(commands.clone(), self.history).await {
                Ok(replies) => break replies,
                Err(e) => {
                    if !rooms.down.swap(true, Ordering::Relaxed) {
                        warn!(error = %e, operations = jobs.len(), "the backplane did not take room operations; sending them again until it does, refusing new ones");
                    }
                    rooms.dirty.store(true, Ordering::Relaxed);
                    let now = self.shared.runtime.now();
                    let stopped = self.shared.lock().stopped;
                    let since = stopped.then(|| *stopped_since.get_or_insert(now));
                    if since.is_some_and(|t| now >= t + self.shared.options.close_timeout) {
                        for job in jobs {
                            self.fail(rooms, job, &e);
                        }
                        return;
                    }
                    crate::util::sleep(&*self.shared.runtime, wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
            }
        };
        if rooms.down.swap(false, Ordering::Relaxed) {
            debug!("the backplane takes room operations again");
        }
        for (job, reply) in jobs.into_iter().zip(replies) {
            self.settle(rooms, job, reply).await;
        }
    }

    /// What the store did with one operation, to the core.
    async fn settle(&mut self, rooms: &SharedRooms, job: Job, reply: RoomReply) {
        match (job, reply) {
            (
                Job::Core {
                    output: ClusterOutput::Publish { origin, .. },
                    publish,
                    ..
                },
                RoomReply::Appended { members, .. },
            ) => {
                if let Some(op) = origin {
                    self.shared
                        .run(None, |st, now| st.server.room_published(now, op));
                }
                if let Some(p) = publish {
                    let _ = p.send(Ok(members));
                }
            }
            (
                Job::Core {
                    output:
                        ClusterOutput::Join {
                            room,
                            session,
                            origin,
                            ..
                        },
                    join,
                    ..
                },
                reply,
            ) => {
                let ok = self
                    .joined(rooms, session, &room, origin, reply, join.is_some())
                    .await;
                if let Some(j) = join {
                    let _ = j.send(ok);
                }
            }
            (Job::Adopt { session, room, .. }, reply) => {
                let _ = self.joined(rooms, session, &room, None, reply, false).await;
            }
            (
                Job::Core {
                    output:
                        ClusterOutput::Leave {
                            room,
                            session,
                            origin,
                            ..
                        },
                    ..
                },
                RoomReply::Left { .. },
            ) => {
                // A client's leave takes effect here now. One without
                // origin was carried out here already (an application's
                // leave, an ended session) or repairs the store for a
                // session that is not here: it must not touch a member
                // that is here now.
                if let Some(op) = origin {
                    self.shared.run(None, |st, now| {
                        st.server.room_left(now, session, &room, Some(op))
                    });
                }
            }
            (job, reply) => {
                error!(
                    ?reply,
                    "the backplane answered a room operation with something else"
                );
                self.fail(rooms, job, &BackplaneError("an unexpected reply".into()));
            }
        }
    }

    /// A join (or adoption) the store answered.
    async fn joined(
        &mut self,
        rooms: &SharedRooms,
        session: SessionId,
        room: &str,
        origin: Option<ClientOp>,
        reply: RoomReply,
        app: bool,
    ) -> Result<(), RoomError> {
        let (epoch, at, members) = match reply {
            RoomReply::Joined { epoch, at, members } => (epoch, at, members),
            RoomReply::Full => {
                let max = self.shared.options.config.max_room_size;
                let error = RoomError::RoomFull { max };
                self.shared.run(None, |st, now| {
                    match origin {
                        Some(op) => {
                            st.server
                                .room_failed(now, op, room, RoomOp::Join, error.clone())
                        }
                        // An adoption into a room that filled meanwhile:
                        // the session is no longer a member.
                        None if !app => st.server.room_left(now, session, room, None),
                        None => {}
                    }
                    st.server.room_close_if_empty(now, room);
                });
                return Err(error);
            }
            _ => return Err(RoomError::Unavailable("an unexpected reply".into())),
        };
        // The store may have made the room again since the copy here was
        // opened (it emptied meanwhile): read the new one.
        let position = self.shared.run(None, |st, _| st.server.room_position(room));
        if position.is_none_or(|(e, _)| e != epoch) {
            if let Err(e) = self.read(room, 0).await {
                debug!(%room, error = %e, "cannot read a shared room's log");
            }
        }
        let members: Vec<Member> = members
            .iter()
            .filter_map(|m| serde_json::from_slice(m).ok())
            .collect();
        let done = self.shared.run(None, |st, now| {
            let joined = JoinedAt { epoch, at, members };
            st.server.room_joined(now, session, room, joined, origin)
        });
        if !done {
            // The session is gone (or the room changed again): take the
            // membership back.
            let presence = self.shared.run(None, |st, _| st.server.room_presence(room));
            lock(&rooms.queue).outbox.push_back(Job::Core {
                output: ClusterOutput::repair_leave(room, session, presence),
                publish: None,
                join: None,
                once: None,
            });
            return Err(RoomError::Unavailable("the room changed meanwhile".into()));
        }
        Ok(())
    }

    /// The store did not take `job`.
    fn fail(&self, rooms: &SharedRooms, job: Job, e: &BackplaneError) {
        let unavailable = || RoomError::Unavailable(e.0.clone());
        match job {
            Job::Core {
                output,
                publish,
                join,
                ..
            } => {
                match &output {
                    ClusterOutput::Leave { origin: None, .. } => {
                        rooms.dirty.store(true, Ordering::Relaxed);
                    }
                    ClusterOutput::Join { room, .. } => {
                        let room = room.clone();
                        self.shared
                            .run(None, |st, now| st.server.room_close_if_empty(now, &room));
                    }
                    _ => {}
                }
                if let Some(p) = publish {
                    let _ = p.send(Err(e.0.clone()));
                }
                if let Some(j) = join {
                    let _ = j.send(Err(unavailable()));
                }
                let (room, op, origin) = match output {
                    ClusterOutput::Publish { room, origin, .. } => (room, RoomOp::Publish, origin),
                    ClusterOutput::Join { room, origin, .. } => (room, RoomOp::Join, origin),
                    ClusterOutput::Leave { room, origin, .. } => (room, RoomOp::Leave, origin),
                    _ => return,
                };
                if let Some(origin) = origin {
                    self.shared.run(None, |st, now| {
                        st.server.room_failed(now, origin, &room, op, unavailable())
                    });
                }
            }
            Job::Adopt { .. } => rooms.dirty.store(true, Ordering::Relaxed),
        }
    }

    /// Every third of the node timeout: each followed room against its
    /// log, the members of nodes that are gone, and a reconciliation if
    /// a change may have been missed.
    async fn beat(&mut self, rooms: &SharedRooms) {
        self.check_tops().await;
        self.sweep().await;
        if rooms.dirty.swap(false, Ordering::Relaxed) {
            if let Err(e) = self.reconcile(rooms).await {
                debug!(error = %e, "cannot reconcile shared rooms; the next beat tries again");
                rooms.dirty.store(true, Ordering::Relaxed);
            }
        }
        self.unfollow_unused(rooms).await;
    }

    async fn check_tops(&mut self) {
        let local: Vec<(String, u64, u64)> = self.shared.run(None, |st, _| {
            st.server
                .followed_rooms()
                .into_iter()
                .filter_map(|r| {
                    let (e, l) = st.server.room_position(&r)?;
                    Some((r.to_string(), e, l))
                })
                .collect()
        });
        if local.is_empty() {
            return;
        }
        let names = local.iter().map(|(r, _, _)| r.clone()).collect();
        let Ok(tops) = self.bp.room_tops(names).await else {
            // Cut off: by the time the store answers again, the others may
            // have counted this node gone and taken its members out.
            self.shared_rooms().mark_dirty();
            return;
        };
        for ((room, epoch, last), top) in local.into_iter().zip(tops) {
            match top {
                Some(t) if t.epoch == epoch && t.last <= last => {}
                Some(RoomTop { epoch: e, .. }) => {
                    let after = if e == epoch { last } else { 0 };
                    if let Err(e) = self.read(&room, after).await {
                        debug!(%room, error = %e, "cannot read a shared room's log");
                    }
                }
                // No log: the store lost it (restarted empty), while
                // members are here: record them again.
                None => {
                    debug!(%room, "a shared room's log is gone from the backplane; recording its members here again");
                    let sessions: Vec<SessionId> = self
                        .shared
                        .run(None, |st, _| st.server.member_sessions(&room));
                    {
                        let mut q = lock(&self.shared_rooms().queue);
                        q.adopts.extend(sessions);
                    }
                    self.shared_rooms().task.wake();
                }
            }
        }
    }

    fn shared_rooms(&self) -> &SharedRooms {
        &self
            .shared
            .cluster
            .as_ref()
            .unwrap_or_else(|| unreachable!("the rooms task runs only in a cluster"))
            .rooms
    }

    /// Takes out of every room the members of nodes that are gone.
    async fn sweep(&mut self) {
        let Ok(nodes) = self.bp.room_nodes().await else {
            return;
        };
        for node in nodes.into_iter().filter(|n| *n != self.node) {
            match self.bp.get(node_key(&node)).await {
                Ok(None) => {}
                _ => continue, // alive, or not known now
            }
            let Ok(list) = self.bp.node_rooms(node.clone()).await else {
                continue;
            };
            let mut remaining = 0;
            for room in list {
                let presence = self
                    .shared
                    .run(None, |st, _| st.server.room_presence(&room));
                match self
                    .bp
                    .room_sweep(room.clone(), node.clone(), presence, self.history)
                    .await
                {
                    Ok(swept) => {
                        if swept.removed > 0 {
                            debug!(%room, %node, removed = swept.removed, "members of a node that is gone left");
                        }
                        remaining += swept.remaining;
                    }
                    Err(_) => remaining += 1,
                }
            }
            if remaining == 0 {
                let _ = self.bp.forget_node(node).await;
            }
        }
    }

    /// This node's memberships in the store against the core's: members
    /// recorded as here that are not are taken out; members here the
    /// store does not record as here are recorded.
    async fn reconcile(&mut self, rooms: &SharedRooms) -> Result<(), BackplaneError> {
        let mut names: HashSet<String> = self
            .bp
            .node_rooms(self.node.clone())
            .await?
            .into_iter()
            .collect();
        let local: Vec<String> = self.shared.run(None, |st, _| {
            st.server
                .followed_rooms()
                .into_iter()
                .map(|r| r.to_string())
                .collect()
        });
        names.extend(local);
        for room in names {
            let members = self.bp.room_members(room.clone()).await?;
            let mut jobs = Vec::new();
            let mut adopt = Vec::new();
            self.shared.run(None, |st, _| {
                let here: HashSet<SessionId> =
                    st.server.member_sessions(&room).into_iter().collect();
                let presence = st.server.room_presence(&room);
                for m in &members {
                    let Some(session) = SessionId::from_hex(&m.session) else {
                        continue;
                    };
                    if m.node == self.node && !here.contains(&session) {
                        jobs.push(Job::Core {
                            output: ClusterOutput::repair_leave(&room, session, presence),
                            publish: None,
                            join: None,
                            once: None,
                        });
                    }
                }
                for s in here {
                    let recorded = members
                        .iter()
                        .any(|m| m.node == self.node && SessionId::from_hex(&m.session) == Some(s));
                    if !recorded {
                        adopt.push(s);
                    }
                }
            });
            let mut q = lock(&rooms.queue);
            q.outbox.extend(jobs);
            q.adopts.extend(adopt);
        }
        rooms.task.wake();
        Ok(())
    }

    /// Stops following rooms no local member is in.
    async fn unfollow_unused(&mut self, rooms: &SharedRooms) {
        let needed: HashSet<String> = self.shared.run(None, |st, _| {
            st.server
                .followed_rooms()
                .into_iter()
                .map(|r| r.to_string())
                .collect()
        });
        let pending: HashSet<String> = lock(&rooms.queue)
            .outbox
            .iter()
            .filter_map(|j| match j {
                Job::Core {
                    output: ClusterOutput::Join { room, .. },
                    ..
                } => Some(room.to_string()),
                Job::Adopt { room, .. } => Some(room.clone()),
                _ => None,
            })
            .collect();
        let unused: Vec<String> = self
            .following
            .iter()
            .filter(|r| !needed.contains(*r) && !pending.contains(*r))
            .cloned()
            .collect();
        for room in unused {
            if self.bp.room_unfollow(room.clone()).await.is_ok() {
                self.following.remove(&room);
            }
        }
    }
}

/// The store's command for a job.
fn command(job: &Job) -> RoomCommand {
    match job {
        Job::Core { output, once, .. } => match output {
            ClusterOutput::Publish {
                room,
                payload,
                except,
                ..
            } => RoomCommand::Append {
                room: room.to_string(),
                entry: encode_entry(payload, *except),
                once: once.clone(),
            },
            ClusterOutput::Join {
                room,
                session,
                member,
                presence,
                max_members,
                ..
            } => RoomCommand::Join {
                room: room.to_string(),
                session: session.to_hex(),
                member: serde_json::to_vec(member).unwrap_or_default(),
                announce: *presence,
                snapshot: *presence,
                max_members: *max_members,
            },
            ClusterOutput::Leave {
                room,
                session,
                presence,
                ended,
                ..
            } => RoomCommand::Leave {
                room: room.to_string(),
                session: session.to_hex(),
                announce: *presence,
                ended: *ended,
            },
            _ => RoomCommand::Leave {
                room: String::new(),
                session: String::new(),
                announce: false,
                ended: false,
            },
        },
        Job::Adopt {
            room,
            session,
            member,
            presence,
            max,
        } => RoomCommand::Join {
            room: room.clone(),
            session: session.to_hex(),
            member: member.clone(),
            announce: *presence,
            snapshot: *presence,
            max_members: *max,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_read_back_as_written() {
        let except = SessionId([7; 16]);
        for (payload, except) in [
            (Payload::json(b"{\"a\":1}".to_vec()).unwrap(), Some(except)),
            (Payload::binary(vec![0, 1, 2, b'\n']), None),
        ] {
            let bytes = encode_entry(&payload, except);
            let e = decode_entry(9, &bytes).unwrap();
            assert_eq!(e.offset, 9);
            assert_eq!(e.payload, payload);
            assert_eq!(e.except, except);
            assert_eq!(e.kind, MsgKind::Plain);
        }
    }

    #[test]
    fn the_stores_announcements_read_as_presence_diffs() {
        let session = SessionId([0xab; 16]);
        let member = br#"{"client":"00112233445566778899aabbccddeeff","identity":"ann"}"#;
        let mut join = b"J".to_vec();
        join.extend_from_slice(session.to_hex().as_bytes());
        join.extend_from_slice(member);
        let e = decode_entry(3, &join).unwrap();
        assert_eq!(e.kind, MsgKind::Presence);
        assert_eq!(e.except, Some(session));
        let diff: Presence = serde_json::from_slice(e.payload.data()).unwrap();
        assert_eq!(diff.joined.len(), 1);
        assert_eq!(diff.joined[0].identity.as_deref(), Some("ann"));

        let mut leave = b"L".to_vec();
        leave.extend_from_slice(member);
        leave.push(b'\n');
        leave.extend_from_slice(br#"{"client":"ff"}"#);
        let e = decode_entry(4, &leave).unwrap();
        let diff: Presence = serde_json::from_slice(e.payload.data()).unwrap();
        assert_eq!(diff.left.len(), 2);
        assert!(decode_entry(5, b"Xjunk").is_none());
        assert!(decode_entry(5, b"M\x01short").is_none());
    }
}
