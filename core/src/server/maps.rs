//! Synced maps on the server: named, room-scoped last-writer-wins maps that
//! the server holds and every member of the room mirrors (PROTOCOL.md,
//! section 3.6).
//!
//! Owns each room's maps ([`SyncedMap`]: an [`LwwMap`] of payloads stamped
//! by hybrid-logical time, its [`MapOptions`] and its size), the server's
//! own [`Hlc`], the application's reads and writes ([`Server::map_set`],
//! [`Server::map_delete`], [`Server::open_map`], ...), the members' writes
//! (`mset` messages: membership, the map's writers, the room policy's
//! [`authorize_map_write`](crate::rooms::RoomPolicy::authorize_map_write),
//! stamping and bounds, each refusal reported to the writer by id), and what
//! members are sent: every change as an `mv` frame to each connected member
//! whose client announced [`wire::CAP_MAPS`] (the writer's copy names the
//! write it settles), and a snapshot (`ms` and one `mv` per entry) of every
//! map of a room when a member joins it and whenever one of its
//! connections opens. Frames are unsequenced: nothing is kept per member,
//! and what a lost connection missed is made good by the next snapshot.
//!
//! Maps are the application's state, not the members': they live until
//! [`Server::close_map`], whether or not the room has members. It never
//! decides membership, and never reads a clock: wall-clock time comes from
//! [`Server::set_wall_clock`].

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::hlc::{Hlc, HlcTimestamp};
use crate::lww::{Applied, LwwError, LwwMap, LwwUpdate};
use crate::reliable::{MessageId, RoomName};
use crate::rooms::Member;
use crate::time::Instant;
use crate::wire::{self, Frame, MapSnapshot, MapValue, MapWriteBody, Msg, Payload, SessionId};

use super::conn::ConnPhase;
use super::session::SessionState;
use super::{ConnectionId, MapUpdate, RoomOp, Server, ServerEvent, ServerOutput};

/// Who may write a map's entries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum MapWriters {
    /// The room's members, as the room policy allows
    /// ([`RoomPolicy::authorize_map_write`](crate::rooms::RoomPolicy::authorize_map_write)),
    /// and the application.
    #[default]
    Members,
    /// The application alone: members' writes are refused (`read_only`).
    Server,
}

/// Who stamps a map's writes, and so which of two writes wins (the
/// [`lww`](crate::lww) module's docs, "Who stamps writes").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stamping {
    /// The server stamps every write when it takes it: of two writes, the
    /// one the server took last wins. Writers' clocks do not matter.
    #[default]
    Server,
    /// Each writer stamps its own writes with its hybrid-logical clock,
    /// when it makes them: of two writes, the one made last wins, even if
    /// it reaches the server first (a write made offline and sent later
    /// loses to a newer one). A stamp further ahead of the server's clock
    /// than [`Hlc::DEFAULT_MAX_DRIFT_MS`] is refused (`clock_drift`).
    Peers,
}

/// How a synced map behaves and how large it may grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MapOptions {
    /// Who may write. Default [`MapWriters::Members`].
    pub writers: MapWriters,
    /// Who stamps writes. Default [`Stamping::Server`].
    pub stamping: Stamping,
    /// Most entries the map holds. Default 1 024; at most
    /// [`wire::MAX_MAP_ENTRIES`].
    pub max_entries: usize,
    /// Most bytes its keys and values take together. Default 256 KiB.
    pub max_bytes: usize,
}

impl Default for MapOptions {
    fn default() -> Self {
        MapOptions {
            writers: MapWriters::Members,
            stamping: Stamping::Server,
            max_entries: 1024,
            max_bytes: 256 << 10,
        }
    }
}

impl MapOptions {
    /// The defaults with `writers`.
    pub fn writers(mut self, writers: MapWriters) -> Self {
        self.writers = writers;
        self
    }

    /// The defaults with `stamping`.
    pub fn stamping(mut self, stamping: Stamping) -> Self {
        self.stamping = stamping;
        self
    }

    /// The same options with other bounds.
    pub fn bounds(mut self, max_entries: usize, max_bytes: usize) -> Self {
        self.max_entries = max_entries;
        self.max_bytes = max_bytes;
        self
    }
}

