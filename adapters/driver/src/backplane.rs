//! The seam between a server and the other servers of its cluster.
//!
//! A [`Backplane`] is a shared store with expiring keys and a message bus
//! with one inbox per node, nothing more: the server decides what to keep
//! there and when (the cluster logic lives in the driver, once, whatever
//! store carries it). `kitestring-redis` implements it on Redis. Without a
//! backplane ([`ServerOptions::backplane`] `None`, the default) a server
//! works alone, exactly as before.
//!
//! What the server keeps in it (keys are plain strings; values bytes):
//!
//! | key | value | life |
//! |---|---|---|
//! | `node:{name}` | `1` | refreshed every third of [`ServerOptions::node_timeout`], expires after it: the node is alive |
//! | `session:{id}` | the name of the node holding the session | refreshed while the session lives, removed when it ends |
//! | `record:{id}` | the session's [`SessionRecord`] in JSON: ids, identity, rooms | written with `session:{id}` and when its rooms change, by the node holding it; read to take the session up when that node is gone (crashed) |
//! | `image:{id}` | a session's [`SessionImage`] in MessagePack | stored when a node hands the session over, taken (once) by the node its client reconnects to |
//! | `identity:{identity}` | a set of session ids (hex) | a member added when a session of that identity opens or arrives, removed when it ends or moves; the set refreshed with the registry |
//! | `cluster` | `1` | written once, kept: the store holds the cluster's data |
//! | `recovering` | `1` | written for one node timeout when `cluster` is found missing (the store restarted empty, or the cluster is new): until it expires, every live node has written its sessions again, and a session missing from the registry may still exist, so its resume is told to try again later |
//!
//! and the messages it sends between nodes are JSON: `{"want":"<session>",
//! "from":"<node>","req":N}` asks the node holding a session to hand it
//! over, and `{"stored":N,"ok":bool}` answers that the image is in the
//! store (or could not be put there); `{"deliver":"<session>","from":
//! "<node>","req":N,"enc":"json"|"msgpack"|"bytes","data":"<base64>"}` asks
//! it to send the session a message, and `{"sent":N,"id":M}` or
//! `{"sent":N,"error":"..."}` answers with the id it was given there or why
//! not.
//!
//! **Shared rooms.** Each room has a log in the store: an epoch (made
//! anew whenever the room has no log: new, emptied, or lost with the
//! store's data), offsets from 1 without gaps, the newest entries
//! (bounded by the server's history), and its members (session, the node
//! holding it, how the others see it). [`RoomCommand`]s change them
//! atomically and in the order given ([`Backplane::room_batch`]); every
//! appended entry is also delivered to the nodes that follow the room
//! ([`Backplane::room_news`]), and read back by offset
//! ([`Backplane::room_read`]). An entry's bytes are the server's
//! (`M` ...: a message) except the two the store writes itself: a join
//! announcement, `J` then the session's 32 hex digits then the member's
//! JSON, and a leave announcement, `L` then the JSON of each member that
//! left, separated by newlines. A client's publish is appended at most
//! once per (session, message id), whatever a crash makes the client send
//! again. The store keeps, for sweeping, which
//! rooms each node has members in ([`Backplane::node_rooms`]) and which
//! nodes have any ([`Backplane::room_nodes`]).
//!
//! **Synced maps.** Each open map has a record per key in the store, the
//! newest the cluster has seen ([`MapRecord`]: its stamp and value, or none
//! for a deletion). [`Backplane::map_write`] keeps a record only if its
//! stamp is greater than the one kept (at one stamp, a deletion wins), and
//! then delivers it to every node ([`Backplane::map_news`]); a node that
//! opens a map, or may have missed records, reads them all
//! ([`Backplane::map_read`]). Records merge in any order to the same map,
//! so nothing here orders them.
//!
//! This module owns the trait, its error and the records' byte form; it
//! never holds cluster logic.
//!
//! [`ServerOptions::backplane`]: crate::ServerOptions::backplane
//! [`ServerOptions::node_timeout`]: crate::ServerOptions::node_timeout
//! [`SessionImage`]: kitestring_core::server::SessionImage
//! [`SessionRecord`]: kitestring_core::server::SessionRecord

