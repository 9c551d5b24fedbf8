//! A Redis backplane for Kitestring servers: several server processes
//! share their sessions, so a client resumes on whichever node it reaches
//! and a node that shuts down for a deploy hands its sessions over.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use kitestring::{ServerConfig, ServerOptions};
//! use kitestring::kitestring_core::config::ResumeSecret;
//!
//! let backplane = kitestring_redis::RedisBackplane::connect("redis://127.0.0.1:6379", "node-a").await?;
//! let options = ServerOptions {
//!     // Every node of the cluster shares the secret that makes resume keys.
//!     config: ServerConfig {
//!         resume_secret: ResumeSecret(*b"sixteen byte key"),
//!         ..ServerConfig::default()
//!     },
//!     backplane: Some(Arc::new(backplane)),
//!     ..ServerOptions::default()
//! };
//! let (server, events) = kitestring::bind(kitestring_tokio::runtime(), "127.0.0.1:9000".parse()?, options)?;
//! # Ok(()) }
//! ```
//!
//! This crate owns [`RedisBackplane`], the [`Backplane`] on Redis (5 or
//! later; `GETDEL` needs 6.2): keys are strings with a prefix
//! (`kitestring:` unless [`RedisBackplane::with_prefix`] says otherwise)
//! set with `PX` expiries, `take` is `GETDEL` (one taker wins), `remove_if`
//! a compare-and-delete script, sets are Redis sets (`SADD` with
//! `PEXPIRE`, `SREM`, `SMEMBERS`), and each node's inbox a pub/sub channel
//! `{prefix}inbox:{node}` on a RESP3 connection that reconnects and
//! subscribes again by itself. Shared rooms are Lua scripts over a hash,
//! a stream and a channel per room (the `rooms` module: one script per
//! batch, so a batch is one round trip and each operation atomic), their
//! notifications arriving on a second RESP3 connection that subscribes to
//! the rooms the node follows (at most [`ROOM_NEWS_CAPACITY`] waiting to
//! be read; past that, and after that connection drops, the server is told
//! to read the logs). Synced maps are a hash per map
//! (`{prefix}map:{room length}:{room}:{map}`, one field per key holding its
//! record) written by a compare-and-set script that publishes each kept
//! record on `{prefix}maps`, which every node reads on a connection of its
//! own. Scripts compute the keys they touch, so this is for
//! one Redis server (with replicas if you like), not Redis Cluster. It
//! also owns [`testing`], which starts a
//! private `redis-server` for tests and benchmarks. It holds no cluster
//! logic: what is kept and when is the server's (`kitestring::backplane`).
//!
//! Both of the `redis` crate's runtimes are built in by default (features
//! `tokio` and `smol`; async-std servers use `smol`): a server on tokio
//! talks to Redis on tokio, any other on smol's reactor.

use std::sync::Arc;
use std::time::Duration;

use futures_channel::mpsc;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use kitestring::backplane::{
    MapKept, MapNews, MapRecord, RoomCommand, RoomLog, RoomMember, RoomNews, RoomReply, RoomTop,
    Swept,
};
use kitestring::runtime::BoxFuture;
use kitestring::{Backplane, BackplaneError};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{PushKind, Value};

mod rooms;
pub mod testing;

/// Messages an inbox holds before newer ones are dropped (a node that does
/// not keep up with its inbox; the senders' timeouts cover the loss).
pub const INBOX_CAPACITY: usize = 4096;

/// Entries one log read returns at most (a room's history is bounded by
/// the server's `HistoryConfig`, 1 024 entries by default).
const READ_LIMIT: usize = 65_536;

/// How long a command may take before it counts as failed.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A [`Backplane`] on one Redis server (or anything speaking its protocol,
/// such as Valkey).
#[derive(Clone)]
pub struct RedisBackplane {
    node: Arc<str>,
    prefix: Arc<str>,
    url: Arc<str>,
    commands: ConnectionManager,
    remove_if: Arc<redis::Script>,
    /// Shared rooms: the scripts, and the connection rooms' entries are
    /// published to.
    scripts: Arc<Scripts>,
    rooms: Arc<RoomChannels>,
}

struct Scripts {
    batch: redis::Script,
    read: redis::Script,
    sweep: redis::Script,
    forget: redis::Script,
    map_write: redis::Script,
}

/// The RESP3 connection subscribed to the rooms this node follows, and
/// what it pushes, until [`Backplane::room_news`] takes it.
struct RoomChannels {
    manager: ConnectionManager,
    pushed: std::sync::Mutex<Option<mpsc::Receiver<Pushed>>>,
}

