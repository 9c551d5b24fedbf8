//! The client's side of its delivery pipe, the `Link`.
//!
//! Owns accepting messages into the send queue (`enqueue`, with the overflow
//! policy), the `msg`, `ack` and `replay` frames of an open session, handing
//! what the link delivers in order to the right place (a room's presence
//! notice, a refusal, the response to a pending request, the application),
//! and every frame that goes out: `on_link` lends the link the current
//! connection to send on, `ClientPort` turns what it sends into outputs and
//! counts them. Numbering, batching, acknowledging and retransmitting are
//! the link's (`link.rs`): this file only drives it and acts on what it
//! returns.

use std::collections::VecDeque;

use crate::close::CloseCode;
use crate::config::ClientConfig;
use crate::link::{Link, Port, Receipt, Received, SendFailed, Tx};
use crate::reliable::{MessageId, Outgoing, OverflowPolicy, RoomName, SendError};
use crate::rooms::{Presence, Refusal};
use crate::time::Instant;
use crate::wire::{Codec, DecodeError, Frame, Msg, MsgKind, Payload, Transmit, PROTOCOL_VERSION};

use super::timers::Timers;
use super::{Client, Event, LostReason, Output, State, TransportId};

impl Client {
    /// Accepts a message into the send queue, applying the overflow
    /// policy when the queue and the window are full.
    pub(super) fn enqueue(&mut self, now: Instant, msg: Outgoing) -> Result<MessageId, SendError> {
        self.advance(now);
        self.check_sendable(&msg.payload)?;
        let id = MessageId(self.next_id);
        match self.link.outbound.push(msg.with_id(id)) {
            Ok(()) => {
                self.next_id += 1;
                self.flush();
                Ok(id)
            }
            Err(e) => match self.config.reliability.overflow {
                OverflowPolicy::Refuse => Err(e),
                OverflowPolicy::FailSession => {
                    self.discard_session(LostReason::Overflow, true);
                    if matches!(self.state, State::Handshaking { .. } | State::Open) {
                        self.drop_connection(CloseCode::RETRY, "send buffers overflowed");
                        self.start_attempt();
                    }
                    Err(SendError::SessionFailed)
                }
            },
        }
    }

    /// Whether a message can be accepted now: the session is not over and
    /// the payload fits the peer's limit.
    pub(super) fn check_sendable(&self, payload: &Payload) -> Result<(), SendError> {
        match self.state {
            State::Closing => return Err(SendError::NotConnected("closing")),
            State::Closed { .. } => return Err(SendError::NotConnected("closed")),
            State::Failed { .. } => return Err(SendError::NotConnected("failed")),
            _ => {}
        }
        let max = self.max_payload();
        SendError::check_size(payload.len(), max)?;
        Ok(())
    }

    fn max_payload(&self) -> usize {
        let peer = self
            .conn
            .as_ref()
            .map_or(usize::MAX, |c| c.peer_max_message);
        self.config.max_message_size.min(peer)
    }

    /// Hands a message delivered in order to the right place: the room
    /// bookkeeping, a waiting request, or the application.
    fn deliver(&mut self, m: Msg) {
        let kind = m.kind;
        match kind {
            // Numbered, so consumed; never handed over as a message.
            MsgKind::Invalid(what) => {
                self.stats.traffic.decode_failures += 1;
                self.emit(Event::DecodeFailed(what.error()));
                return;
            }
            MsgKind::RefusedMessage(id) => {
                self.on_refusal(Some(MessageId(id)), m.room, &m.payload);
                return;
            }
            MsgKind::Refused => {
                self.on_refusal(None, m.room, &m.payload);
                return;
            }
            _ => {}
        }
        let received = Received::from_msg(m);
        if let (MsgKind::Presence, Some(room)) = (kind, received.room.clone()) {
            self.on_room_notice(room, &received.payload);
            return;
        }
        match received.response_to {
            Some(request) => {
                if let Some(deadline) = self.requests.remove(&request) {
                    self.request_deadlines.remove(&(deadline, request));
                    self.arm_request_timer();
                    self.emit(Event::Response {
                        request,
                        response: received,
                    });
                } else {
                    self.emit(Event::LateResponse { request });
                }
            }
            None => self.emit(Event::Message(received)),
        }
    }

