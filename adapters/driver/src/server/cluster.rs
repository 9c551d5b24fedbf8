//! A server among others: what it keeps in the [`Backplane`] and how
//! sessions move between nodes.
//!
//! Owns [`Cluster`]: this node's liveness key, the registry of where each
//! session it holds is (written outside the lock by the cluster task,
//! coalesced per session, so the queue of pending writes is bounded by the
//! sessions the core holds), the claim that a node runs before a resuming
//! `hello` for a session it does not hold (`claim`), the answer to
//! another node's claim (`hand_over_one`), and the hand-over of every
//! session when the server shuts down (`hand_over_all`). Images are
//! MessagePack ([`SessionImage`] with serde).
//!
//! Its promise: a session is never answered `unknown_session` while
//! another node may hold it. When the backplane or the node holding the
//! session does not answer, the claim fails and the client is told to try
//! again later (503, or in-band 4429), keeping its session. It never runs
//! under the server's lock across an `.await`, and never holds cluster
//! logic in the backplane.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_channel::oneshot;
use futures_util::task::AtomicWaker;
use futures_util::StreamExt;
use kitestring_core::server::{SessionImage, SessionRecord};
use kitestring_core::wire::SessionId;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use base64::Engine as _;
use kitestring_core::wire::{Payload, PayloadKind};

use crate::backplane::{identity_key, image_key, node_key, record_key, session_key, Backplane};
use crate::util;

use super::shared::{FxHashMap, ServerShared};
use super::shared_rooms::SharedRooms;

/// A pending write to the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Location {
    /// The session is here.
    Here,
    /// The session left (ended or moved): forget it if the registry still
    /// says it is here.
    Gone,
}

/// What a claim found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Claimed {
    /// The session was imported: run the `hello`.
    Imported,
    /// No node holds it: run the `hello` (the core answers
    /// `unknown_session`).
    Nowhere,
}

/// The claim could not be settled: the client must try again later.
#[derive(Debug)]
pub(super) struct ClaimFailed(pub(super) String);

/// Messages between nodes (module docs of `crate::backplane`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum NodeMessage {
    Want {
        want: String,
        from: String,
        req: u64,
    },
    Stored {
        stored: u64,
        ok: bool,
    },
    Deliver {
        deliver: String,
        from: String,
        req: u64,
        enc: String,
        data: String,
    },
    Sent {
        sent: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

/// An answer from another node.
#[derive(Debug)]
enum Reply {
    Stored(bool),
    Sent(Result<u64, String>),
}

/// Where a session is, as the cluster's registry says.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionLocation {
    /// The session.
    pub session: SessionId,
    /// The node that holds it.
    pub node: String,
    /// Whether that node is alive (a node that crashed keeps its entries
    /// until they expire).
    pub alive: bool,
}

/// A message sent to a session wherever it is ([`ServerHandle::send_to`]).
///
/// [`ServerHandle::send_to`]: super::ServerHandle::send_to
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SentTo {
    /// The node that holds the session and queued the message: its
    /// application hears the message's fate (`Acked`, or the id among a
    /// `SessionEnded`'s unconfirmed).
    pub node: String,
    /// The id the message was given there.
    pub id: kitestring_core::reliable::MessageId,
}