use std::time::Duration;

use futures_util::stream::BoxStream;

use crate::runtime::BoxFuture;

/// The backplane could not do what was asked (its store unreachable, a
/// command refused). The server treats it as "not now": a client whose
/// resume needed it is told to try again later, never given a new session
/// in place of one that may still exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("backplane unavailable: {0}")]
pub struct BackplaneError(pub String);

/// A shared store with expiring keys and one inbox per node: what the
/// servers of a cluster share (module docs).
///
/// Every method returns a `'static` future, so implementations clone what
/// they need (a connection handle) into it. Operations on one key are
/// atomic; nothing else is assumed of the store.
pub trait Backplane: Send + Sync + 'static {
    /// This server's name among the cluster's nodes: unique in the
    /// cluster, stable for the life of the process.
    fn node(&self) -> &str;

    /// Sets `key` to `value`, to expire after `ttl`.
    fn put(
        &self,
        key: String,
        value: Vec<u8>,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<(), BackplaneError>>;

    /// Sets every key of `entries` (key, value, time to live), in one
    /// round trip where the store allows.
    fn put_many(
        &self,
        entries: Vec<(String, Vec<u8>, Duration)>,
    ) -> BoxFuture<'static, Result<(), BackplaneError>>;

    /// What `key` holds, if it holds anything.
    fn get(&self, key: String) -> BoxFuture<'static, Result<Option<Vec<u8>>, BackplaneError>>;

    /// Removes `key` and returns what it held, atomically: of several
    /// servers taking the same key at once, one gets the value.
    fn take(&self, key: String) -> BoxFuture<'static, Result<Option<Vec<u8>>, BackplaneError>>;

    /// Removes `key` if it holds `value`, atomically; whether it did.
    fn remove_if(
        &self,
        key: String,
        value: Vec<u8>,
    ) -> BoxFuture<'static, Result<bool, BackplaneError>>;

    /// Adds `member` to the set at `key`, and makes the whole set expire
    /// after `ttl` (each node refreshes the members it wrote).
    fn add_to_set(
        &self,
        key: String,
        member: Vec<u8>,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<(), BackplaneError>>;

    /// Removes `member` from the set at `key`.
    fn remove_from_set(
        &self,
        key: String,
        member: Vec<u8>,
    ) -> BoxFuture<'static, Result<(), BackplaneError>>;

    /// Every member of the set at `key` (none if there is no such set).
    fn set_members(&self, key: String) -> BoxFuture<'static, Result<Vec<Vec<u8>>, BackplaneError>>;

    /// Sends `message` to the inbox of node `node`. Delivered if that node
    /// is listening; a message to a node that is gone is dropped (the
    /// sender waits for an answer with a timeout, so nothing depends on
    /// it silently).
    fn send(
        &self,
        node: String,
        message: Vec<u8>,
    ) -> BoxFuture<'static, Result<(), BackplaneError>>;

    /// This node's inbox: the messages other nodes send it, in the order
    /// each sender sent them, for as long as the server runs. Called once,
    /// when the server starts; an implementation reconnects on its own
    /// when its connection drops (what was sent meanwhile may be lost: the
    /// senders' timeouts cover it).
    fn inbox(&self) -> BoxStream<'static, Vec<u8>>;

    // ---- shared rooms --------------------------------------------------

    /// Carries out `commands` in order, each atomically (module docs,
    /// "Shared rooms"), keeping at most `history` entries of each room's
    /// log; one reply per command, in order. Nothing after a command that
    /// failed is carried out: `Err` means none of them may have been, or
    /// only a prefix (the store unreachable mid-way).
    fn room_batch(
        &self,
        commands: Vec<RoomCommand>,
        history: usize,
    ) -> BoxFuture<'static, Result<Vec<RoomReply>, BackplaneError>>;

    /// `room`'s log: its epoch (made, with an empty log, if the room has
    /// none), its last offset, and the entries it holds after `after`,
    /// oldest first.
    fn room_read(
        &self,
        room: String,
        after: u64,
    ) -> BoxFuture<'static, Result<RoomLog, BackplaneError>>;

    /// Each room's epoch and last offset (`None`: the room has no log), in
    /// one round trip where the store allows.
    fn room_tops(
        &self,
        rooms: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<Option<RoomTop>>, BackplaneError>>;

    /// Every member of `room`, cluster-wide.
    fn room_members(
        &self,
        room: String,
    ) -> BoxFuture<'static, Result<Vec<RoomMember>, BackplaneError>>;

    /// The rooms in which node `node` has (or had) members.
    fn node_rooms(&self, node: String) -> BoxFuture<'static, Result<Vec<String>, BackplaneError>>;

    /// Every node that has (or had) members in a room.
    fn room_nodes(&self) -> BoxFuture<'static, Result<Vec<String>, BackplaneError>>;

    /// Takes out of `room` the members node `node` held, but those whose
    /// session waits in the store for its client (a stored image) or is
    /// recorded as held by another node now (`session:{id}`: taken up
    /// there), in one atomic step; with `announce`, one entry lists them
    /// (module docs).
    /// Once none of the node's members is left in the room, the room is
    /// struck from [`node_rooms`](Self::node_rooms) of `node`.
    fn room_sweep(
        &self,
        room: String,
        node: String,
        announce: bool,
        history: usize,
    ) -> BoxFuture<'static, Result<Swept, BackplaneError>>;

    /// Strikes `node` from [`room_nodes`](Self::room_nodes) if it has no
    /// room left.
    fn forget_node(&self, node: String) -> BoxFuture<'static, Result<(), BackplaneError>>;

    /// Starts receiving `room`'s new entries in [`room_news`](Self::room_news):
    /// resolves once every entry appended after it will be received.
    fn room_follow(&self, room: String) -> BoxFuture<'static, Result<(), BackplaneError>>;

    /// Stops receiving `room`'s entries.
    fn room_unfollow(&self, room: String) -> BoxFuture<'static, Result<(), BackplaneError>>;

    /// The entries appended to the rooms this node follows, each room's in
    /// offset order, for as long as the server runs; and a
    /// [`RoomNews::Resync`] whenever some may have been missed (the
    /// connection dropped and came back, or entries came faster than they
    /// were read), after which the server reads what it lacks with
    /// [`room_read`](Self::room_read). Called once, when the server starts.
    fn room_news(&self) -> BoxStream<'static, RoomNews>;

    // ---- synced maps ---------------------------------------------------

    /// Keeps `record` if the store has no record of its key (in its room's
    /// map) or one with a smaller stamp (at one stamp, a deletion beats a
    /// value), atomically, and then delivers it to every node's
    /// [`map_news`](Self::map_news). A map holding `max_keys` keys takes
    /// no new one ([`MapKept::Full`]).
    fn map_write(
        &self,
        record: MapRecord,
        max_keys: usize,
    ) -> BoxFuture<'static, Result<MapKept, BackplaneError>>;

    /// Every record the store keeps of `room`'s map `map`.
    fn map_read(
        &self,
        room: String,
        map: String,
    ) -> BoxFuture<'static, Result<Vec<MapRecord>, BackplaneError>>;

    /// The records kept by [`map_write`](Self::map_write), this node's
    /// too, for as long as the server runs, and a [`MapNews::Resync`]
    /// whenever some may have been missed (the connection dropped, or
    /// records came faster than they were read), after which the server
    /// reads its maps again. Called once, when the server starts.
    fn map_news(&self) -> BoxStream<'static, MapNews>;
}

/// One key of a synced map as the store keeps it and nodes exchange it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapRecord {
    /// The room.
    pub room: String,
    /// The map's name.
    pub map: String,
    /// The key.
    pub key: String,
    /// The write's stamp.
    pub stamp: kitestring_core::hlc::HlcTimestamp,
    /// The value; `None`: deleted.
    pub value: Option<kitestring_core::wire::Payload>,
}

impl MapRecord {
    /// The stamp as 50 ASCII digits (physical time, logical counter, node,
    /// each zero-padded), then `1` for a deletion or `0` for a value: two
    /// records' stamps compare as these strings do, byte by byte, and at one
    /// stamp a deletion sorts after a value.
    pub fn order_key(&self) -> String {
        let s = self.stamp;
        format!(
            "{:020}{:010}{:020}{}",
            s.physical_ms,
            s.logical,
            s.node,
            u8::from(self.value.is_none())
        )
    }

    /// The record's bytes: the [`order_key`](Self::order_key), then the
    /// room, map and key each as a 4-byte big-endian length and the UTF-8
    /// bytes, then the value's kind (`j`, `m`, `b`; nothing for a
    /// deletion) and its bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.order_key().into_bytes();
        for s in [&self.room, &self.map, &self.key] {
            out.extend_from_slice(&(s.len() as u32).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        if let Some(v) = &self.value {
            out.push(match v.kind() {
                kitestring_core::wire::PayloadKind::MsgPack => b'm',
                kitestring_core::wire::PayloadKind::Binary => b'b',
                _ => b'j',
            });
            out.extend_from_slice(v.data());
        }
        out
    }

    /// Reads [`to_bytes`](Self::to_bytes)' form; `None` if it is not one.
    pub fn from_bytes(b: &[u8]) -> Option<MapRecord> {
        use kitestring_core::wire::Payload;
        let digits = std::str::from_utf8(b.get(..51)?).ok()?;
        let num = |r: std::ops::Range<usize>| digits.get(r)?.parse::<u64>().ok();
        let stamp = kitestring_core::hlc::HlcTimestamp::new(
            num(0..20)?,
            u32::try_from(num(20..30)?).ok()?,
            num(30..50)?,
        );
        let deleted = match digits.as_bytes()[50] {
            b'0' => false,
            b'1' => true,
            _ => return None,
        };
        let mut rest = &b[51..];
        let mut field = || {
            let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
            let s = std::str::from_utf8(rest.get(4..4 + len)?).ok()?.to_owned();
            rest = &rest[4 + len..];
            Some(s)
        };
        let (room, map, key) = (field()?, field()?, field()?);
        let value = match (deleted, rest.split_first()) {
            (true, None) => None,
            (false, Some((b'j', data))) => Some(Payload::json(data.to_vec()).ok()?),
            (false, Some((b'm', data))) => Some(Payload::msgpack(data.to_vec()).ok()?),
            (false, Some((b'b', data))) => Some(Payload::binary(data.to_vec())),
            _ => return None,
        };
        Some(MapRecord {
            room,
            map,
            key,
            stamp,
            value,
        })
    }
}

/// What [`Backplane::map_write`] did with a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MapKept {
    /// Kept, and delivered to every node.
    Kept,
    /// The store kept the record it had, whose stamp is not smaller.
    Stale,
    /// The map holds its most keys already: not kept.
    Full,
}

/// What the store delivers about synced maps ([`Backplane::map_news`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MapNews {
    /// A record the store kept.
    Record(MapRecord),
    /// Records may have been missed: read the maps again.
    Resync,
}