/// Why a synced-map operation was refused. Nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MapError {
    /// A room or map name that is not 1 to 256 bytes.
    #[error("a room or map name must be 1 to 256 bytes")]
    BadName,
    /// A key that is not 1 to 256 bytes.
    #[error("a key must be 1 to 256 bytes")]
    BadKey,
    /// Bounds of 0, or more entries than [`wire::MAX_MAP_ENTRIES`].
    #[error("a map's bounds must be at least 1 and at most {max} entries")]
    BadBounds {
        /// [`wire::MAX_MAP_ENTRIES`].
        max: usize,
    },
    /// No map of that name is open in the room.
    #[error("no such map")]
    NoMap,
    /// A new map past [`ServerConfig::max_maps`](crate::config::ServerConfig::max_maps).
    #[error("too many maps (at most {max})")]
    TooManyMaps {
        /// The bound.
        max: usize,
    },
    /// A new key past the map's `max_entries`.
    #[error("the map is full ({max} entries)")]
    Full {
        /// The bound.
        max: usize,
    },
    /// The write would take the map past its `max_bytes`, or the value
    /// past the server's message size limit.
    #[error("the map or the value is too large (at most {max} bytes)")]
    TooLarge {
        /// The bound that was hit.
        max: usize,
    },
    /// Values of opaque bytes cannot be map entries (JSON or MessagePack
    /// only).
    #[error("map values are JSON or MessagePack")]
    BadValue,
}

/// One map: its entries, its options and what they take.
#[derive(Debug)]
pub(super) struct SyncedMap {
    options: MapOptions,
    entries: LwwMap<Arc<str>, Payload>,
    /// Bytes of the live entries' keys and values.
    bytes: usize,
}

impl SyncedMap {
    fn new(options: MapOptions) -> SyncedMap {
        // Tombstones beside the live entries, as many again: when they run
        // out, the older half is compacted (`make_room_for_tombstone`).
        let entries = LwwMap::new(options.max_entries.saturating_mul(2))
            .with_max_tombstones(options.max_entries);
        SyncedMap {
            options,
            entries,
            bytes: 0,
        }
    }

    /// The bytes a live entry takes.
    fn size(key: &str, value: &Payload) -> usize {
        key.len() + value.len()
    }

    /// Whether writing `value` to `key` stays within the bounds.
    fn check_room(&self, key: &Arc<str>, value: Option<&Payload>) -> Result<(), MapError> {
        let old = self.entries.get(key).map(|v| Self::size(key, v));
        let Some(value) = value else {
            return Ok(());
        };
        if old.is_none() && self.entries.len() >= self.options.max_entries {
            return Err(MapError::Full {
                max: self.options.max_entries,
            });
        }
        let bytes = self.bytes - old.unwrap_or(0) + Self::size(key, value);
        if bytes > self.options.max_bytes {
            return Err(MapError::TooLarge {
                max: self.options.max_bytes,
            });
        }
        Ok(())
    }

    /// Drops the older half of the tombstones: a late write of one of
    /// those keys stamped before them is then refused as stale (the
    /// `lww` module's docs, "Tombstones and compaction"), never
    /// resurrected.
    fn make_room_for_tombstone(&mut self) {
        if self.entries.entry_count() - self.entries.len() < self.entries.max_tombstones() {
            return;
        }
        let mut stamps: Vec<HlcTimestamp> = self
            .entries
            .snapshot()
            .into_iter()
            .filter(|u| u.is_tombstone())
            .map(|u| u.ts)
            .collect();
        stamps.sort_unstable();
        if let Some(&median) = stamps.get(stamps.len() / 2) {
            self.entries.compact(median);
        }
    }

    /// Applies an update that passed the checks; the bytes follow.
    fn apply(&mut self, update: LwwUpdate<Arc<str>, Payload>) -> Result<Applied, LwwError> {
        let key = update.key.clone();
        let old = self.entries.get(&key).map(|v| Self::size(&key, v));
        if update.value.is_none() {
            self.make_room_for_tombstone();
        }
        let applied = self.entries.apply(update)?;
        if applied.changed() {
            let new = self.entries.get(&key).map(|v| Self::size(&key, v));
            self.bytes = self.bytes - old.unwrap_or(0) + new.unwrap_or(0);
        }
        Ok(applied)
    }