/// This node's part of the cluster.
pub(super) struct Cluster {
    pub(super) backplane: Arc<dyn Backplane>,
    node: String,
    node_timeout: Duration,
    /// How long a registry entry lives without a refresh.
    location_ttl: Duration,
    next_request: AtomicU64,
    /// Requests waiting for another node's answer.
    waiting: Mutex<FxHashMap<u64, oneshot::Sender<Reply>>>,
    /// The identity of each session this node holds or just let go, for
    /// the identity index.
    identities: Mutex<FxHashMap<SessionId, String>>,
    /// Images exported and not yet in the store: a claim for one of them
    /// stores it first.
    unstored: Mutex<FxHashMap<SessionId, Vec<u8>>>,
    /// Registry writes not yet made, latest per session.
    updates: Mutex<FxHashMap<SessionId, Location>>,
    /// The cluster task, to write `updates`.
    task: AtomicWaker,
    /// A registry write failed: the next one writes every session.
    stale: std::sync::atomic::AtomicBool,
    /// Rooms shared with the other nodes.
    pub(super) rooms: SharedRooms,
    /// Synced maps shared with the other nodes.
    pub(super) maps: super::shared_maps::SharedMaps,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Cluster {
    pub(super) fn new(
        backplane: Arc<dyn Backplane>,
        node_timeout: Duration,
        grace: Duration,
    ) -> Cluster {
        Cluster {
            node: backplane.node().to_owned(),
            backplane,
            node_timeout,
            location_ttl: (grace * 2).max(Duration::from_secs(600)),
            next_request: AtomicU64::new(1),
            waiting: Mutex::new(HashMap::default()),
            identities: Mutex::new(HashMap::default()),
            unstored: Mutex::new(HashMap::default()),
            updates: Mutex::new(HashMap::default()),
            task: AtomicWaker::new(),
            stale: std::sync::atomic::AtomicBool::new(false),
            rooms: SharedRooms::new(),
            maps: super::shared_maps::SharedMaps::new(),
        }
    }

    /// Records a registry write for the cluster task (under the server's
    /// lock: only map inserts).
    pub(super) fn note(&self, session: SessionId, location: Location, identity: Option<&str>) {
        if let Some(identity) = identity {
            lock(&self.identities).insert(session, identity.to_owned());
        }
        lock(&self.updates).insert(session, location);
        self.task.wake();
    }

    /// Takes `session` from wherever it is and imports it here, before a
    /// `hello` that resumes it runs.
    pub(super) async fn claim(
        &self,
        shared: &ServerShared,
        session: SessionId,
    ) -> Result<Claimed, ClaimFailed> {
        let bp = &self.backplane;
        let failed = |e: crate::backplane::BackplaneError| ClaimFailed(e.0);
        if let Some(image) = bp.take(image_key(session)).await.map_err(failed)? {
            return self.import(shared, session, &image).await;
        }
        let Some(owner) = bp.get(session_key(session)).await.map_err(failed)? else {
            // Unknown, unless the store lost its data a moment ago and the
            // node holding it has not written it again yet.
            if self.recovering().await.map_err(failed)? {
                return Err(ClaimFailed("the backplane is recovering its data".into()));
            }
            return Ok(Claimed::Nowhere);
        };
        let owner = String::from_utf8_lossy(&owner).into_owned();
        if owner == self.node {
            // The registry says here, and the core does not hold it: an
            // image on its way to the store, or a session of this node's
            // previous process, which crashed (a session that ended here
            // took its record with it).
            let unstored = lock(&self.unstored).remove(&session);
            if let Some(image) = unstored {
                return self.import(shared, session, &image).await;
            }
            return self.recover(shared, session).await;
        }
        if bp.get(node_key(&owner)).await.map_err(failed)?.is_none() {
            // The node that held it is gone (crashed): take it up from its
            // record; the client's hello brings the numbers.
            debug!(session = %session, node = %owner, "the node that held the session is gone; taking it up");
            return self.recover(shared, session).await;
        }
        let req = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting).insert(req, tx);
        let ask = NodeMessage::Want {
            want: session.to_hex(),
            from: self.node.clone(),
            req,
        };
        let sent = bp.send(owner.clone(), to_json(&ask)).await;
        let answer = match sent {
            Ok(()) => {
                util::timeout(&*shared.runtime, shared.options.handshake_timeout / 2, rx).await
            }
            Err(e) => {
                lock(&self.waiting).remove(&req);
                return Err(failed(e));
            }
        };
        lock(&self.waiting).remove(&req);
        match answer {
            Some(Ok(Reply::Stored(true))) => {}
            Some(Ok(Reply::Stored(false))) => {
                return Err(ClaimFailed(format!(
                    "node {owner} could not store the session"
                )))
            }
            _ => return Err(ClaimFailed(format!("node {owner} did not answer"))),
        }
        if let Some(image) = bp.take(image_key(session)).await.map_err(failed)? {
            return self.import(shared, session, &image).await;
        }
        // The node did not hold it. If the registry still names that node,
        // the session belonged to its previous process (it crashed and
        // came back under its name): take it up from its record, which a
        // session that ended took with it. If it names another node now,
        // the session moved meanwhile: the client tries again.
        let now_at = bp.get(session_key(session)).await.map_err(failed)?;
        match now_at {
            Some(n) if n == owner.as_bytes() => self.recover(shared, session).await,
            Some(_) => Err(ClaimFailed("the session moved meanwhile".into())),
            None => Ok(Claimed::Nowhere),
        }
    }