/// One atomic operation on a shared room ([`Backplane::room_batch`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RoomCommand {
    /// Appends `entry` to `room`'s log with the next offset (making the
    /// log, with a new epoch, if the room has none) and delivers it to the
    /// nodes that follow the room. Replies [`RoomReply::Appended`].
    ///
    /// With `once`, a client's publish (session hex, message id): if the
    /// room already took a publish of that session with that id or a
    /// later one (the client sent it again after a crash), nothing is
    /// appended and the reply says so.
    Append {
        /// The room.
        room: String,
        /// The entry, as the server encodes it.
        entry: Vec<u8>,
        /// The client message it comes from, appended at most once.
        once: Option<(String, u64)>,
    },
    /// Makes `session` (hex) a member of `room` held by this node, with
    /// `member` (JSON) as the others see it; a session already a member
    /// is only recorded as held here. A new member of a room holding
    /// `max_members` already is refused ([`RoomReply::Full`]). With
    /// `announce`, a new member is announced by an entry `J{session}{member}`
    /// appended as by `Append`. Replies [`RoomReply::Joined`] with every
    /// member's JSON if `snapshot`.
    Join {
        /// The room.
        room: String,
        /// The session, hex.
        session: String,
        /// How the others see it, JSON.
        member: Vec<u8>,
        /// Append an entry that announces it.
        announce: bool,
        /// Reply with every member.
        snapshot: bool,
        /// At most this many members.
        max_members: usize,
    },
    /// Takes `session` out of `room`; with `announce`, an entry
    /// `L{member}` says so. When the room has no member left, its log is
    /// dropped (a room made again gets a new epoch). With `ended` (the
    /// session is over), what the room remembers of its publishes goes
    /// too; otherwise it stays, so that a publish sent again after a crash
    /// is still taken once. Replies [`RoomReply::Left`].
    Leave {
        /// The room.
        room: String,
        /// The session, hex.
        session: String,
        /// Append an entry that says so.
        announce: bool,
        /// The session ended.
        ended: bool,
    },
}