/// Entries pushed before they are read; past it, a resync.
pub const ROOM_NEWS_CAPACITY: usize = 65_536;

/// A Redis URL asking for RESP3 (pushes on an ordinary connection).
fn resp3(url: &str) -> String {
    if url.contains("protocol=") {
        url.to_string()
    } else if url.contains('?') {
        format!("{url}&protocol=resp3")
    } else {
        format!("{url}?protocol=resp3")
    }
}

impl std::fmt::Debug for RedisBackplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackplane")
            .field("node", &self.node)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: redis::RedisError) -> BackplaneError {
    BackplaneError(e.to_string())
}

/// A connection that reconnects by itself, with short timeouts: a command
/// to an unreachable Redis fails in seconds, never hangs.
fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500))
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
}

impl RedisBackplane {
    /// Connects to the Redis at `url` (`redis://host:port/db`) as node
    /// `node`, a name unique in the cluster.
    pub async fn connect(
        url: &str,
        node: impl Into<String>,
    ) -> Result<RedisBackplane, BackplaneError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let commands = ConnectionManager::new_with_config(client, manager_config())
            .await
            .map_err(unavailable)?;
        let (tx, rx) = mpsc::channel::<Pushed>(ROOM_NEWS_CAPACITY);
        let sender = std::sync::Mutex::new(tx);
        let config = manager_config()
            .set_automatic_resubscription()
            .set_push_sender(move |push: redis::PushInfo| {
                let pushed = match push.kind {
                    PushKind::Message => {
                        let mut data = push.data.into_iter();
                        match (data.next(), data.next()) {
                            (Some(Value::BulkString(channel)), Some(Value::BulkString(p))) => {
                                Pushed::Room(channel, p)
                            }
                            _ => return Ok::<(), ()>(()),
                        }
                    }
                    PushKind::Disconnection => Pushed::Lost,
                    _ => return Ok(()),
                };
                let mut tx = sender.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = tx.try_send(pushed) {
                    if e.is_full() {
                        // Read what was missed once the reader catches up.
                        tx.try_send(Pushed::Lost).ok();
                        OVERFLOWED.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                Ok(())
            });
        let client = redis::Client::open(resp3(url).as_str()).map_err(unavailable)?;
        let manager = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(unavailable)?;
        Ok(RedisBackplane {
            scripts: Arc::new(Scripts {
                batch: rooms::script(rooms::BATCH),
                read: rooms::script(rooms::READ),
                sweep: rooms::script(rooms::SWEEP),
                forget: rooms::script(rooms::FORGET),
                map_write: redis::Script::new(MAP_WRITE),
            }),
            rooms: Arc::new(RoomChannels {
                manager,
                pushed: std::sync::Mutex::new(Some(rx)),
            }),
            node: node.into().into(),
            prefix: "kitestring:".into(),
            url: url.into(),
            commands,
            remove_if: Arc::new(redis::Script::new(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                   return redis.call('DEL', KEYS[1]) \
                 else return 0 end",
            )),
        })
    }

    /// The same backplane with every key and channel under `prefix`
    /// (several clusters, or other data, in one Redis).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> RedisBackplane {
        self.prefix = prefix.into().into();
        self
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn inbox_channel(&self, node: &str) -> String {
        format!("{}inbox:{node}", self.prefix)
    }

    fn room_channel(&self, room: &str) -> String {
        format!("{}room:{room}", self.prefix)
    }

    /// The hash of a synced map: the room's length first, so that no two
    /// (room, map) pairs share one.
    fn map_key(&self, room: &str, map: &str) -> String {
        format!("{}map:{}:{room}:{map}", self.prefix, room.len())
    }

    fn maps_channel(&self) -> String {
        format!("{}maps", self.prefix)
    }
}

/// Keeps a synced map's record if its order key (the first 51 bytes of
/// the record: stamp digits, then 1 for a deletion) beats the kept one's,
/// and publishes it; 0 if the kept one stays, -1 if the map is full.
const MAP_WRITE: &str = r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  if string.sub(cur, 1, 51) >= string.sub(ARGV[2], 1, 51) then return 0 end
elseif redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  return -1
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 1
"#;

/// Records a map read returns at most.
const MAP_READ_LIMIT: usize = 1 << 17;

/// The room news channel overflowed (entries dropped: a resync follows).
static OVERFLOWED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Milliseconds for `PX`: at least 1 (Redis refuses 0).
fn px(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Backplane for RedisBackplane {
    fn node(&self) -> &str {
        &self.node
    }

    fn put(
        &self,
        key: String,
        value: Vec<u8>,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<(), BackplaneError>> {
        let mut c = self.commands.clone();
        let key = self.key(&key);
        Box::pin(async move {
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("PX")
                .arg(px(ttl))
                .query_async::<()>(&mut c)
                .await
                .map_err(unavailable)
        })
    }

    fn put_many(
        &self,
        entries: Vec<(String, Vec<u8>, Duration)>,
    ) -> BoxFuture<'static, Result<(), BackplaneError>> {
        let mut c = self.commands.clone();
        let mut pipe = redis::pipe();
        for (key, value, ttl) in entries {
            pipe.cmd("SET")
                .arg(self.key(&key))
                .arg(value)
                .arg("PX")
                .arg(px(ttl))
                .ignore();
        }
        Box::pin(async move { pipe.query_async::<()>(&mut c).await.map_err(unavailable) })
    }

    fn get(&self, key: String) -> BoxFuture<'static, Result<Option<Vec<u8>>, BackplaneError>> {
        let mut c = self.commands.clone();
        let key = self.key(&key);
        Box::pin(async move {
            redis::cmd("GET")
                .arg(key)
                .query_async::<Option<Vec<u8>>>(&mut c)
                .await
                .map_err(unavailable)
        })
    }

    fn take(&self, key: String) -> BoxFuture<'static, Result<Option<Vec<u8>>, BackplaneError>> {
        let mut c = self.commands.clone();
        let key = self.key(&key);
        Box::pin(async move {
            redis::cmd("GETDEL")
                .arg(key)
                .query_async::<Option<Vec<u8>>>(&mut c)
                .await
                .map_err(unavailable)
        })
    }

