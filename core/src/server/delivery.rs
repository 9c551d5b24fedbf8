//! The glue between the server and each session's delivery pipe (`Link`,
//! in link.rs): queuing messages for a session (`enqueue_raw`, under the
//! overflow policy in `enqueue_in`), the frames of an open session
//! (`on_session_frame`: messages, batches, acknowledgments, replays, pings,
//! pongs, which go to the lag bound in lag.rs, datagrams, credentials),
//! the acknowledgment timeout, and running the
//! link with the session's connection to send on (`conn_tx`, `ServerPort`)
//! and the server's heap for its deadlines (`SessionTimers`, `on_link`).
//!
//! Sequencing, windows, batching, acknowledgment and retransmission belong
//! to the link: this file never does them itself, it decides what the
//! link's answers mean for connections, sessions and events.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use crate::close::CloseCode;
use crate::config::ServerConfig;
use crate::link::{Link, LinkTimer, LinkTimers, Port, Receipt, SendFailed, Tx};
use crate::ratelimit::Limit;
use crate::reliable::{MessageId, Outgoing, OverflowPolicy, SendError};
use crate::time::Instant;
use crate::wire::{
    self, Codec, Frame, Msg, MsgKind, Payload, SessionId, Transmit, PROTOCOL_VERSION,
};

use super::admission::Admission;
use super::conn::ConnPhase;
use super::{
    ConnectionId, RoomOp, Server, ServerEvent, ServerOutput, ServerStats, ServerTimer, SessionEnd,
};

/// A session's link deadlines. The heap may hold older entries for a slot;
/// only the one equal to the slot counts. [`Instant::MAX`] means unset (a
/// deadline at the end of time never fires anyway): three words instead of
/// six, for every idle session.
#[derive(Debug)]
pub(super) struct LinkDeadlines([Instant; 3]);

impl Default for LinkDeadlines {
    fn default() -> Self {
        LinkDeadlines([Instant::MAX; 3])
    }
}

impl LinkDeadlines {
    pub(super) fn get(&self, timer: LinkTimer) -> Option<Instant> {
        Some(self.0[timer as usize]).filter(|at| *at != Instant::MAX)
    }

    fn put(&mut self, timer: LinkTimer, at: Option<Instant>) {
        self.0[timer as usize] = at.unwrap_or(Instant::MAX);
    }
}

/// A session's deadlines as the link sees them: setting one also puts it on
/// the server's heap.
pub(super) struct SessionTimers<'a> {
    pub(super) session: SessionId,
    pub(super) deadlines: &'a mut LinkDeadlines,
    pub(super) heap: &'a mut BinaryHeap<Reverse<(Instant, ServerTimer)>>,
}

impl LinkTimers for SessionTimers<'_> {
    fn is_set(&self, timer: LinkTimer) -> bool {
        self.deadlines.get(timer).is_some()
    }

    fn set(&mut self, timer: LinkTimer, at: Instant) {
        self.deadlines.put(timer, Some(at));
        let s = self.session;
        let timer = match timer {
            LinkTimer::AckDelay => ServerTimer::AckDelay(s),
            LinkTimer::Batch => ServerTimer::Batch(s),
            LinkTimer::AckTimeout => ServerTimer::AckTimeout(s),
        };
        self.heap.push(Reverse((at, timer)));
    }

    fn stop(&mut self, timer: LinkTimer) {
        self.deadlines.put(timer, None);
    }
}

/// A connection's side of the server, for a session's [`Link`].
pub(super) struct ServerPort<'a> {
    connection: ConnectionId,
    outputs: &'a mut VecDeque<ServerOutput>,
}

impl Port for ServerPort<'_> {
    fn transmit(&mut self, t: Transmit) {
        let connection = self.connection;
        self.outputs
            .push_back(ServerOutput::Transmit(connection, t));
    }

    /// The server sends whatever the client takes (its own limit bounds
    /// what it accepts): never called.
    fn too_large(&mut self, _: MessageId, _: usize, _: usize) {}
}

