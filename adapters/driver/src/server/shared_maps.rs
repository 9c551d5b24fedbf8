//! Synced maps shared by the servers of a cluster.
//!
//! Owns [`SharedMaps`]: the entries this server changed that the
//! [`Backplane`] has not kept yet (a bounded queue, written in order by the
//! maps task, retried while the store does not answer), the maps opened
//! here that still have to be read from the store, and the task that
//! carries both out and merges what the store delivers
//! ([`Backplane::map_news`]) into the core ([`Server::map_merge`]). Records
//! merge in any order to the same map (last writer wins by stamp), so a
//! record delivered twice, late or after a newer one changes nothing; one
//! that may have been missed is read again: after every
//! [`MapNews::Resync`], every open map is read whole.
//!
//! It never decides who may write or what wins: the core does. It never
//! holds the server's lock across an `.await`.
//!
//! [`Server::map_merge`]: kitestring_core::server::Server::map_merge

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use futures_util::task::AtomicWaker;
use futures_util::StreamExt;
use kitestring_core::server::MapUpdate;
use tracing::{debug, warn};

use crate::backplane::{Backplane, MapKept, MapNews, MapRecord};

use super::shared::ServerShared;

/// Changes waiting for the store at most; past it, they are dropped and
/// every open map is written whole once the store answers again.
pub(super) const MAX_PENDING_MAP_WRITES: usize = 65_536;

/// How long the maps task waits before trying the store again.
const RETRY: Duration = Duration::from_millis(500);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// This server's side of the cluster's synced maps.
pub(super) struct SharedMaps {
    /// Changes made here, in order, not yet kept by the store.
    pending: Mutex<VecDeque<MapUpdate>>,
    /// `pending` overflowed: every open map goes to the store whole.
    write_all: AtomicBool,
    /// Maps opened here, to read from the store.
    loads: Mutex<Vec<(String, String)>>,
    /// Records may have been missed: read every open map again.
    read_all: AtomicBool,
    task: AtomicWaker,
}

impl SharedMaps {
    pub(super) fn new() -> SharedMaps {
        SharedMaps {
            pending: Mutex::new(VecDeque::new()),
            write_all: AtomicBool::new(false),
            loads: Mutex::new(Vec::new()),
            read_all: AtomicBool::new(false),
            task: AtomicWaker::new(),
        }
    }

    /// A change made here: to the store, in order.
    pub(super) fn push(&self, update: MapUpdate) {
        {
            let mut q = lock(&self.pending);
            if q.len() >= MAX_PENDING_MAP_WRITES {
                if !self.write_all.swap(true, Ordering::Relaxed) {
                    warn!("too many synced-map changes wait for the backplane: every map will be written whole");
                }
                q.clear();
            } else {
                q.push_back(update);
            }
        }
        self.task.wake();
    }

    /// A map opened here: read what the cluster has of it.
    pub(super) fn load(&self, room: &str, map: &str) {
        lock(&self.loads).push((room.to_owned(), map.to_owned()));
        self.task.wake();
    }

    fn has_work(&self) -> bool {
        !lock(&self.pending).is_empty()
            || !lock(&self.loads).is_empty()
            || self.write_all.load(Ordering::Relaxed)
            || self.read_all.load(Ordering::Relaxed)
    }
}

fn record(u: &MapUpdate) -> MapRecord {
    MapRecord {
        room: u.room.to_string(),
        map: u.map.to_string(),
        key: u.key.to_string(),
        stamp: u.stamp,
        value: u.value.clone(),
    }
}

fn update(r: MapRecord) -> MapUpdate {
    MapUpdate {
        room: r.room.into(),
        map: r.map.into(),
        key: r.key.into(),
        stamp: r.stamp,
        value: r.value,
    }
}

/// The most keys the store takes for a map: its entries and as many
/// deletions, as the server's own copy holds.
fn max_keys(shared: &ServerShared, room: &str, map: &str) -> usize {
    shared
        .lock()
        .server
        .map_bounds(room, map)
        .map_or(0, |max_entries| max_entries.saturating_mul(2))
}