    fn remove_if(
        &self,
        key: String,
        value: Vec<u8>,
    ) -> BoxFuture<'static, Result<bool, BackplaneError>> {
        let mut c = self.commands.clone();
        let key = self.key(&key);
        let script = self.remove_if.clone();
        Box::pin(async move {
            let removed: i64 = script
                .key(key)
                .arg(value)
                .invoke_async(&mut c)
                .await
                .map_err(unavailable)?;
            Ok(removed == 1)
        })
    }

    fn add_to_set(
        &self,
        key: String,
        member: Vec<u8>,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<(), BackplaneError>> {
        let mut c = self.commands.clone();
        let key = self.key(&key);
        let mut pipe = redis::pipe();
        pipe.cmd("SADD").arg(&key).arg(member).ignore();
        pipe.cmd("PEXPIRE").arg(&key).arg(px(ttl)).ignore();
        Box::pin(async move { pipe.query_async::<()>(&mut c).await.map_err(unavailable) })
    }

    fn remove_from_set(
        &self,
        key: String,
        member: Vec<u8>,
    ) -> BoxFuture<'static, Result<(), BackplaneError>> {
        let mut c = self.commands.clone();
        let key = self.key(&key);
        Box::pin(async move {
            redis::cmd("SREM")
                .arg(key)
                .arg(member)
                .query_async::<i64>(&mut c)
                .await
                .map(|_| ())
                .map_err(unavailable)
        })
    }

    fn set_members(&self, key: String) -> BoxFuture<'static, Result<Vec<Vec<u8>>, BackplaneError>> {
        let mut c = self.commands.clone();
        let key = self.key(&key);
        Box::pin(async move {
            redis::cmd("SMEMBERS")
                .arg(key)
                .query_async::<Vec<Vec<u8>>>(&mut c)
                .await
                .map_err(unavailable)
        })
    }

    fn send(
        &self,
        node: String,
        message: Vec<u8>,
    ) -> BoxFuture<'static, Result<(), BackplaneError>> {
        let mut c = self.commands.clone();
        let channel = self.inbox_channel(&node);
        Box::pin(async move {
            redis::cmd("PUBLISH")
                .arg(channel)
                .arg(message)
                .query_async::<i64>(&mut c)
                .await
                .map(|_| ())
                .map_err(unavailable)
        })
    }

    fn inbox(&self) -> BoxStream<'static, Vec<u8>> {
        let channel = self.inbox_channel(&self.node);
        subscribed(self.url.clone(), channel, INBOX_CAPACITY, "inbox")
            .filter_map(|s| async move {
                match s {
                    Subscribed::Message(m) => Some(m),
                    // Senders' timeouts cover what was lost.
                    Subscribed::Again => None,
                }
            })
            .boxed()
    }

    fn map_write(
        &self,
        record: MapRecord,
        max_keys: usize,
    ) -> BoxFuture<'static, Result<MapKept, BackplaneError>> {
        let mut c = self.commands.clone();
        let script = self.scripts.map_write.clone();
        let keys = [self.map_key(&record.room, &record.map), self.maps_channel()];
        Box::pin(async move {
            let kept: i64 = script
                .key(&keys[0])
                .key(&keys[1])
                .arg(record.key.as_bytes())
                .arg(record.to_bytes())
                .arg(max_keys)
                .invoke_async(&mut c)
                .await
                .map_err(unavailable)?;
            Ok(match kept {
                1 => MapKept::Kept,
                0 => MapKept::Stale,
                _ => MapKept::Full,
            })
        })
    }

    fn map_read(
        &self,
        room: String,
        map: String,
    ) -> BoxFuture<'static, Result<Vec<MapRecord>, BackplaneError>> {
        let mut c = self.commands.clone();
        let key = self.map_key(&room, &map);
        Box::pin(async move {
            let mut records = Vec::new();
            let mut cursor = 0u64;
            loop {
                // (cursor, [(field, record)]).
                type Scan = (u64, Vec<(Vec<u8>, Vec<u8>)>);
                let (next, fields): Scan = redis::cmd("HSCAN")
                    .arg(&key)
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut c)
                    .await
                    .map_err(unavailable)?;
                for (_, value) in fields {
                    match MapRecord::from_bytes(&value) {
                        Some(r) if r.room == room && r.map == map => records.push(r),
                        _ => {
                            tracing::warn!(%room, %map, "an unreadable map record in the backplane")
                        }
                    }
                }
                if next == 0 || records.len() >= MAP_READ_LIMIT {
                    break;
                }
                cursor = next;
            }
            Ok(records)
        })
    }

    fn map_news(&self) -> BoxStream<'static, MapNews> {
        subscribed(
            self.url.clone(),
            self.maps_channel(),
            ROOM_NEWS_CAPACITY,
            "maps",
        )
        .filter_map(|s| async move {
            match s {
                Subscribed::Message(m) => match MapRecord::from_bytes(&m) {
                    Some(r) => Some(MapNews::Record(r)),
                    None => {
                        tracing::warn!("an unreadable map record on the backplane");
                        None
                    }
                },
                Subscribed::Again => Some(MapNews::Resync),
            }
        })
        .boxed()
    }

    fn room_batch(
        &self,
        commands: Vec<RoomCommand>,
        history: usize,
    ) -> BoxFuture<'static, Result<Vec<RoomReply>, BackplaneError>> {
        let mut c = self.commands.clone();
        let scripts = self.scripts.clone();
        let prefix = self.prefix.clone();
        let node = self.node.clone();
        Box::pin(async move {
            if commands.is_empty() {
                return Ok(Vec::new());
            }
            let n = commands.len();
            let mut invocation = scripts.batch.prepare_invoke();
            invocation.arg(&*prefix).arg(history.max(1)).arg(&*node);
            for a in rooms::batch_args(&commands) {
                invocation.arg(a);
            }
            let v: Value = invocation.invoke_async(&mut c).await.map_err(unavailable)?;
            rooms::batch_replies(v, n)
        })
    }

    fn room_read(
        &self,
        room: String,
        after: u64,
    ) -> BoxFuture<'static, Result<RoomLog, BackplaneError>> {
        let mut c = self.commands.clone();
        let scripts = self.scripts.clone();
        let prefix = self.prefix.clone();
        Box::pin(async move {
            let v: Value = scripts
                .read
                .arg(&*prefix)
                .arg(room)
                .arg(after)
                .arg(READ_LIMIT)
                .invoke_async(&mut c)
                .await
                .map_err(unavailable)?;
            rooms::read_reply(v)
        })
    }

    fn room_tops(
        &self,
        rooms: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<Option<RoomTop>>, BackplaneError>> {
        let mut c = self.commands.clone();
        let mut pipe = redis::pipe();
        for room in &rooms {
            pipe.cmd("HMGET")
                .arg(self.key(&format!("room:{room}:meta")))
                .arg("epoch")
                .arg("top");
        }
        Box::pin(async move {
            if rooms.is_empty() {
                return Ok(Vec::new());
            }
            let tops: Vec<(Option<u64>, Option<u64>)> =
                pipe.query_async(&mut c).await.map_err(unavailable)?;
            Ok(tops
                .into_iter()
                .map(|(e, t)| {
                    Some(RoomTop {
                        epoch: e?,
                        last: t.unwrap_or(0),
                    })
                })
                .collect())
        })
    }

    fn room_members(
        &self,
        room: String,
    ) -> BoxFuture<'static, Result<Vec<RoomMember>, BackplaneError>> {
        let mut c = self.commands.clone();
        let key = self.key(&format!("room:{room}:members"));
        Box::pin(async move {
            let v: Value = redis::cmd("HGETALL")
                .arg(key)
                .query_async(&mut c)
                .await
                .map_err(unavailable)?;
            rooms::members_reply(v)
        })
    }

    fn node_rooms(&self, node: String) -> BoxFuture<'static, Result<Vec<String>, BackplaneError>> {
        let members = self.set_members(format!("node-rooms:{node}"));
        Box::pin(async move {
            Ok(members
                .await?
                .into_iter()
                .map(|r| String::from_utf8_lossy(&r).into_owned())
                .collect())
        })
    }

    fn room_nodes(&self) -> BoxFuture<'static, Result<Vec<String>, BackplaneError>> {
        let members = self.set_members("room-nodes".into());
        Box::pin(async move {
            Ok(members
                .await?
                .into_iter()
                .map(|r| String::from_utf8_lossy(&r).into_owned())
                .collect())
        })
    }

    fn room_sweep(
        &self,
        room: String,
        node: String,
        announce: bool,
        history: usize,
    ) -> BoxFuture<'static, Result<Swept, BackplaneError>> {
        let mut c = self.commands.clone();
        let scripts = self.scripts.clone();
        let prefix = self.prefix.clone();
        Box::pin(async move {
            let v: Value = scripts
                .sweep
                .arg(&*prefix)
                .arg(room)
                .arg(node)
                .arg(if announce { "1" } else { "0" })
                .arg(history.max(1))
                .invoke_async(&mut c)
                .await
                .map_err(unavailable)?;
            rooms::sweep_reply(v)
        })
    }

    fn forget_node(&self, node: String) -> BoxFuture<'static, Result<(), BackplaneError>> {
        let mut c = self.commands.clone();
        let scripts = self.scripts.clone();
        let prefix = self.prefix.clone();
        Box::pin(async move {
            scripts
                .forget
                .arg(&*prefix)
                .arg(node)
                .invoke_async::<i64>(&mut c)
                .await
                .map(|_| ())
                .map_err(unavailable)
        })
    }

    fn room_follow(&self, room: String) -> BoxFuture<'static, Result<(), BackplaneError>> {
        let mut m = self.rooms.manager.clone();
        let channel = self.room_channel(&room);
        Box::pin(async move { m.subscribe(channel).await.map_err(unavailable) })
    }

    fn room_unfollow(&self, room: String) -> BoxFuture<'static, Result<(), BackplaneError>> {
        let mut m = self.rooms.manager.clone();
        let channel = self.room_channel(&room);
        Box::pin(async move { m.unsubscribe(channel).await.map_err(unavailable) })
    }

    fn room_news(&self) -> BoxStream<'static, RoomNews> {
        let rx = self
            .rooms
            .pushed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(rx) = rx else {
            tracing::error!("room news taken twice: the second reader gets nothing");
            return futures_util::stream::empty().boxed();
        };
        let manager = self.rooms.manager.clone();
        let prefix = format!("{}room:", self.prefix).into_bytes();
        futures_util::stream::unfold((rx, manager), move |(mut rx, mut manager)| {
            let prefix = prefix.clone();
            async move {
                loop {
                    match rx.next().await? {
                        Pushed::Room(channel, payload) => {
                            let Some(room) = channel.strip_prefix(prefix.as_slice()) else {
                                continue;
                            };
                            let Some((epoch, offset, entry)) = rooms::parse_published(&payload)
                            else {
                                tracing::warn!("an unreadable room entry on the backplane");
                                continue;
                            };
                            let room = String::from_utf8_lossy(room).into_owned();
                            let news = RoomNews::Entry {
                                room,
                                epoch,
                                offset,
                                entry,
                            };
                            return Some((news, (rx, manager)));
                        }
                        Pushed::Message(_) => continue,
                        Pushed::Lost => {
                            if !OVERFLOWED.swap(false, std::sync::atomic::Ordering::Relaxed) {
                                // The connection dropped: the manager
                                // reconnects (and subscribes again) on the
                                // next command.
                                while redis::cmd("PING")
                                    .query_async::<()>(&mut manager)
                                    .await
                                    .is_err()
                                {
                                    sleep(Duration::from_millis(500)).await;
                                }
                                tracing::debug!("room channels subscribed again");
                            }
                            return Some((RoomNews::Resync, (rx, manager)));
                        }
                    }
                }
            }
        })
        .boxed()
    }
}