/// What a connection can take, as a [`Tx`]: the negotiated codec and
/// version and the client's capabilities once open; JSON before.
/// `compression`: the server's settings, used if the connection agreed.
pub(super) fn conn_tx<'a>(
    connection: ConnectionId,
    phase: &ConnPhase,
    compression: Option<wire::CompressionConfig>,
    encoder: &'a mut wire::Encoder,
    outputs: &'a mut VecDeque<ServerOutput>,
    stats: &'a mut ServerStats,
) -> Tx<'a, ServerPort<'a>> {
    let (codec, version, batches, detach, deflate) = match *phase {
        ConnPhase::Open {
            codec,
            version,
            batches,
            detach,
            deflate,
            ..
        } => (codec, version, batches, detach, deflate),
        ConnPhase::AwaitingHello => (Codec::Json, PROTOCOL_VERSION, false, false, false),
    };
    Tx {
        encoder,
        codec,
        version,
        detach,
        batches,
        deflate: compression.filter(|_| deflate),
        max_message: usize::MAX,
        traffic: &mut stats.traffic,
        delivery: &mut stats.delivery,
        port: ServerPort {
            connection,
            outputs,
        },
    }
}

impl Server {
    pub(super) fn send_inner(
        &mut self,
        now: Instant,
        session: SessionId,
        payload: Payload,
        ts: Option<u64>,
    ) -> Result<MessageId, SendError> {
        self.enqueue(now, session, Outgoing::new(MsgKind::Plain, payload).at(ts))
    }

    /// Queues without applying the overflow policy: the caller decides.
    pub(super) fn enqueue_raw(
        &mut self,
        session: SessionId,
        msg: Outgoing,
    ) -> Result<MessageId, SendError> {
        let max = self.config.max_message_size;
        SendError::check_size(msg.payload.len(), max)?;
        let s = self
            .sessions
            .get_mut(&session)
            .ok_or(SendError::UnknownSession)?;
        let id = MessageId(self.next_id);
        s.link.outbound.push(msg.with_id(id))?;
        // A room member's connection is watched already (lag.rs).
        let watch = s.rooms.is_empty() && self.config.max_lag.is_some();
        self.next_id += 1;
        self.flush(session);
        if watch {
            self.watch_lag(session);
        }
        Ok(id)
    }

    /// Queues, applying the overflow policy when the session's buffers are full.
    pub(super) fn enqueue(
        &mut self,
        now: Instant,
        session: SessionId,
        msg: Outgoing,
    ) -> Result<MessageId, SendError> {
        self.advance(now);
        match self.enqueue_raw(session, msg) {
            Err(e @ SendError::QueueFull { .. }) => match self.config.reliability.overflow {
                OverflowPolicy::Refuse => Err(e),
                OverflowPolicy::FailSession => {
                    let close = (CloseCode::SLOW_CONSUMER, "session buffers overflowed");
                    self.end_session(session, SessionEnd::Overflow, Some(close));
                    Err(SendError::SessionFailed)
                }
            },
            other => other,
        }
    }

    pub(super) fn check_ack_timeout(&mut self, session: SessionId, at: Instant) {
        let timeout = self.config.reliability.ack_timeout;
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        if s.deadlines.get(LinkTimer::AckTimeout) != Some(at) {
            return;
        }
        s.deadlines.put(LinkTimer::AckTimeout, None);
        let Some(conn) = s.state.connection() else {
            return;
        };
        let mut timers = SessionTimers {
            session,
            deadlines: &mut s.deadlines,
            heap: &mut self.timers,
        };
        if s.link.ack_timed_out(self.now, &mut timers, timeout) {
            self.disconnect(conn, CloseCode::ACK_TIMEOUT, "ack timeout");
        }
    }