/// What a [`RoomCommand`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RoomReply {
    /// The entry has `offset` in the log of epoch `epoch` (or, `again`,
    /// it had been appended before and nothing was: `offset` is the
    /// log's last); the room has `members` members.
    Appended {
        /// The log's epoch.
        epoch: u64,
        /// The entry's offset.
        offset: u64,
        /// Members of the room.
        members: usize,
        /// A publish taken before: not appended again.
        again: bool,
    },
    /// The session is a member; its stream starts after offset `at` of
    /// epoch `epoch` (its announcement's offset, or the last one), and
    /// `members` are every member's JSON (if asked for), as of `at`.
    Joined {
        /// The log's epoch.
        epoch: u64,
        /// Where the member's stream starts.
        at: u64,
        /// Every member's JSON.
        members: Vec<Vec<u8>>,
    },
    /// The room is full.
    Full,
    /// Whether the session was a member.
    Left {
        /// It was, and is no longer.
        removed: bool,
    },
}

/// A room's log ([`Backplane::room_read`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoomLog {
    /// Its epoch.
    pub epoch: u64,
    /// Its last offset (0: none yet).
    pub last: u64,
    /// Entries (offset, bytes), oldest first.
    pub entries: Vec<(u64, Vec<u8>)>,
}

/// Where a room's log stands ([`Backplane::room_tops`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoomTop {
    /// Its epoch.
    pub epoch: u64,
    /// Its last offset.
    pub last: u64,
}