    /// Whether the store lost its data within the last node timeout (the
    /// `cluster` marker gone, or the `recovering` key it leaves still
    /// there): every live node writes its sessions again within that time,
    /// so until then a session missing from the registry may exist.
    async fn recovering(&self) -> Result<bool, crate::backplane::BackplaneError> {
        let bp = &self.backplane;
        if bp.get(RECOVERING.into()).await?.is_some() {
            return Ok(true);
        }
        if bp.get(CLUSTER.into()).await?.is_some() {
            return Ok(false);
        }
        self.mark_recovering().await?;
        Ok(true)
    }

    /// The store lost its data (or the cluster is new): a node timeout
    /// during which a session missing from the registry may still exist.
    async fn mark_recovering(&self) -> Result<(), crate::backplane::BackplaneError> {
        self.backplane
            .put_many(vec![
                (RECOVERING.into(), b"1".to_vec(), self.node_timeout),
                (CLUSTER.into(), b"1".to_vec(), MARKER_TTL),
            ])
            .await
    }

    /// Takes up a session whose node is gone, from its record.
    async fn recover(
        &self,
        shared: &ServerShared,
        session: SessionId,
    ) -> Result<Claimed, ClaimFailed> {
        let failed = |e: crate::backplane::BackplaneError| ClaimFailed(e.0);
        let Some(bytes) = self
            .backplane
            .get(record_key(session))
            .await
            .map_err(failed)?
        else {
            return Ok(Claimed::Nowhere);
        };
        let record: SessionRecord = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                warn!(session = %session, error = %e, "a session record does not read");
                return Ok(Claimed::Nowhere);
            }
        };
        // Its rooms' copies here first: a resumed member recovers from them.
        let rooms = record.rooms().map(str::to_owned).collect();
        if !self.rooms.open(shared, rooms).await {
            return Err(ClaimFailed(
                "the session's rooms cannot be opened here now".into(),
            ));
        }
        match shared.run(None, |st, now| st.server.recover_session(now, &record)) {
            Ok(_) => self.rooms.adopt(session),
            Err(kitestring_core::server::ImportError::Exists(_)) => {}
            Err(e) => {
                warn!(session = %session, error = %e, "a session could not be taken up");
                return Ok(Claimed::Nowhere);
            }
        }
        self.taken_here(session).await
    }

    /// A session claimed here: recorded as here before its `hello` runs,
    /// so that a node asked for it next finds it here.
    async fn taken_here(&self, session: SessionId) -> Result<Claimed, ClaimFailed> {
        let _ = self
            .backplane
            .put(
                session_key(session),
                self.node.clone().into_bytes(),
                self.location_ttl,
            )
            .await;
        Ok(Claimed::Imported)
    }

    /// Imports an image taken from the store, and records that the session
    /// is here before its `hello` runs.
    async fn import(
        &self,
        shared: &ServerShared,
        session: SessionId,
        bytes: &[u8],
    ) -> Result<Claimed, ClaimFailed> {
        let image: SessionImage = match rmp_serde::from_slice(bytes) {
            Ok(image) => image,
            Err(e) => {
                warn!(session = %session, error = %e, "a stored session image does not read; the session is lost");
                return Ok(Claimed::Nowhere);
            }
        };
        let rooms = image.rooms().map(str::to_owned).collect();
        if !self.rooms.open(shared, rooms).await {
            // The image goes back where it was taken from, for the next
            // try; if it cannot, the session is imported all the same (its
            // rooms' copies are opened when the store answers, and its
            // members told where their streams stand then).
            let put = self
                .backplane
                .put(image_key(session), bytes.to_vec(), image.grace_left())
                .await;
            if put.is_ok() {
                return Err(ClaimFailed(
                    "the session's rooms cannot be opened here now".into(),
                ));
            }
        }
        let imported = shared.run(None, |st, now| st.server.import_session(now, &image));
        match imported {
            Ok(_) => self.rooms.adopt(session),
            Err(kitestring_core::server::ImportError::Exists(_)) => {}
            Err(e) => {
                warn!(
                    session = %session,
                    error = %e,
                    unconfirmed = ?image.unconfirmed(),
                    "a session could not be imported; its messages are lost"
                );
                return Ok(Claimed::Nowhere);
            }
        }
        self.taken_here(session).await
    }

    /// Another node wants `session`: exports it (if here), stores the
    /// image and answers. An image that cannot be stored goes back into
    /// this server, and the answer says so.
    async fn hand_over_one(
        &self,
        shared: &ServerShared,
        session: SessionId,
        from: String,
        req: u64,
    ) {
        let Ok(exported) = self.export_settled(shared, session).await else {
            // Its room operations did not settle: not handed over now (the
            // claimer tells its client to try again later).
            let answer = NodeMessage::Stored {
                stored: req,
                ok: false,
            };
            if let Err(e) = self.backplane.send(from, to_json(&answer)).await {
                debug!(error = %e, "could not answer a claim");
            }
            return;
        };
        let bytes = match exported {
            Some(image) => match rmp_serde::to_vec_named(&image) {
                Ok(bytes) => Some((bytes, image.grace_left())),
                Err(e) => {
                    warn!(error = %e, "a session image does not serialize");
                    None
                }
            },
            None => {
                let unstored = lock(&self.unstored).get(&session).cloned();
                unstored.map(|b| (b, self.location_ttl))
            }
        };
        let ok = match bytes {
            Some((bytes, ttl)) => {
                lock(&self.unstored).insert(session, bytes.clone());
                match self
                    .backplane
                    .put(image_key(session), bytes.clone(), ttl)
                    .await
                {
                    Ok(()) => {
                        lock(&self.unstored).remove(&session);
                        true
                    }
                    Err(e) => {
                        warn!(session = %session, error = %e, "could not store a session image; keeping the session");
                        lock(&self.unstored).remove(&session);
                        if let Ok(image) = rmp_serde::from_slice::<SessionImage>(&bytes) {
                            let _ =
                                shared.run(None, |st, now| st.server.import_session(now, &image));
                        }
                        false
                    }
                }
            }
            None => true, // not here: the claimer finds nothing, rightly
        };
        let answer = NodeMessage::Stored { stored: req, ok };
        if let Err(e) = self.backplane.send(from, to_json(&answer)).await {
            debug!(error = %e, "could not answer a claim");
        }
    }

    /// Exports `session` once none of its room operations waits for the
    /// backplane: an image cannot carry one half done (it would count the
    /// client's message as delivered while the room never got it). `Err`
    /// if they did not settle within half the handshake timeout.
    async fn export_settled(
        &self,
        shared: &ServerShared,
        session: SessionId,
    ) -> Result<Option<SessionImage>, ()> {
        let give_up = shared.runtime.now() + shared.options.handshake_timeout / 2;
        loop {
            let exported = shared.run(None, |st, now| {
                if st.server.room_ops_pending(session) {
                    return Err(());
                }
                // Messages the application is still handling: a moment for
                // it to finish, or the other node's application is given
                // them again.
                if st.server.unhandled_messages(session) > 0 && shared.runtime.now() < give_up {
                    return Err(());
                }
                Ok(st.server.export_session(now, session))
            });
            match exported {
                Ok(image) => return Ok(image),
                Err(()) if shared.runtime.now() >= give_up => return Err(()),
                Err(()) => util::sleep(&*shared.runtime, Duration::from_millis(5)).await,
            }
        }
    }

    /// Shutdown: every session exported and stored, so that its client
    /// resumes on another node. Sessions whose image cannot be stored are
    /// put back, and end with the process as without a backplane.
    pub(super) async fn hand_over_all(&self, shared: &ServerShared) -> usize {
        // Room operations on their way first (the core's queue drained,
        // bounded by the handshake timeout).
        let give_up = shared.runtime.now() + shared.options.handshake_timeout;
        while shared.runtime.now() < give_up
            && shared.run(None, |st, _| {
                st.server.session_ids().into_iter().any(|id| {
                    st.server.room_ops_pending(id) || st.server.unhandled_messages(id) > 0
                })
            })
        {
            util::sleep(&*shared.runtime, Duration::from_millis(5)).await;
        }
        // A session whose room operations still wait (the backplane does
        // not answer) stays, and ends with the process: its client hears
        // of its messages as unconfirmed rather than acknowledged and lost.
        let images: Vec<(SessionId, Vec<u8>, Duration)> = shared.run(None, |st, now| {
            let ids: Vec<SessionId> = st
                .server
                .session_ids()
                .into_iter()
                .filter(|id| !st.server.room_ops_pending(*id))
                .collect();
            ids.into_iter()
                .filter_map(|id| st.server.export_session(now, id))
                .filter_map(|image| {
                    let id = image.session()?;
                    let bytes = rmp_serde::to_vec_named(&image).ok()?;
                    Some((id, bytes, image.grace_left()))
                })
                .collect()
        });
        {
            let mut unstored = lock(&self.unstored);
            for (id, bytes, _) in &images {
                unstored.insert(*id, bytes.clone());
            }
        }
        let count = images.len();
        if count == 0 {
            return 0;
        }
        let entries = images
            .iter()
            .map(|(id, bytes, ttl)| (image_key(*id), bytes.clone(), *ttl))
            .collect();
        match self.backplane.put_many(entries).await {
            Ok(()) => {
                let mut unstored = lock(&self.unstored);
                for (id, _, _) in &images {
                    unstored.remove(id);
                }
                debug!(sessions = count, "sessions handed over");
                count
            }
            Err(e) => {
                warn!(error = %e, sessions = count, "could not hand sessions over; they end with this process");
                let back: Vec<_> = {
                    let mut unstored = lock(&self.unstored);
                    images
                        .iter()
                        .filter_map(|(id, _, _)| unstored.remove(id))
                        .collect()
                };
                shared.run(None, |st, now| {
                    for bytes in back {
                        if let Ok(image) = rmp_serde::from_slice::<SessionImage>(&bytes) {
                            let _ = st.server.import_session(now, &image);
                        }
                    }
                });
                0
            }
        }
    }

    /// Writes pending registry updates; with `refresh`, also every
    /// session this node holds, so none expires while it lives.
    async fn write_registry(&self, shared: &ServerShared, refresh: bool) {
        let updates: Vec<(SessionId, Location)> = lock(&self.updates).drain().collect();
        let mut puts: Vec<(String, Vec<u8>, Duration)> = Vec::new();
        let mut here: Vec<SessionId> = Vec::new();
        for (session, location) in updates {
            match location {
                Location::Here => here.push(session),
                Location::Gone => {
                    let ours = self
                        .backplane
                        .remove_if(session_key(session), self.node.clone().into_bytes())
                        .await;
                    if matches!(ours, Ok(true)) {
                        // Its record goes with it: nothing to take up.
                        let _ = self.backplane.take(record_key(session)).await;
                    }
                    let identity = lock(&self.identities).remove(&session);
                    if let Some(identity) = identity {
                        let member = session.to_hex().into_bytes();
                        let _ = self
                            .backplane
                            .remove_from_set(identity_key(&identity), member)
                            .await;
                    }
                }
            }
        }
        // This node's liveness key gone before its time: the store lost
        // its data (Redis restarted empty). After a failed write the store
        // may be missing any of them. Either way, everything is written
        // again.
        let bp = &self.backplane;
        let lost = match bp.get(node_key(&self.node)).await {
            Ok(None) => true,
            Ok(Some(_)) => false,
            Err(_) => {
                self.stale.store(true, Ordering::Relaxed);
                return;
            }
        };
        if matches!(bp.get(CLUSTER.into()).await, Ok(None)) {
            let _ = self.mark_recovering().await;
        }
        if refresh || lost || self.stale.load(Ordering::Relaxed) {
            if lost {
                debug!("the backplane lost this node's keys; writing them again");
                // Its room memberships may be gone too (taken out as a
                // node that is gone, or lost with the store's data).
                self.rooms.mark_dirty();
            }
            here = shared.run(None, |st, _| st.server.session_ids());
        }
        puts.push((node_key(&self.node), b"1".to_vec(), self.node_timeout));
        let records: Vec<(SessionId, Vec<u8>)> = shared.run(None, |st, _| {
            here.iter()
                .filter_map(|&s| {
                    let record = st.server.session_record(s)?;
                    Some((s, serde_json::to_vec(&record).ok()?))
                })
                .collect()
        });
        // Only the sessions still here (one may have moved since it was
        // noted): where each is, and its record.
        here = records.iter().map(|(s, _)| *s).collect();
        for (session, record) in records {
            puts.push((
                session_key(session),
                self.node.clone().into_bytes(),
                self.location_ttl,
            ));
            puts.push((record_key(session), record, self.location_ttl));
        }
        let identities: Vec<(String, SessionId)> = {
            let known = lock(&self.identities);
            here.iter()
                .filter_map(|s| known.get(s).map(|i| (i.clone(), *s)))
                .collect()
        };
        for (identity, session) in identities {
            if let Err(e) = bp
                .add_to_set(
                    identity_key(&identity),
                    session.to_hex().into_bytes(),
                    self.location_ttl,
                )
                .await
            {
                self.stale.store(true, Ordering::Relaxed);
                debug!(error = %e, "backplane unavailable; registry writes wait");
                return;
            }
        }
        match bp.put_many(puts).await {
            Ok(()) => self.stale.store(false, Ordering::Relaxed),
            Err(e) => {
                self.stale.store(true, Ordering::Relaxed);
                debug!(error = %e, "backplane unavailable; registry writes wait");
            }
        }
    }

    fn answer(&self, req: u64, reply: Reply) {
        if let Some(tx) = lock(&self.waiting).remove(&req) {
            let _ = tx.send(reply);
        }
    }

    /// Where `session` is, if the registry knows.
    pub(super) async fn locate(
        &self,
        session: SessionId,
    ) -> Result<Option<SessionLocation>, crate::backplane::BackplaneError> {
        let Some(node) = self.backplane.get(session_key(session)).await? else {
            return Ok(None);
        };
        let node = String::from_utf8_lossy(&node).into_owned();
        let alive = node == self.node || self.backplane.get(node_key(&node)).await?.is_some();
        Ok(Some(SessionLocation {
            session,
            node,
            alive,
        }))
    }

    /// Every session of `identity` the registry knows, wherever it is.
    pub(super) async fn sessions_of(
        &self,
        identity: &str,
    ) -> Result<Vec<SessionLocation>, crate::backplane::BackplaneError> {
        let members = self.backplane.set_members(identity_key(identity)).await?;
        let mut found = Vec::with_capacity(members.len());
        for m in members {
            let Some(session) = std::str::from_utf8(&m).ok().and_then(SessionId::from_hex) else {
                continue;
            };
            if let Some(location) = self.locate(session).await? {
                found.push(location);
            }
        }
        found.sort_by_key(|l| l.session.0);
        Ok(found)
    }

    /// Asks `node` to send `session` a message; the id it was given there.
    pub(super) async fn deliver_remote(
        &self,
        shared: &ServerShared,
        node: &str,
        session: SessionId,
        payload: &Payload,
    ) -> Result<u64, String> {
        let req = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting).insert(req, tx);
        let ask = NodeMessage::Deliver {
            deliver: session.to_hex(),
            from: self.node.clone(),
            req,
            enc: match payload.kind() {
                PayloadKind::MsgPack => "msgpack",
                PayloadKind::Binary => "bytes",
                _ => "json",
            }
            .into(),
            data: b64().encode(payload.data()),
        };
        if let Err(e) = self.backplane.send(node.to_owned(), to_json(&ask)).await {
            lock(&self.waiting).remove(&req);
            return Err(e.to_string());
        }
        let answer = util::timeout(&*shared.runtime, shared.options.handshake_timeout, rx).await;
        lock(&self.waiting).remove(&req);
        match answer {
            Some(Ok(Reply::Sent(r))) => r,
            _ => Err(format!("node {node} did not answer")),
        }
    }

    /// Another node asks this one to send `session` a message.
    async fn deliver_here(
        &self,
        shared: &ServerShared,
        session: SessionId,
        enc: &str,
        data: &str,
        from: String,
        req: u64,
    ) {
        let payload = b64()
            .decode(data)
            .map_err(|_| "payload is not base64".to_owned())
            .and_then(|bytes| match enc {
                "json" => Payload::json(bytes).map_err(|e| e.to_string()),
                "msgpack" => Payload::msgpack(bytes).map_err(|e| e.to_string()),
                "bytes" => Ok(Payload::binary(bytes)),
                _ => Err("unknown encoding".to_owned()),
            });
        let result = payload.and_then(|payload| {
            shared
                .run(None, |st, now| st.server.send(now, session, payload))
                .map(|id| id.0)
                .map_err(|e| e.to_string())
        });
        let answer = match result {
            Ok(id) => NodeMessage::Sent {
                sent: req,
                id: Some(id),
                error: None,
            },
            Err(error) => NodeMessage::Sent {
                sent: req,
                id: None,
                error: Some(error),
            },
        };
        if let Err(e) = self.backplane.send(from, to_json(&answer)).await {
            debug!(error = %e, "could not answer a delivery");
        }
    }
}