    /// Every frame of an open session but a `msg` (which `on_frame` hands
    /// to `on_msg` itself). Kept out of line: it is off the message path.
    #[inline(never)]
    pub(super) fn on_session_frame(
        &mut self,
        connection: ConnectionId,
        session: SessionId,
        frame: Frame,
    ) {
        match frame {
            Frame::Ping { nonce } => self.transmit(connection, &Frame::Pong { nonce }),
            Frame::Pong { nonce } => self.on_pong(connection, nonce),
            Frame::Unknown(_) => {}
            Frame::Msg(m) => {
                self.on_msg(connection, session, m);
            }
            Frame::Batch(msgs) => {
                for m in msgs {
                    if !self.on_msg(connection, session, m) {
                        break;
                    }
                }
            }
            Frame::Ack { ack } => {
                self.on_ack(connection, session, ack);
            }
            Frame::Replay { from } => {
                let last = self
                    .sessions
                    .get(&session)
                    .map_or(0, |s| s.link.outbound.last_sequenced());
                if from > last + 1 {
                    self.disconnect(
                        connection,
                        CloseCode::PROTOCOL_ERROR,
                        "replay beyond anything sent",
                    );
                    return;
                }
                if self.on_ack(connection, session, from - 1) {
                    self.retransmit(session, from);
                }
            }
            Frame::Raw(data) => {
                if let Admission::Admit = self.admit(connection, data.len(), true) {
                    self.emit(ServerEvent::Datagram { session, data });
                }
            }
            Frame::Auth { token } => self.emit(ServerEvent::TokenReceived {
                connection,
                session,
                token,
            }),
            Frame::Subs(list) => self.on_subs(connection, session, list),
            Frame::Hello(_)
            | Frame::Welcome(_)
            | Frame::Reject(_)
            | Frame::GoAway { .. }
            | Frame::Reauth { .. }
            | Frame::Pub(_)
            | Frame::Latest(_)
            | Frame::MapValue(_)
            | Frame::MapSnapshot(_)
            | Frame::Skip { .. }
            | Frame::Sub(_) => self.disconnect(
                connection,
                CloseCode::PROTOCOL_ERROR,
                "server-only frame from a client",
            ),
        }
    }

    /// Handles one incoming message; false if the connection is gone.
    pub(super) fn on_msg(&mut self, connection: ConnectionId, session: SessionId, m: Msg) -> bool {
        if let Some(ack) = m.ack {
            if !self.on_ack(connection, session, ack) {
                return false;
            }
        }
        let Some(s) = self.sessions.get_mut(&session) else {
            return false;
        };
        let mut timers = SessionTimers {
            session,
            deadlines: &mut s.deadlines,
            heap: &mut self.timers,
        };
        let rel = &self.config.reliability;
        let delivery = &mut self.stats.delivery;
        match s.link.receive(self.now, m.seq, rel, &mut timers, delivery) {
            Receipt::Deliver { ack_now } => {
                let (seq, id) = (m.seq, MessageId(m.id));
                match m.kind {
                    MsgKind::Invalid(what) => {
                        self.stats.traffic.decode_failures += 1;
                        self.emit(ServerEvent::DecodeFailed {
                            connection,
                            error: what.error(),
                        });
                        self.refuse_msg(
                            session,
                            seq,
                            id,
                            None,
                            "message",
                            "invalid",
                            what.to_string(),
                        );
                    }
                    MsgKind::Presence | MsgKind::Refused | MsgKind::RefusedMessage(_) => {
                        self.refuse_msg(
                            session,
                            seq,
                            id,
                            m.room,
                            "message",
                            "invalid",
                            "presence and refusals are sent by the server only".into(),
                        );
                    }
                    kind => match self.admit(connection, m.payload.len(), false) {
                        Admission::Admit => {
                            self.dispatch(session, m);
                            if matches!(kind, MsgKind::Join | MsgKind::Leave) && !ack_now {
                                self.ack_room_op(session, seq);
                            }
                        }
                        Admission::Refuse(limit) => {
                            let what = match limit {
                                Limit::Bytes => "byte",
                                _ => "message",
                            };
                            let op = op_name(kind, m.room.is_some());
                            self.refuse_msg(
                                session,
                                seq,
                                id,
                                m.room,
                                op,
                                "rate_limited",
                                format!("{what} rate limit exceeded"),
                            );
                        }
                        Admission::Closed => return false,
                    },
                }
                if ack_now {
                    self.flush_ack(session);
                }
            }
            Receipt::Duplicate => self.flush_ack(session),
            Receipt::Gap { replay: Some(from) } => {
                self.transmit(connection, &Frame::Replay { from });
            }
            Receipt::Gap { replay: None } => {}
        }

        true
    }

    /// Applies an acknowledgment; false if it was a protocol violation and
    /// the connection is gone.
    fn on_ack(&mut self, connection: ConnectionId, session: SessionId, ack: u64) -> bool {
        let timeout = self.config.reliability.ack_timeout;
        let Some(s) = self.sessions.get_mut(&session) else {
            return false;
        };
        let mut timers = SessionTimers {
            session,
            deadlines: &mut s.deadlines,
            heap: &mut self.timers,
        };
        match s.link.on_ack(self.now, ack, &mut timers, timeout) {
            Ok(Some(acked)) => {
                if let Some((first, last)) = acked.range {
                    self.emit(ServerEvent::Acked {
                        session,
                        first,
                        last,
                    });
                }
                self.flush(session);
                if acked.released {
                    self.flush_ack(session);
                }
                true
            }
            Ok(None) => true,
            Err(_) => {
                self.disconnect(
                    connection,
                    CloseCode::PROTOCOL_ERROR,
                    "ack beyond anything sent",
                );
                false
            }
        }
    }