/// A member of a shared room ([`Backplane::room_members`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomMember {
    /// Its session, hex.
    pub session: String,
    /// The node holding it.
    pub node: String,
    /// How the others see it, JSON.
    pub member: Vec<u8>,
}

/// What [`Backplane::room_sweep`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Members taken out.
    pub removed: usize,
    /// The node's members still in the room (their sessions wait in the
    /// store for their clients).
    pub remaining: usize,
}

/// What the store delivers to a node that follows rooms
/// ([`Backplane::room_news`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RoomNews {
    /// An entry appended to `room`'s log.
    Entry {
        /// The room.
        room: String,
        /// The log's epoch.
        epoch: u64,
        /// Its offset.
        offset: u64,
        /// Its bytes.
        entry: Vec<u8>,
    },
    /// Entries may have been missed: read what the rooms lack.
    Resync,
}

/// The key of a node's liveness.
pub(crate) fn node_key(node: &str) -> String {
    format!("node:{node}")
}

/// The key of where a session is.
pub(crate) fn session_key(session: kitestring_core::wire::SessionId) -> String {
    format!("session:{}", session.to_hex())
}

/// The key of the set of an identity's sessions.
pub(crate) fn identity_key(identity: &str) -> String {
    format!("identity:{identity}")
}

/// The key of a session's record (to take it up if its node is lost).
pub(crate) fn record_key(session: kitestring_core::wire::SessionId) -> String {
    format!("record:{}", session.to_hex())
}

/// The key of a session's stored image.
pub(crate) fn image_key(session: kitestring_core::wire::SessionId) -> String {
    format!("image:{}", session.to_hex())
}