    /// The key's state as a frame's fields: its stamp and value (`None`:
    /// deleted, or never written).
    fn state(&self, key: &Arc<str>) -> (HlcTimestamp, Option<Payload>) {
        let stamp = self.entries.timestamp(key).unwrap_or(HlcTimestamp::MIN);
        (stamp, self.entries.get(key).cloned())
    }
}

/// Whether `name` can name a room, a map or a key: 1 to 256 bytes.
fn token_ok(name: &str) -> bool {
    !name.is_empty() && name.len() <= wire::MAX_TOKEN_LEN
}

/// A member's write, as the refusal names it.
struct Refuse {
    code: &'static str,
    reason: String,
}

impl Refuse {
    fn new(code: &'static str, reason: impl Into<String>) -> Refuse {
        Refuse {
            code,
            reason: reason.into(),
        }
    }
}

impl From<MapError> for Refuse {
    fn from(e: MapError) -> Refuse {
        let code = match e {
            MapError::BadName => "bad_map",
            MapError::BadKey => "bad_key",
            MapError::NoMap => "no_map",
            MapError::Full { .. } | MapError::TooLarge { .. } => "map_full",
            MapError::BadValue => "bad_value",
            MapError::TooManyMaps { .. } | MapError::BadBounds { .. } => "invalid",
        };
        Refuse::new(code, e.to_string())
    }
}

impl Server {
    /// Tells the machine the wall-clock time, in milliseconds since the
    /// Unix epoch, at `now`: synced maps stamp writes with it (through the
    /// server's hybrid-logical clock, so stamps never go backwards even if
    /// it does). The driver sets it when it starts and may set it again.
    /// Without it, stamps count from the machine's own time origin.
    pub fn set_wall_clock(&mut self, now: Instant, unix_ms: u64) {
        self.advance(now);
        self.wall = Some((now, unix_ms));
    }

    /// The wall-clock time at `self.now`, in milliseconds.
    fn wall_ms(&self) -> u64 {
        match self.wall {
            Some((at, ms)) => {
                ms.saturating_add(self.now.saturating_duration_since(at).as_millis() as u64)
            }
            None => self.now.as_millis(),
        }
    }

    /// The server's clock, made on first use with a node id that tells this
    /// process's stamps apart.
    fn hlc(&mut self) -> &mut Hlc {
        if self.hlc.is_none() {
            let node = self.next_epoch_of(b"hlc node", "") % wire::MAX_EPOCH;
            self.hlc = Some(Hlc::new(node));
        }
        self.hlc
            .as_mut()
            .unwrap_or_else(|| unreachable!("made above"))
    }

    /// Opens the synced map `map` of `room` (or changes who writes and
    /// who stamps an open one; its bounds and entries stay). Members of the room, now and later, get
    /// its entries and every change (PROTOCOL.md, section 3.6).
    ///
    /// Refused with [`MapError::BadName`], [`MapError::BadBounds`],
    /// [`MapError::TooManyMaps`] past
    /// [`ServerConfig::max_maps`](crate::config::ServerConfig::max_maps).
    /// In a cluster ([`Server::set_shared_rooms`]) each server opens its
    /// copy of the map and the driver loads what the cluster keeps
    /// ([`Server::map_merge`]).
    pub fn open_map(
        &mut self,
        now: Instant,
        room: &str,
        map: &str,
        options: MapOptions,
    ) -> Result<(), MapError> {
        self.advance(now);
        if !token_ok(room) || !token_ok(map) {
            return Err(MapError::BadName);
        }
        if options.max_entries == 0
            || options.max_entries > wire::MAX_MAP_ENTRIES as usize
            || options.max_bytes == 0
        {
            return Err(MapError::BadBounds {
                max: wire::MAX_MAP_ENTRIES as usize,
            });
        }
        let room_name = self.rooms.name(room);
        if let Some(open) = self.maps.get_mut(room).and_then(|m| m.get_mut(map)) {
            // Who writes and who stamps change; the bounds an open map
            // was made with stay, and so do its entries.
            open.options.writers = options.writers;
            open.options.stamping = options.stamping;
            return Ok(());
        }
        let open: usize = self.maps.values().map(BTreeMap::len).sum();
        if open >= self.config.max_maps {
            return Err(MapError::TooManyMaps {
                max: self.config.max_maps,
            });
        }
        let name: Arc<str> = Arc::from(map);
        self.maps
            .entry(room_name.clone())
            .or_default()
            .insert(name.clone(), SyncedMap::new(options));
        // Members hear of it now: an empty snapshot.
        for session in self.rooms.members(room).collect::<Vec<_>>() {
            self.map_snapshot_to(session, &room_name, Some(&name));
        }
        Ok(())
    }