    pub(super) fn retransmit(&mut self, session: SessionId, from: u64) {
        self.on_link(session, |link, tx, timers, cfg, now| {
            link.retransmit(now, from, tx, timers, cfg.reliability.ack_timeout)
        });
    }

    /// Sequences waiting messages into the window; sends them if attached.
    pub(super) fn flush(&mut self, session: SessionId) {
        self.on_link(session, |link, tx, timers, cfg, now| {
            let timeout = cfg.reliability.ack_timeout;
            link.flush(now, tx, cfg.batch.as_ref(), timers, timeout)
        });
    }

    pub(super) fn send_batch(&mut self, session: SessionId) {
        self.on_link(session, |link, tx, timers, _, _| {
            link.send_batch(tx, timers)
        });
    }

    /// A join or leave numbered `seq` was handled: if the server took it
    /// itself (not refused, not waiting for a cluster), it is acknowledged
    /// now, in the same write as its answer (a `sub`, or nothing), rather
    /// than by a standalone `ack` after the delay. A client learns at once
    /// that its room operation is done, and a connection that opens and
    /// joins costs one write less.
    fn ack_room_op(&mut self, session: SessionId, seq: u64) {
        let settled = self
            .sessions
            .get(&session)
            .is_some_and(|s| s.link.inbound.ack_point() >= seq && s.link.inbound.ack_pending());
        if settled {
            self.flush_ack(session);
        }
    }

    pub(super) fn flush_ack(&mut self, session: SessionId) {
        self.on_link(session, |link, tx, timers, _, _| link.flush_ack(tx, timers));
    }

    /// Runs `op` on a session's link, with its connection (if attached) to
    /// send on; a frame that will not encode closes that connection.
    fn on_link(
        &mut self,
        session: SessionId,
        op: impl FnOnce(
            &mut Link,
            Option<&mut Tx<'_, ServerPort<'_>>>,
            &mut SessionTimers<'_>,
            &ServerConfig,
            Instant,
        ) -> Result<(), SendFailed>,
    ) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let conn = s.state.connection();
        let compression = self.config.compression;
        let mut tx = conn.and_then(|c| {
            let phase = &self.conns.get(&c)?.phase;
            let (encoder, outputs) = (&mut self.encoder, &mut self.outputs);
            Some(conn_tx(
                c,
                phase,
                compression,
                encoder,
                outputs,
                &mut self.stats,
            ))
        });
        let mut timers = SessionTimers {
            session,
            deadlines: &mut s.deadlines,
            heap: &mut self.timers,
        };
        let sent = op(
            &mut s.link,
            tx.as_mut(),
            &mut timers,
            &self.config,
            self.now,
        );
        if let (Err(_), Some(conn)) = (sent, conn) {
            self.encode_failed(conn);
        }
    }

    pub(super) fn transmit(&mut self, connection: ConnectionId, frame: &Frame) {
        let Some(conn) = self.conns.get(&connection) else {
            return;
        };
        let (encoder, outputs) = (&mut self.encoder, &mut self.outputs);
        let compression = self.config.compression;
        let mut tx = conn_tx(
            connection,
            &conn.phase,
            compression,
            encoder,
            outputs,
            &mut self.stats,
        );
        if tx.send(frame).is_err() {
            self.encode_failed(connection);
        }
    }

    /// Only reachable through a bug; never panic in a library.
    pub(super) fn encode_failed(&mut self, connection: ConnectionId) {
        self.disconnect(
            connection,
            CloseCode::INTERNAL_ERROR,
            "could not encode a frame",
        );
    }
}

/// The `op` a refusal names for a message of `kind`, sent to a room or not
/// (PROTOCOL.md, section 3.3): as the room's own refusals name them.
fn op_name(kind: MsgKind, to_room: bool) -> &'static str {
    match kind {
        MsgKind::Join => RoomOp::Join.as_str(),
        MsgKind::Leave => RoomOp::Leave.as_str(),
        MsgKind::MapWrite => RoomOp::MapWrite.as_str(),
        MsgKind::Plain | MsgKind::Request if to_room => RoomOp::Publish.as_str(),
        _ => "message",
    }
}