/// What [`subscribed`] yields.
enum Subscribed {
    /// A message published on the channel.
    Message(Vec<u8>),
    /// Messages may have been lost (the connection dropped and subscribed
    /// again, or more came than were read); what comes next is live.
    Again,
}

/// A RESP3 connection of its own subscribed to `channel`, as a stream of
/// what is published there for as long as it is read; at most `capacity`
/// wait to be read (past it, and after the connection drops, `Again`,
/// once it is subscribed again). The connection manager subscribes again
/// after it reconnects.
fn subscribed(
    url: Arc<str>,
    channel: String,
    capacity: usize,
    what: &'static str,
) -> BoxStream<'static, Subscribed> {
    let (tx, rx) = mpsc::channel::<Pushed>(capacity);
    let overflowed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = overflowed.clone();
    let subscribe = async move {
        let url = resp3(&url);
        let sender = std::sync::Mutex::new(tx);
        let config = manager_config()
            .set_automatic_resubscription()
            .set_push_sender(move |push: redis::PushInfo| {
                let pushed = match push.kind {
                    PushKind::Message => match push.data.into_iter().nth(1) {
                        // [channel, payload]
                        Some(Value::BulkString(payload)) => Pushed::Message(payload),
                        _ => return Ok::<(), ()>(()),
                    },
                    PushKind::Disconnection => Pushed::Lost,
                    _ => return Ok(()),
                };
                let mut tx = sender.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = tx.try_send(pushed) {
                    if e.is_full() && !flag.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::warn!(what, "backplane channel full: messages were dropped");
                    }
                }
                Ok(())
            });
        let manager = async {
            let client = redis::Client::open(url.as_str())?;
            let mut manager = ConnectionManager::new_with_config(client, config).await?;
            manager.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(manager)
        };
        match manager.await {
            Ok(manager) => Some(manager),
            Err(e) => {
                tracing::error!(error = %e, what, "cannot subscribe to a backplane channel");
                None
            }
        }
    };
    // The manager lives as long as the stream does.
    type Subscribe = BoxFuture<'static, Option<ConnectionManager>>;
    enum State {
        Start(Subscribe, mpsc::Receiver<Pushed>),
        Running(mpsc::Receiver<Pushed>, Option<ConnectionManager>),
    }
    let start = State::Start(Box::pin(subscribe), rx);
    futures_util::stream::unfold(start, move |state| {
        let overflowed = overflowed.clone();
        async move {
            let (mut rx, mut keep) = match state {
                State::Start(subscribe, rx) => (rx, subscribe.await),
                State::Running(rx, keep) => (rx, keep),
            };
            if overflowed.swap(false, std::sync::atomic::Ordering::Relaxed) {
                return Some((Subscribed::Again, State::Running(rx, keep)));
            }
            match rx.next().await? {
                Pushed::Message(message) | Pushed::Room(_, message) => {
                    Some((Subscribed::Message(message), State::Running(rx, keep)))
                }
                // The connection dropped: the manager reconnects (and
                // subscribes again) on the next command, so send one until
                // it answers.
                Pushed::Lost => {
                    if let Some(manager) = keep.as_mut() {
                        while redis::cmd("PING").query_async::<()>(manager).await.is_err() {
                            sleep(Duration::from_millis(500)).await;
                        }
                        tracing::debug!(what, "backplane channel subscribed again");
                    }
                    Some((Subscribed::Again, State::Running(rx, keep)))
                }
            }
        }
    })
    .boxed()
}

/// What a subscribed connection pushes.
enum Pushed {
    Message(Vec<u8>),
    /// A message on a channel (a room's).
    Room(Vec<u8>, Vec<u8>),
    /// The connection dropped (or pushes were dropped).
    Lost,
}

/// Sleeps on whichever runtime the redis crate uses here.
async fn sleep(d: Duration) {
    #[cfg(feature = "tokio")]
    if tokio::runtime::Handle::try_current().is_ok() {
        tokio::time::sleep(d).await;
        return;
    }
    #[cfg(feature = "smol")]
    {
        async_io::Timer::after(d).await;
    }
    #[cfg(all(feature = "tokio", not(feature = "smol")))]
    tokio::time::sleep(d).await;
}
