//! Typed errors. Misuse by the caller (a bad URL, a bad config) is kept
//! apart from failures caused by the peer or the network, which reach the
//! application as events carrying a reason.

use kitestring_core::client::{LostReason, RequestError, UsageError};
use kitestring_core::config::ConfigError;
use kitestring_core::reliable::{MessageId, SendError};
use kitestring_core::server::RoomError;
use kitestring_core::wire::SessionId;

/// Encoding or decoding an application value failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The value could not be serialized.
    #[error("cannot encode the value: {0}")]
    Encode(String),
    /// The payload does not hold a value of the requested type.
    #[error("cannot decode the payload: {0}")]
    Decode(String),
    /// The payload is opaque binary; read its bytes instead.
    #[error("the payload is raw binary, not JSON or MessagePack")]
    Binary,
}

/// Starting a client failed before any connection was attempted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The URL is not a usable `ws://` or `wss://` URL.
    #[error("invalid URL {0}")]
    InvalidUrl(String),
    /// The configuration cannot work.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// A `wss://` URL needs [`ClientOptions::tls`](crate::ClientOptions::tls).
    #[error("a wss:// URL needs TLS settings (ClientOptions::tls)")]
    MissingTls,
    /// The operating system's random source failed.
    #[error("no randomness for the client id: {0}")]
    Random(String),
    /// A room of [`ClientOptions::rooms`](crate::ClientOptions::rooms)
    /// cannot be joined (a bad name).
    #[error("room {room:?} of ClientOptions::rooms: {error}")]
    Room {
        /// The room.
        room: String,
        /// Why.
        error: SendError,
    },
}

/// A client command failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The core refused the message (queue full, too large, closed, ...).
    #[error(transparent)]
    Send(#[from] SendError),
    /// The command makes no sense in the current state.
    #[error(transparent)]
    Usage(#[from] UsageError),
    /// The value could not be encoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The session the message belonged to was given up before the peer
    /// acknowledged it: it may or may not have arrived.
    #[error("message {id:?} lost with its session: {reason:?}")]
    Lost {
        /// The message.
        id: MessageId,
        /// Why the session was given up.
        reason: LostReason,
    },
    /// The message was accepted but could not be sent after all.
    #[error("message {id:?} failed: {error}")]
    SendFailed {
        /// The message.
        id: MessageId,
        /// Why.
        error: SendError,
    },
    /// The server consumed the message but refused it (malformed, over a
    /// rate limit, or refused by its room policy): it will never reach the
    /// server's application.
    #[error("message {id:?} refused by the server ({}): {}", refusal.op, refusal.reason)]
    Refused {
        /// The message.
        id: MessageId,
        /// What was refused and why.
        refusal: kitestring_core::rooms::Refusal,
    },
    /// A room operation (join, leave, publish) was refused by the core: a
    /// bad room name, a full queue, a closed client.
    #[error("room {room:?}: {error}")]
    Room {
        /// The room, as given (at most its first 64 bytes).
        room: String,
        /// Why.
        error: SendError,
    },
    /// The client closed or failed before the acknowledgment came.
    #[error("the client stopped before message {0:?} was acknowledged")]
    NotAcknowledged(MessageId),
    /// A request got no response: it timed out (a late response is reported
    /// as an event and dropped), or its session was lost or closed.
    #[error("request {id:?} failed: {error}")]
    Request {
        /// The request.
        id: MessageId,
        /// Why.
        error: RequestError,
    },
    /// The request was cancelled with `cancel_request`.
    #[error("request {0:?} was cancelled")]
    RequestCancelled(MessageId),
    /// The driver task has ended (the client was closed).
    #[error("the client has stopped")]
    Stopped,
}

/// Starting a server failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The configuration cannot work.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// Binding or adopting the listener failed.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The operating system's random source failed (for the resume secret).
    #[error("no randomness for the resume secret: {0}")]
    Random(String),
    /// A server with a backplane needs the resume secret its cluster
    /// shares (`ServerConfig::resume_secret`): keys one node gives out
    /// must resume on the others.
    #[error(
        "a server with a backplane needs the cluster's resume secret (ServerConfig::resume_secret)"
    )]
    NoClusterSecret,
}

/// A server command failed. Each message names the session or room
/// concerned.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The core refused a message or command for a session (unknown
    /// session, queue full, too large, ...).
    #[error("session {}: {error}", session.to_hex())]
    Send {
        /// The session.
        session: SessionId,
        /// Why.
        error: SendError,
    },
    /// The core refused a broadcast to a room (a bad room name, a payload
    /// over the limit).
    #[error("room {room:?}: {error}")]
    Broadcast {
        /// The room.
        room: String,
        /// Why.
        error: SendError,
    },
    /// A room operation was refused (unknown session, room full, too many
    /// rooms, bad name).
    #[error("session {}, room {room:?}: {error}", session.to_hex())]
    Room {
        /// The session.
        session: SessionId,
        /// The room.
        room: String,
        /// Why.
        error: RoomError,
    },
    /// A synced-map operation was refused (no such map, a bad name or
    /// key, past its bounds).
    #[error("room {room:?}, map {map:?}: {error}")]
    Map {
        /// The room.
        room: String,
        /// The map.
        map: String,
        /// Why.
        error: kitestring_core::server::MapError,
    },
    /// The value could not be encoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The server task has ended.
    #[error("the server has stopped")]
    Stopped,
    /// The cluster could not do it: the backplane is unreachable, or the
    /// node holding the session did not answer or refused.
    #[error("cluster: {reason}")]
    Cluster {
        /// What went wrong, naming the session or node concerned.
        reason: String,
    },
}

/// A room name for an error message: at most its first 64 bytes (a name
/// refused for its length may be long).
pub(crate) fn room_label(room: &str) -> String {
    let mut end = room.len().min(64);
    while !room.is_char_boundary(end) {
        end -= 1;
    }
    if end < room.len() {
        format!("{}...", &room[..end])
    } else {
        room.to_owned()
    }
}

impl ServerError {
    /// The core's refusal of a message, if that is what this is.
    pub fn send_error(&self) -> Option<&SendError> {
        match self {
            ServerError::Send { error, .. } | ServerError::Broadcast { error, .. } => Some(error),
            _ => None,
        }
    }

    /// Whether the session concerned does not exist (any more).
    pub fn is_unknown_session(&self) -> bool {
        matches!(
            self,
            ServerError::Send {
                error: SendError::UnknownSession,
                ..
            } | ServerError::Room {
                error: RoomError::UnknownSession,
                ..
            }
        )
    }
}