    /// Closes `room`'s map `map`: its entries are dropped and the members
    /// get an empty snapshot. `false` if it was not open.
    pub fn close_map(&mut self, now: Instant, room: &str, map: &str) -> bool {
        self.advance(now);
        let Some(maps) = self.maps.get_mut(room) else {
            return false;
        };
        let Some((name, _)) = maps.remove_entry(map) else {
            return false;
        };
        if maps.is_empty() {
            self.maps.remove(room);
        }
        let room_name = self.rooms.name(room);
        let frame = Frame::MapSnapshot(MapSnapshot {
            room: room_name,
            map: name,
            entries: 0,
        });
        for session in self.rooms.members(room).collect::<Vec<_>>() {
            if let Some(c) = self.maps_connection(session) {
                self.transmit(c, &frame);
            }
        }
        true
    }

    /// Sets `key` of `room`'s map `map` to `value`, stamped by the server
    /// now, and sends the change to the room's members. Returns the stamp.
    ///
    /// Refused with [`MapError::NoMap`] if the map is not open,
    /// [`MapError::BadKey`], [`MapError::BadValue`] for opaque bytes,
    /// [`MapError::Full`] and [`MapError::TooLarge`] past its bounds.
    pub fn map_set(
        &mut self,
        now: Instant,
        room: &str,
        map: &str,
        key: &str,
        value: Payload,
    ) -> Result<HlcTimestamp, MapError> {
        self.advance(now);
        self.app_write(room, map, key, Some(value))
    }

    /// Deletes `key` of `room`'s map `map`, stamped by the server now, and
    /// sends the change to the room's members. Returns the stamp (a key
    /// that held nothing is deleted all the same: a write of it on its way
    /// with an older stamp cannot bring it back).
    pub fn map_delete(
        &mut self,
        now: Instant,
        room: &str,
        map: &str,
        key: &str,
    ) -> Result<HlcTimestamp, MapError> {
        self.advance(now);
        self.app_write(room, map, key, None)
    }

    /// The value of `key` in `room`'s map `map`.
    pub fn map_get(&self, room: &str, map: &str, key: &str) -> Option<Payload> {
        self.maps
            .get(room)?
            .get(map)?
            .entries
            .get(&Arc::<str>::from(key))
            .cloned()
    }