    pub(super) fn on_room_notice(&mut self, room: RoomName, payload: &Payload) {
        match read_json(payload, Presence::from_json) {
            Some(presence) => self.emit(Event::Presence { room, presence }),
            None => self.emit(Event::DecodeFailed(DecodeError::InvalidField {
                field: "j",
                reason: "not a presence payload",
            })),
        }
    }

    fn on_refusal(&mut self, mut id: Option<MessageId>, room: Option<RoomName>, payload: &Payload) {
        let refusal = match read_json(payload, Refusal::from_json) {
            Some(refusal) => refusal,
            // The message is refused all the same; only the words are lost.
            None => Refusal {
                op: "message".into(),
                reason: "refused (the refusal's payload did not decode)".into(),
                code: None,
            },
        };
        if refusal.op == "join" && id == Some(MessageId(0)) {
            // A join of the `hello`: named by its room.
            if let Some(at) = self
                .hello_joined
                .iter()
                .position(|(r, _)| Some(r) == room.as_ref())
            {
                let (_, join) = self.hello_joined.swap_remove(at);
                id = (join != MessageId::SYSTEM).then_some(join);
            }
        }
        if refusal.op == "join" {
            if let Some(room) = &room {
                self.rooms.remove(room);
                self.streams.remove(room);
                self.forget_latest(room);
                self.forget_maps(room);
            }
        }
        if let Some(id) = id {
            self.map_write_refused(id);
        }
        self.stats.refused += 1;
        self.emit(Event::Refused { id, room, refusal });
    }

    pub(super) fn on_msg(&mut self, m: Msg) {
        if let Some(ack) = m.ack {
            self.on_ack(ack);
            if self.state != State::Open {
                return;
            }
        }
        let rel = &self.config.reliability;
        let receipt = self.link.receive(
            self.now,
            m.seq,
            rel,
            &mut self.timers,
            &mut self.stats.delivery,
        );
        match receipt {
            Receipt::Deliver { ack_now } => {
                self.deliver(m);
                if ack_now {
                    self.flush_ack();
                }
            }
            Receipt::Duplicate => self.flush_ack(),
            Receipt::Gap { replay: Some(from) } => self.transmit(&Frame::Replay { from }),
            Receipt::Gap { replay: None } => {}
        }
    }

    pub(super) fn on_ack(&mut self, ack: u64) {
        let timeout = self.config.reliability.ack_timeout;
        match self.link.on_ack(self.now, ack, &mut self.timers, timeout) {
            Ok(Some(acked)) => {
                if let Some((first, last)) = acked.range {
                    self.emit(Event::Acked { first, last });
                }
                self.left_through(acked.through);
                self.maps_acked(acked.through);
                self.flush();
            }
            Ok(None) => {}
            Err(e) => self.protocol_error(format!(
                "ack {} beyond the last message sent ({})",
                e.ack, e.last_sent
            )),
        }
    }

    pub(super) fn on_replay(&mut self, from: u64) {
        if from > self.link.outbound.last_sequenced() + 1 {
            self.protocol_error(format!("replay from {from}, beyond anything sent"));
            return;
        }
        // Everything before `from` was delivered: that is an acknowledgment.
        self.on_ack(from - 1);
        if self.state == State::Open {
            self.retransmit_from(from);
        }
    }

    pub(super) fn retransmit_from(&mut self, from: u64) {
        let sent = self.on_link(false, |link, tx, timers, cfg, now| {
            link.retransmit(now, from, tx, timers, cfg.reliability.ack_timeout)
        });
        self.sent(sent);
    }

    /// Sequences and sends waiting messages while the session is open and the
    /// window has room.
    pub(super) fn flush(&mut self) {
        if !matches!(self.state, State::Open) || self.conn.is_none() {
            return;
        }
        let sent = self.on_link(true, |link, tx, timers, cfg, now| {
            let timeout = cfg.reliability.ack_timeout;
            link.flush(now, tx, cfg.batch.as_ref(), timers, timeout)
        });
        self.sent(sent);
    }

