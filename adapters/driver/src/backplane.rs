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
//! This module owns the trait and its error; it never holds cluster logic.
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