/// Starts the maps task (with a backplane only).
pub(super) fn spawn(shared: Arc<ServerShared>, bp: Arc<dyn Backplane>) {
    let Some(cluster) = shared.cluster.clone() else {
        return;
    };
    let runtime = shared.runtime.clone();
    runtime.spawn(Box::pin(async move {
        let maps = &cluster.maps;
        let mut news = Some(bp.map_news());
        let mut retry_at: Option<std::time::Instant> = None;
        loop {
            let mut timer = retry_at.map(|at| shared.runtime.new_timer(at));
            let item = std::future::poll_fn(|cx| {
                maps.task.register(cx.waker());
                if let Some(n) = news.as_mut() {
                    if let Poll::Ready(item) = n.poll_next_unpin(cx) {
                        return Poll::Ready(Some(item));
                    }
                }
                // Waiting to try the store again, or for work.
                let ready = match timer.as_mut() {
                    Some(t) => t.as_mut().poll(cx).is_ready(),
                    None => maps.has_work(),
                };
                if ready {
                    Poll::Ready(None)
                } else {
                    Poll::Pending
                }
            })
            .await;
            if shared.lock().stopped && !maps.has_work() {
                break;
            }
            match item {
                Some(Some(MapNews::Record(r))) => merge(&shared, r),
                Some(Some(MapNews::Resync)) => {
                    debug!("synced-map records may have been missed: reading the maps again");
                    maps.read_all.store(true, Ordering::Relaxed);
                }
                Some(None) => {
                    warn!("the backplane stopped delivering synced-map records");
                    news = None;
                }
                None => {}
            }
            retry_at = match work(&shared, maps, &*bp).await {
                Ok(()) => None,
                Err(e) => {
                    debug!(error = %e, "synced maps wait for the backplane");
                    Some(shared.runtime.now() + RETRY)
                }
            };
        }
    }));
}

/// Merges a record into the core, which sends what changed to the members
/// here.
fn merge(shared: &ServerShared, r: MapRecord) {
    let u = update(r);
    shared.run(None, |st, now| {
        st.server.map_merge(now, u);
    });
}

/// Writes what waits, reads what must be read; stops at the first failure
/// (what is left stays for the next try).
async fn work(
    shared: &ServerShared,
    maps: &SharedMaps,
    bp: &dyn Backplane,
) -> Result<(), crate::BackplaneError> {
    if maps.write_all.swap(false, Ordering::Relaxed) {
        let open = shared.lock().server.open_maps();
        for (room, map) in open {
            let all = shared.lock().server.map_updates(&room, &map);
            let max = max_keys(shared, &room, &map);
            for u in &all {
                if let Err(e) = bp.map_write(record(u), max).await {
                    maps.write_all.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
    }
    loop {
        let Some(next) = lock(&maps.pending).front().cloned() else {
            break;
        };
        let max = max_keys(shared, &next.room, &next.map);
        let kept = bp.map_write(record(&next), max).await?;
        if kept == MapKept::Full {
            // This server's copy holds what the others cannot take: said
            // rather than retried for ever.
            warn!(room = %next.room, map = %next.map, "the cluster's store holds the most keys of a synced map: a change stays on this server");
        }
        lock(&maps.pending).pop_front();
    }
    let mut reads: Vec<(String, String)> = std::mem::take(&mut *lock(&maps.loads));
    if maps.read_all.swap(false, Ordering::Relaxed) {
        let open = shared.lock().server.open_maps();
        reads.extend(
            open.into_iter()
                .map(|(r, m)| (r.to_string(), m.to_string())),
        );
        reads.sort();
        reads.dedup();
    }
    while let Some((room, map)) = reads.pop() {
        match bp.map_read(room.clone(), map.clone()).await {
            Ok(records) => {
                for r in records {
                    merge(shared, r);
                }
            }
            Err(e) => {
                reads.push((room, map));
                lock(&maps.loads).extend(reads);
                return Err(e);
            }
        }
    }
    Ok(())
}