    /// Every entry of `room`'s map `map`, in key order; `None` if it is
    /// not open.
    pub fn map_entries(&self, room: &str, map: &str) -> Option<Vec<(Arc<str>, Payload)>> {
        let m = self.maps.get(room)?.get(map)?;
        Some(
            m.entries
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    }

    /// Every entry `room`'s map `map` holds, deletions too, as servers
    /// exchange them (for a driver that shares the map with a cluster);
    /// empty if it is not open.
    pub fn map_updates(&self, room: &str, map: &str) -> Vec<MapUpdate> {
        let Some((name, m)) = self.maps.get(room).and_then(|m| m.get_key_value(map)) else {
            return Vec::new();
        };
        let room = self.rooms.name(room);
        m.entries
            .snapshot()
            .into_iter()
            .map(|u| MapUpdate {
                room: room.clone(),
                map: name.clone(),
                key: u.key,
                stamp: u.ts,
                value: u.value,
            })
            .collect()
    }

    /// The most entries `room`'s map `map` holds, if it is open.
    pub fn map_bounds(&self, room: &str, map: &str) -> Option<usize> {
        Some(self.maps.get(room)?.get(map)?.options.max_entries)
    }

    /// Every open map: (room, map).
    pub fn open_maps(&self) -> Vec<(Arc<str>, Arc<str>)> {
        let mut all = Vec::new();
        for (room, maps) in &self.maps {
            for name in maps.keys() {
                all.push((room.clone(), name.clone()));
            }
        }
        all.sort();
        all
    }

    /// The names of `room`'s open maps.
    pub fn maps_of(&self, room: &str) -> Vec<Arc<str>> {
        self.maps
            .get(room)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn app_write(
        &mut self,
        room: &str,
        map: &str,
        key: &str,
        value: Option<Payload>,
    ) -> Result<HlcTimestamp, MapError> {
        if !token_ok(key) {
            return Err(MapError::BadKey);
        }
        if let Some(v) = &value {
            check_value(v, self.config.max_message_size)?;
        }
        let room_name = self.rooms.name(room);
        let (map_name, key) = self.map_key(room, map, key)?;
        // Every stamp the map holds went through this clock (members'
        // stamps are observed before they are taken), so this one beats
        // them all.
        let wall = self.wall_ms();
        let ts = self.hlc().now(wall);
        let m = self.map_mut(room, map)?;
        m.check_room(&key, value.as_ref())?;
        let update = LwwUpdate {
            key: key.clone(),
            value,
            ts,
        };
        match m.apply(update) {
            Ok(_) => {}
            Err(LwwError::Full { max_entries }) => return Err(MapError::Full { max: max_entries }),
            Err(_) => {
                return Err(MapError::Full {
                    max: m.options.max_entries,
                })
            }
        }
        self.map_changed(&room_name, &map_name, &key, None, None);
        self.map_to_cluster(&room_name, &map_name, &key);
        Ok(ts)
    }

    /// Shared rooms: the key's new state goes to the cluster.
    fn map_to_cluster(&mut self, room: &RoomName, map: &Arc<str>, key: &Arc<str>) {
        if !self.shared_rooms {
            return;
        }
        let Ok(m) = self.map_ref(room, map) else {
            return;
        };
        let (stamp, value) = m.state(key);
        self.outputs.push_back(ServerOutput::Map(MapUpdate {
            room: room.clone(),
            map: map.clone(),
            key: key.clone(),
            stamp,
            value,
        }));
    }

    /// Sets the node id this server stamps synced-map writes with: unique
    /// among the servers of a cluster (the driver draws it at random).
    /// Without it, one is derived from the resume secret, which the
    /// servers of a cluster share. Takes effect before the first write.
    pub fn set_map_node(&mut self, node: u64) {
        let node = node % wire::MAX_EPOCH;
        self.hlc = Some(match self.hlc.take() {
            Some(h) => Hlc::resume(node, h.last()),
            None => Hlc::new(node),
        });
    }

    /// An entry of a synced map as another server of the cluster has it
    /// (or as the cluster's store keeps it): applied here if the map is
    /// open and the stamp beats what this server has, then sent to the
    /// members here as any change is. `false` if it changed nothing (an
    /// older or known stamp, a map not open here) or did not fit the
    /// map's bounds (counted in [`ServerStats::map_merges_refused`]).
    ///
    /// [`ServerStats::map_merges_refused`]: super::ServerStats::map_merges_refused
    pub fn map_merge(&mut self, now: Instant, update: MapUpdate) -> bool {
        self.advance(now);
        let wall = self.wall_ms();
        let MapUpdate {
            room,
            map,
            key,
            stamp,
            value,
        } = update;
        let Ok(m) = self.map_ref(&room, &map) else {
            return false;
        };
        if m.entries.timestamp(&key).is_some_and(|cur| stamp <= cur) {
            return false;
        }
        // Another server's stamp: later writes here come after it, however
        // its clock runs (the cluster trusts its servers).
        {
            let hlc = self.hlc();
            let mut trusting = hlc.clone().with_max_drift_ms(u64::MAX);
            if trusting.observe(stamp, wall).is_ok() {
                *hlc = Hlc::resume(hlc.node(), trusting.last());
            }
        }
        let Ok(m) = self.map_mut(&room, &map) else {
            return false;
        };
        if m.check_room(&key, value.as_ref()).is_err() {
            self.stats.map_merges_refused += 1;
            return false;
        }
        let update = LwwUpdate {
            key: key.clone(),
            value,
            ts: stamp,
        };
        match m.apply(update) {
            Ok(a) if a.changed() => {}
            Ok(_) => return false,
            Err(_) => {
                self.stats.map_merges_refused += 1;
                return false;
            }
        }
        let room = self.rooms.name(&room);
        let (map, key) = match self.map_key(&room, &map, &key) {
            Ok(names) => names,
            Err(_) => return false,
        };
        self.map_changed(&room, &map, &key, None, None);
        true
    }

    fn map_ref(&self, room: &str, map: &str) -> Result<&SyncedMap, MapError> {
        self.maps
            .get(room)
            .and_then(|m| m.get(map))
            .ok_or(MapError::NoMap)
    }

    fn map_mut(&mut self, room: &str, map: &str) -> Result<&mut SyncedMap, MapError> {
        self.maps
            .get_mut(room)
            .and_then(|m| m.get_mut(map))
            .ok_or(MapError::NoMap)
    }

    /// The map's shared name and the key, shared with the map when it holds
    /// it already.
    fn map_key(&self, room: &str, map: &str, key: &str) -> Result<(Arc<str>, Arc<str>), MapError> {
        let maps = self.maps.get(room).ok_or(MapError::NoMap)?;
        let (name, m) = maps.get_key_value(map).ok_or(MapError::NoMap)?;
        // Shared with the entry when the map holds the key, live or not.
        let key = match m.entries.update_for(&Arc::<str>::from(key)) {
            Some(u) => u.key,
            None => Arc::from(key),
        };
        Ok((name.clone(), key))
    }

    /// A member's `mset`, delivered in order: checked, stamped, applied and
    /// sent to the members, or refused by id.
    pub(super) fn on_map_write(&mut self, session: SessionId, m: &Msg, room: RoomName) {
        let name = self.rooms.name(&room);
        if let Err(refuse) = self.member_write(session, m, &name) {
            self.emit(ServerEvent::Refused {
                session,
                room: name.clone(),
                op: RoomOp::MapWrite,
                reason: refuse.reason.clone(),
            });
            let id = MessageId(m.id);
            self.refuse_msg(
                session,
                m.seq,
                id,
                Some(name),
                "mset",
                refuse.code,
                refuse.reason,
            );
        }
        self.process_evictions();
    }

    fn member_write(&mut self, session: SessionId, m: &Msg, room: &RoomName) -> Result<(), Refuse> {
        if !self.rooms.is_member(room, session) {
            return Err(Refuse::new("not_member", "not a member of the room"));
        }
        let body = MapWriteBody::from_payload(&m.payload)
            .map_err(|e| Refuse::new(e.reason(), e.to_string()))?;
        if let Some(v) = &body.value {
            check_value(v, self.config.max_message_size)?;
        }
        let options = self.map_ref(room, &body.map)?.options;
        if options.writers == MapWriters::Server {
            return Err(Refuse::new("read_only", "only the server writes this map"));
        }
        let member = self
            .member_of(session)
            .unwrap_or_else(|| Member::new(crate::wire::ClientId([0; 16]), None));
        self.policy
            .authorize_map_write(&member, room, &body.map, &body.key)
            .map_err(|reason| Refuse::new("forbidden", reason))?;
        let (map_name, key) = self.map_key(room, &body.map, &body.key)?;
        let wall = self.wall_ms();
        let ts = match options.stamping {
            Stamping::Server => self.hlc().now(wall),
            Stamping::Peers => {
                let Some(stamp) = body.stamp else {
                    return Err(Refuse::new(
                        "stamp_required",
                        "this map takes writes stamped by their writers",
                    ));
                };
                self.hlc()
                    .observe(stamp, wall)
                    .map_err(|e| Refuse::new("clock_drift", e.to_string()))?;
                stamp
            }
        };
        let sm = self.map_mut(room, &map_name)?;
        // A write that loses changes nothing and so needs no room: only
        // one that would win is held to the bounds.
        let wins = sm.entries.timestamp(&key).is_none_or(|cur| ts > cur);
        if wins {
            sm.check_room(&key, body.value.as_ref())?;
        }
        let update = LwwUpdate {
            key: key.clone(),
            value: body.value,
            ts,
        };
        let changed = match sm.apply(update) {
            Ok(applied) => applied.changed(),
            Err(LwwError::Full { max_entries }) => {
                return Err(MapError::Full { max: max_entries }.into())
            }
            Err(e) => return Err(Refuse::new("map_full", e.to_string())),
        };
        let writer = Some((session, m.id));
        if changed {
            self.map_changed(room, &map_name, &key, Some(session), writer);
            self.map_to_cluster(room, &map_name, &key);
        } else if let Some(c) = self.maps_connection(session) {
            // Lost to a newer write: the writer learns what the key holds.
            let (stamp, value) = self.map_ref(room, &map_name)?.state(&key);
            let frame = Frame::MapValue(MapValue {
                room: room.clone(),
                map: map_name,
                key,
                stamp,
                value,
                settles: Some(m.id),
            });
            self.transmit(c, &frame);
        }
        Ok(())
    }

    /// A key changed: the application hears of it, and every connected
    /// member that takes maps gets the key's new state; the writer's copy
    /// names the write it settles.
    fn map_changed(
        &mut self,
        room: &RoomName,
        map: &Arc<str>,
        key: &Arc<str>,
        by: Option<SessionId>,
        writer: Option<(SessionId, u64)>,
    ) {
        let Ok(m) = self.map_ref(room, map) else {
            return;
        };
        let (stamp, value) = m.state(key);
        self.stats.map_writes += 1;
        self.emit(ServerEvent::MapChanged {
            room: room.clone(),
            map: map.clone(),
            key: key.clone(),
            value: value.clone(),
            by,
        });
        let mut frame = MapValue {
            room: room.clone(),
            map: map.clone(),
            key: key.clone(),
            stamp,
            value,
            settles: None,
        };
        for session in self.rooms.members(room).collect::<Vec<_>>() {
            let Some(c) = self.maps_connection(session) else {
                continue;
            };
            frame.settles = writer.filter(|(s, _)| *s == session).map(|(_, id)| id);
            self.transmit(c, &Frame::MapValue(frame.clone()));
        }
    }

    /// The connection on which `session` takes map frames now, if any.
    fn maps_connection(&self, session: SessionId) -> Option<ConnectionId> {
        let SessionState::Attached(c) = self.sessions.get(&session)?.state else {
            return None;
        };
        match self.conns.get(&c).map(|c| &c.phase) {
            Some(ConnPhase::Open { maps: true, .. }) => Some(c),
            _ => None,
        }
    }

    /// A session's connection opened: a snapshot of every map of every
    /// room it is in.
    pub(super) fn maps_snapshot(&mut self, session: SessionId) {
        let Some(s) = self.sessions.get(&session) else {
            return;
        };
        let rooms: Vec<RoomName> = s
            .rooms
            .iter()
            .filter(|j| self.maps.contains_key(&j.room))
            .map(|j| j.room.clone())
            .collect();
        for room in rooms {
            self.map_snapshot_to(session, &room, None);
        }
    }

    /// `session` joined `room`: a snapshot of each of the room's maps.
    pub(super) fn maps_joined(&mut self, session: SessionId, room: &RoomName) {
        if self.maps.contains_key(room) {
            self.map_snapshot_to(session, room, None);
        }
    }

    /// Sends `session` a snapshot of `room`'s map `only`, or of each of
    /// its maps: an `ms` naming how many entries follow, then one `mv`
    /// per entry, oldest stamp first.
    fn map_snapshot_to(&mut self, session: SessionId, room: &RoomName, only: Option<&Arc<str>>) {
        let Some(c) = self.maps_connection(session) else {
            return;
        };
        let Some(maps) = self.maps.get(room) else {
            return;
        };
        let mut frames = Vec::new();
        for (name, m) in maps.iter() {
            if only.is_some_and(|o| o != name) {
                continue;
            }
            let entries: Vec<_> = m.entries.snapshot();
            let live: Vec<_> = entries.into_iter().filter(|u| !u.is_tombstone()).collect();
            frames.push(Frame::MapSnapshot(MapSnapshot {
                room: room.clone(),
                map: name.clone(),
                entries: live.len() as u64,
            }));
            for u in live {
                frames.push(Frame::MapValue(MapValue {
                    room: room.clone(),
                    map: name.clone(),
                    key: u.key,
                    stamp: u.ts,
                    value: u.value,
                    settles: None,
                }));
            }
        }
        self.stats.map_snapshots += 1;
        for f in &frames {
            self.transmit(c, f);
        }
    }
}

/// Whether `value` can be a map entry's value.
fn check_value(value: &Payload, max: usize) -> Result<(), MapError> {
    if value.kind() == wire::PayloadKind::Binary {
        return Err(MapError::BadValue);
    }
    if value.len() > max {
        return Err(MapError::TooLarge { max });
    }
    Ok(())
}