    pub(super) fn send_batch(&mut self) {
        let sent = self.on_link(false, |link, tx, timers, _, _| link.send_batch(tx, timers));
        self.sent(sent);
    }

    pub(super) fn flush_ack(&mut self) {
        let sent = self.on_link(true, |link, tx, timers, _, _| link.flush_ack(tx, timers));
        self.sent(sent);
    }

    pub(super) fn transmit(&mut self, frame: &Frame) {
        let sent = self.on_link(false, |_, tx, _, _, _| {
            tx.map_or(Ok(()), |tx| tx.send(frame))
        });
        self.sent(sent);
    }

    /// Runs `op` on the link, with the current connection to send on
    /// (none without one, or if `open_only` and the session is not open).
    fn on_link<R>(
        &mut self,
        open_only: bool,
        op: impl FnOnce(
            &mut Link,
            Option<&mut Tx<'_, ClientPort<'_>>>,
            &mut Timers,
            &ClientConfig,
            Instant,
        ) -> R,
    ) -> R {
        let usable = !open_only || matches!(self.state, State::Open);
        let mut tx = self.conn.as_ref().filter(|_| usable).map(|c| Tx {
            encoder: &mut self.encoder,
            codec: c.codec,
            version: c.version,
            detach: c.peer_detach,
            batches: c.peer_batches,
            deflate: self.config.compression.filter(|_| c.deflate),
            max_message: c.peer_max_message,
            traffic: &mut self.stats.traffic,
            delivery: &mut self.stats.delivery,
            port: ClientPort {
                transport: c.id,
                outputs: &mut self.outputs,
            },
        });
        op(
            &mut self.link,
            tx.as_mut(),
            &mut self.timers,
            &self.config,
            self.now,
        )
    }

    /// Sends the `hello` on a transport whose session is not open yet.
    pub(super) fn transmit_hello(&mut self, transport: TransportId, hello: &Frame) {
        let mut tx = Tx {
            encoder: &mut self.encoder,
            codec: Codec::Json,
            version: PROTOCOL_VERSION,
            detach: false,
            batches: false,
            deflate: None,
            max_message: usize::MAX,
            traffic: &mut self.stats.traffic,
            delivery: &mut self.stats.delivery,
            port: ClientPort {
                transport,
                outputs: &mut self.outputs,
            },
        };
        let sent = tx.send(hello);
        self.sent(sent);
    }

    #[inline(always)]
    fn sent(&mut self, sent: Result<(), SendFailed>) {
        if let Err(e) = sent {
            // Only reachable through a bug; never panic in a library.
            self.protocol_error(e.to_string());
        }
    }
}

/// The client's side of its connection, for the [`Link`].
struct ClientPort<'a> {
    transport: TransportId,
    outputs: &'a mut VecDeque<Output>,
}

impl Port for ClientPort<'_> {
    fn transmit(&mut self, t: Transmit) {
        self.outputs.push_back(Output::Transmit(self.transport, t));
    }

    fn too_large(&mut self, id: MessageId, size: usize, max: usize) {
        let error = SendError::TooLarge { size, max };
        self.outputs
            .push_back(Output::Event(Event::SendFailed { id, error }));
    }
}

/// A JSON payload the server wrote (presence, a refusal), read by the
/// hand-written reader `quick`, or by serde where it gives up (with
/// `json-serde`).
fn read_json<T: serde::de::DeserializeOwned>(
    payload: &Payload,
    quick: fn(&[u8]) -> Option<T>,
) -> Option<T> {
    let data = payload.data();
    quick(data).or_else(|| serde_fallback(data))
}

#[cfg(feature = "json-serde")]
fn serde_fallback<T: serde::de::DeserializeOwned>(data: &[u8]) -> Option<T> {
    serde_json::from_slice(data).ok()
}

#[cfg(not(feature = "json-serde"))]
fn serde_fallback<T>(_: &[u8]) -> Option<T> {
    None
}