/// The key whose presence says the store has the cluster's data.
const CLUSTER: &str = "cluster";
/// The key that says the store lost its data less than a node timeout ago.
const RECOVERING: &str = "recovering";
/// The marker's life: as long as the store keeps it.
const MARKER_TTL: Duration = Duration::from_secs(10 * 365 * 86_400);

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn to_json(m: &NodeMessage) -> Vec<u8> {
    serde_json::to_vec(m).unwrap_or_default()
}

/// The cluster task: this node's liveness, the registry, and its inbox.
pub(super) fn spawn(shared: Arc<ServerShared>) {
    let Some(cluster) = shared.cluster.clone() else {
        return;
    };
    // The inbox: each claim is answered in a task of its own, so one slow
    // store write does not hold the others up.
    let inbox_shared = shared.clone();
    let inbox_cluster = cluster.clone();
    shared.runtime.spawn(Box::pin(async move {
        let mut inbox = inbox_cluster.backplane.inbox();
        while let Some(message) = inbox.next().await {
            match serde_json::from_slice::<NodeMessage>(&message) {
                Ok(NodeMessage::Want { want, from, req }) => {
                    let Some(session) = SessionId::from_hex(&want) else {
                        continue;
                    };
                    let shared = inbox_shared.clone();
                    let cluster = inbox_cluster.clone();
                    inbox_shared.runtime.spawn(Box::pin(async move {
                        cluster.hand_over_one(&shared, session, from, req).await;
                    }));
                }
                Ok(NodeMessage::Stored { stored, ok }) => {
                    inbox_cluster.answer(stored, Reply::Stored(ok))
                }
                Ok(NodeMessage::Deliver {
                    deliver,
                    from,
                    req,
                    enc,
                    data,
                }) => {
                    let Some(session) = SessionId::from_hex(&deliver) else {
                        continue;
                    };
                    let shared = inbox_shared.clone();
                    let cluster = inbox_cluster.clone();
                    inbox_shared.runtime.spawn(Box::pin(async move {
                        cluster
                            .deliver_here(&shared, session, &enc, &data, from, req)
                            .await;
                    }));
                }
                Ok(NodeMessage::Sent { sent, id, error }) => {
                    let r = match (id, error) {
                        (Some(id), _) => Ok(id),
                        (None, e) => Err(e.unwrap_or_else(|| "refused".into())),
                    };
                    inbox_cluster.answer(sent, Reply::Sent(r))
                }
                Err(e) => debug!(error = %e, "an unreadable message between nodes"),
            }
            if inbox_shared.lock().stopped {
                break;
            }
        }
    }));
    super::shared_rooms::spawn(
        shared.clone(),
        cluster.backplane.clone(),
        cluster.node_timeout,
    );
    super::shared_maps::spawn(shared.clone(), cluster.backplane.clone());
    // Liveness and the registry: every third of the node timeout, and at
    // once when sessions open, move or end.
    shared.runtime.clone().spawn(Box::pin(async move {
        let beat = cluster.node_timeout / 3;
        let refresh_every = cluster.location_ttl / 3;
        let mut refreshed = shared.runtime.now();
        cluster.write_registry(&shared, true).await;
        loop {
            let next = shared.runtime.now() + beat;
            let mut timer = shared.runtime.new_timer(next);
            std::future::poll_fn(|cx| {
                cluster.task.register(cx.waker());
                if !lock(&cluster.updates).is_empty() {
                    return std::task::Poll::Ready(());
                }
                timer.as_mut().poll(cx)
            })
            .await;
            if shared.lock().stopped {
                break;
            }
            let now = shared.runtime.now();
            let refresh = now >= refreshed + refresh_every;
            if refresh {
                refreshed = now;
            }
            cluster.write_registry(&shared, refresh).await;
        }
    }));
}
