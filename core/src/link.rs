//! One session's delivery pipe, the same code for the client and the server.
//!
//! Owns what happens to application messages between a machine's send
//! queue and the encoder, and between the decoder and delivery: numbering
//! waiting messages into the send window, collecting them into batches or
//! sending large ones detached, piggybacking acknowledgments, standalone
//! acknowledgments after a delay or a count, the progress-based
//! acknowledgment timeout, replays and resumes, and the counters of all of
//! it ([`DeliveryStats`], [`TrafficStats`]), the message both sides deliver
//! ([`Received`]) and the capabilities each side announces so the other
//! may batch and detach ([`CAP_BATCH`]). A fix here is a fix on both sides.
//!
//! A [`Link`] never calls back into a machine. It is handed the connection
//! it sends on ([`Tx`], or none while detached), the place its three
//! deadlines live ([`LinkTimers`]: the client's timer table, a server
//! session's slots and the server's deadline heap), and the configuration;
//! it returns what the machine must decide on: a message to deliver, a
//! range of acknowledged ids, a frame that would not encode. It never
//! decides about connections or sessions, never emits events, and never
//! reads a clock.

use core::time::Duration;

use crate::config::{BatchConfig, ReliabilityConfig};
use crate::reliable::{AckBeyondSent, Batcher, Inbound, MessageId, Outbound, Verdict};
use crate::time::Instant;
use crate::wire::{self, Codec, EncodeError, Encoder, Frame, Msg, MsgKind, Payload, Transmit};

/// A message delivered from the peer, in order, exactly once.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Received {
    /// The peer's id for the message (an idempotency key). For an entry of
    /// a room's stream, its offset (an idempotency key within the room).
    pub id: MessageId,
    /// Its sequence number in this session or, if `in_stream`, its offset
    /// in its room's stream.
    pub seq: u64,
    /// The sender's timestamp in milliseconds, if it set one.
    pub timestamp: Option<u64>,
    /// Whether the sender expects a response (answer with `respond`,
    /// quoting `id`).
    pub request: bool,
    /// An entry of its room's stream (PROTOCOL.md, section 3.4), numbered
    /// by the room's offsets rather than the session's sequence.
    pub in_stream: bool,
    /// The request this message answers, if it is a response.
    pub response_to: Option<MessageId>,
    /// The room it was published to (server side) or broadcast in (client
    /// side), if any.
    pub room: Option<std::sync::Arc<str>>,
    /// The payload.
    pub payload: Payload,
}

impl Received {
    pub(crate) fn from_msg(m: Msg) -> Received {
        Received {
            id: MessageId(m.id),
            seq: m.seq,
            timestamp: m.ts,
            request: m.kind == MsgKind::Request,
            in_stream: false,
            response_to: match m.kind {
                MsgKind::Response(to) => Some(MessageId(to)),
                _ => None,
            },
            room: m.room,
            payload: m.payload,
        }
    }
}

/// The capability (client) and feature (server) that announces "I can
/// receive `batch` frames".
pub const CAP_BATCH: &str = "batch";

/// The names every Kitestring peer announces of itself, in the order its
/// `hello` or `welcome` lists them: a server all of them, a client those
/// its settings turn on (`ClientConfig::hello_caps`). `deflate` goes after
/// them where compression is agreed or offered.
pub(crate) const OWN_CAPS: [&str; 5] = [
    CAP_BATCH,
    wire::CAP_DETACH,
    wire::CAP_STREAM,
    wire::CAP_LATEST,
    wire::CAP_MAPS,
];

/// Counters of application messages, kept the same way on both sides
/// ([`ClientStats::delivery`](crate::client::ClientStats::delivery),
/// [`ServerStats::delivery`](crate::server::ServerStats::delivery)).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeliveryStats {
    /// Messages handed to the wire for the first time.
    pub messages_sent: u64,
    /// Messages put on the wire again (after a replay request or a resume).
    pub retransmitted: u64,
    /// Messages delivered in order (including those refused on arrival).
    pub messages_received: u64,
    /// Messages that arrived again and were dropped.
    pub duplicates: u64,
    /// Messages that arrived after a gap and were dropped (a replay was
    /// asked for).
    pub gaps: u64,
}

/// Counters of frames and bytes, kept the same way on both sides
/// ([`ClientStats::traffic`](crate::client::ClientStats::traffic),
/// [`ServerStats::traffic`](crate::server::ServerStats::traffic)).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TrafficStats {
    /// WebSocket messages received.
    pub frames_in: u64,
    /// WebSocket messages sent.
    pub frames_out: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// Messages that failed to decode.
    pub decode_failures: u64,
}

/// The deadlines a link keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LinkTimer {
    /// Send a standalone acknowledgment.
    AckDelay,
    /// The batch being collected goes out.
    Batch,
    /// Data has waited too long for an acknowledgment.
    AckTimeout,
}

/// Where a link's deadlines live. Setting replaces; stopping clears.
pub(crate) trait LinkTimers {
    fn is_set(&self, timer: LinkTimer) -> bool;
    fn set(&mut self, timer: LinkTimer, at: Instant);
    fn stop(&mut self, timer: LinkTimer);
}

/// The machine's side of a connection: where what a link sends goes.
pub(crate) trait Port {
    /// Queues an encoded message for the connection.
    fn transmit(&mut self, t: Transmit);
    /// A message over the peer's size limit was taken back before it went
    /// out (its sequence number is reused): report it by id.
    fn too_large(&mut self, id: MessageId, size: usize, max: usize);
}

/// A connection to send on: its encoding, what the peer can take, and the
/// machine's [`Port`].
pub(crate) struct Tx<'a, P> {
    pub(crate) encoder: &'a mut Encoder,
    pub(crate) codec: Codec,
    pub(crate) version: u8,
    /// The peer can receive detached payloads.
    pub(crate) detach: bool,
    /// The peer can receive `batch` frames.
    pub(crate) batches: bool,
    /// The connection agreed on compression: what to compress
    /// (PROTOCOL.md, section 2.2).
    pub(crate) deflate: Option<wire::CompressionConfig>,
    /// The largest payload the peer takes.
    pub(crate) max_message: usize,
    /// The machine's counters.
    pub(crate) traffic: &'a mut TrafficStats,
    pub(crate) delivery: &'a mut DeliveryStats,
    pub(crate) port: P,
}

/// A frame that could not be encoded (only reachable through a bug).
/// Boxed, so the `Result` every send returns stays one word.
#[derive(Debug)]
pub(crate) struct SendFailed(Box<(String, EncodeError)>);

impl core::fmt::Display for SendFailed {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let (frame, error) = &*self.0;
        write!(f, "could not encode `{frame}`: {error}")
    }
}

impl<P: Port> Tx<'_, P> {
    /// Encodes `frame` and hands the result to the port.
    #[inline(always)]
    pub(crate) fn send(&mut self, frame: &Frame) -> Result<(), SendFailed> {
        let (port, traffic) = (&mut self.port, &mut *self.traffic);
        self.encoder
            .encode_each(
                frame,
                self.codec,
                self.version,
                self.detach,
                self.deflate.as_ref(),
                |t| {
                    traffic.frames_out += 1;
                    traffic.bytes_out += t.len() as u64;
                    port.transmit(t);
                },
            )
            .map_err(|error| SendFailed(Box::new((frame.type_name().to_owned(), error))))
    }
}

/// What to do with a message that arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Receipt {
    /// The next in order: deliver it, then, if `ack_now`, acknowledge at
    /// once ([`Link::flush_ack`]); otherwise the ack delay is armed.
    Deliver { ack_now: bool },
    /// Already delivered: acknowledge again.
    Duplicate,
    /// After a gap: dropped; send `replay` from this number if set.
    Gap { replay: Option<u64> },
}

/// An acknowledgment released messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Acked {
    /// The first and last of the application's messages released, if any.
    pub(crate) range: Option<(MessageId, MessageId)>,
    /// The last message released, the machine's own included.
    pub(crate) through: MessageId,
    /// Refusals among them were holding acknowledgments back, and no
    /// longer are: acknowledge now.
    pub(crate) released: bool,
}

/// One session's delivery state in both directions.
#[derive(Debug)]
pub(crate) struct Link {
    pub(crate) outbound: Outbound,
    pub(crate) inbound: Inbound,
    /// Only while a batch is being collected (idle sessions stay small).
    batch: Option<Box<Batcher>>,
}

impl Link {
    pub(crate) fn new(outbound: Outbound) -> Link {
        Link {
            outbound,
            inbound: Inbound::default(),
            batch: None,
        }
    }

    /// A message with sequence number `seq` arrived.
    #[inline(always)]
    pub(crate) fn receive(
        &mut self,
        now: Instant,
        seq: u64,
        cfg: &ReliabilityConfig,
        timers: &mut impl LinkTimers,
        stats: &mut DeliveryStats,
    ) -> Receipt {
        match self.inbound.on_msg(seq) {
            Verdict::Deliver => {
                stats.messages_received += 1;
                let ack_now = self.inbound.unacked() >= u64::from(cfg.ack_every);
                if !ack_now && !timers.is_set(LinkTimer::AckDelay) {
                    timers.set(LinkTimer::AckDelay, now + cfg.ack_delay);
                }
                Receipt::Deliver { ack_now }
            }
            Verdict::Duplicate => {
                stats.duplicates += 1;
                Receipt::Duplicate
            }
            Verdict::Gap { from, request } => {
                stats.gaps += 1;
                Receipt::Gap {
                    replay: request.then_some(from),
                }
            }
        }
    }

    /// The application handled every message up to `through`
    /// (`Acknowledge::AfterHandled`): what it frees may be acknowledged,
    /// at once if enough is owed, else after the acknowledgment delay.
    /// True if an acknowledgment is due now.
    pub(crate) fn handled(
        &mut self,
        now: Instant,
        through: u64,
        cfg: &ReliabilityConfig,
        timers: &mut impl LinkTimers,
    ) -> bool {
        let moved = self.inbound.handled(through);
        self.ack_moved(moved, now, cfg, timers)
    }

    /// The cluster took (or refused) the room operation numbered `seq`
    /// (`Inbound::wait_for_cluster`). True if an acknowledgment is due now.
    pub(crate) fn settled(
        &mut self,
        now: Instant,
        seq: u64,
        cfg: &ReliabilityConfig,
        timers: &mut impl LinkTimers,
    ) -> bool {
        let moved = self.inbound.settled(seq);
        self.ack_moved(moved, now, cfg, timers)
    }

    /// The acknowledgment point moved (`moved`): an acknowledgment now, or
    /// after the usual delay.
    fn ack_moved(
        &mut self,
        moved: bool,
        now: Instant,
        cfg: &ReliabilityConfig,
        timers: &mut impl LinkTimers,
    ) -> bool {
        if !moved || !self.inbound.ack_pending() {
            return false;
        }
        let ack_now = self.inbound.unacked() >= u64::from(cfg.ack_every);
        if !ack_now && !timers.is_set(LinkTimer::AckDelay) {
            timers.set(LinkTimer::AckDelay, now + cfg.ack_delay);
        }
        ack_now
    }

    /// Applies a cumulative acknowledgment from the peer. On progress the
    /// acknowledgment timeout restarts; the caller then flushes (the window
    /// has room again).
    #[inline(always)]
    pub(crate) fn on_ack(
        &mut self,
        now: Instant,
        ack: u64,
        timers: &mut impl LinkTimers,
        ack_timeout: Duration,
    ) -> Result<Option<Acked>, AckBeyondSent> {
        let done = self.outbound.on_ack(ack)?;
        let Some(through) = done.through else {
            return Ok(None);
        };
        self.outbound.note_progress(now);
        timers.stop(LinkTimer::AckTimeout);
        self.arm_ack_timeout(timers, ack_timeout);
        // Refusals the peer now has no longer hold its acknowledgments back.
        let released = self.inbound.release(through.0);
        Ok(Some(Acked {
            range: done.reported,
            through,
            released,
        }))
    }

    /// Numbers waiting messages into the window while it has room and sends
    /// them on `tx`; with no connection they are numbered and go out on
    /// resume.
    pub(crate) fn flush<P: Port>(
        &mut self,
        now: Instant,
        mut tx: Option<&mut Tx<'_, P>>,
        batch: Option<&BatchConfig>,
        timers: &mut impl LinkTimers,
        ack_timeout: Duration,
    ) -> Result<(), SendFailed> {
        let sent_at = tx.is_some().then_some(now);
        loop {
            let ack = self.inbound.ack_point();
            let Some(s) = self.outbound.sequence_next(sent_at) else {
                break;
            };
            let Some(tx) = tx.as_deref_mut() else {
                continue;
            };
            if s.payload.len() > tx.max_message {
                // Accepted before the peer announced a smaller limit.
                let (id, size, seq) = (s.id, s.payload.len(), s.seq);
                self.outbound.unsequence_last(seq);
                tx.port.too_large(id, size, tx.max_message);
                continue;
            }
            let seq = s.seq;
            let frame = Outbound::frame(s, ack);
            self.inbound.acked_now();
            timers.stop(LinkTimer::AckDelay);
            tx.delivery.messages_sent += 1;
            let detached = matches!(&frame, Frame::Msg(m) if wire::detaches(m, tx.detach));
            // A zero window batches only behind messages still in flight:
            // one that finds the link idle (nothing else unacknowledged,
            // nothing collecting) goes out at once, so that batching costs
            // a lone request no latency.
            let idle = |cfg: &BatchConfig, link: &Link| {
                cfg.window.is_zero() && link.batch.is_none() && link.outbound.in_flight() <= 1
            };
            match (batch, frame) {
                (Some(cfg), Frame::Msg(m)) if tx.batches && !detached && !idle(cfg, self) => {
                    let collecting = self.batch.get_or_insert_with(Box::default);
                    if collecting.push(m, cfg) {
                        self.send_batch(Some(tx), timers)?;
                    } else if !timers.is_set(LinkTimer::Batch) {
                        timers.set(LinkTimer::Batch, now + cfg.window);
                    }
                }
                (_, frame) => {
                    if detached {
                        // A detached message goes alone; what was batched
                        // before it goes first.
                        self.send_batch(Some(tx), timers)?;
                    }
                    self.outbound.note_sent(seq);
                    tx.send(&frame)?;
                }
            }
        }
        self.arm_ack_timeout(timers, ack_timeout);
        Ok(())
    }

    /// Sends the batch being collected, if any.
    pub(crate) fn send_batch<P: Port>(
        &mut self,
        tx: Option<&mut Tx<'_, P>>,
        timers: &mut impl LinkTimers,
    ) -> Result<(), SendFailed> {
        timers.stop(LinkTimer::Batch);
        let (Some(tx), Some(frame)) = (tx, self.batch.take().and_then(|mut b| b.take())) else {
            return Ok(());
        };
        let last = match &frame {
            Frame::Batch(msgs) => msgs.last().map(|m| m.seq),
            Frame::Msg(m) => Some(m.seq),
            _ => None,
        };
        if let Some(seq) = last {
            self.outbound.note_sent(seq);
        }
        tx.send(&frame)
    }

    /// Sends a standalone acknowledgment if one is owed.
    pub(crate) fn flush_ack<P: Port>(
        &mut self,
        tx: Option<&mut Tx<'_, P>>,
        timers: &mut impl LinkTimers,
    ) -> Result<(), SendFailed> {
        timers.stop(LinkTimer::AckDelay);
        match tx {
            Some(tx) if self.inbound.ack_pending() => {
                let ack = self.inbound.acked_now();
                tx.send(&Frame::Ack { ack })
            }
            _ => Ok(()),
        }
    }

    /// Sends every unacknowledged message from `from` on again (a replay
    /// request, or a resume with `from` 1).
    pub(crate) fn retransmit<P: Port>(
        &mut self,
        now: Instant,
        from: u64,
        tx: Option<&mut Tx<'_, P>>,
        timers: &mut impl LinkTimers,
        ack_timeout: Duration,
    ) -> Result<(), SendFailed> {
        // What a batch was collecting is unacknowledged and numbered at or
        // after `from`: the retransmission carries it.
        self.batch = None;
        timers.stop(LinkTimer::Batch);
        let Some(tx) = tx else { return Ok(()) };
        let ack = self.inbound.ack_point();
        let frames: Vec<Frame> = self
            .outbound
            .unacked_from(from)
            .map(|s| {
                s.sent_at = Some(now);
                Outbound::frame(s, ack)
            })
            .collect();
        if frames.is_empty() {
            return Ok(());
        }
        let last = self.outbound.last_sequenced();
        self.outbound.note_sent(last);
        self.inbound.acked_now();
        timers.stop(LinkTimer::AckDelay);
        for f in &frames {
            tx.delivery.retransmitted += 1;
            tx.send(f)?;
        }
        self.arm_ack_timeout(timers, ack_timeout);
        Ok(())
    }

    /// The acknowledgment timeout fired: true if data has waited
    /// `ack_timeout` with no acknowledgment making progress (the connection
    /// is stuck); otherwise it is re-armed for when that would be.
    pub(crate) fn ack_timed_out(
        &self,
        now: Instant,
        timers: &mut impl LinkTimers,
        ack_timeout: Duration,
    ) -> bool {
        let Some(stuck) = self.outbound.stuck_since() else {
            return false;
        };
        let due = stuck + ack_timeout;
        if now >= due {
            return true;
        }
        timers.set(LinkTimer::AckTimeout, due);
        false
    }

    /// The connection is gone: what was being batched stays in the window
    /// (it goes out again on resume), the deadlines stop, and send times
    /// are forgotten.
    pub(crate) fn connection_lost(&mut self, timers: &mut impl LinkTimers) {
        self.batch = None;
        for t in [LinkTimer::AckDelay, LinkTimer::Batch, LinkTimer::AckTimeout] {
            timers.stop(t);
        }
        self.outbound.mark_unsent();
    }

    fn arm_ack_timeout(&self, timers: &mut impl LinkTimers, ack_timeout: Duration) {
        if timers.is_set(LinkTimer::AckTimeout) {
            return;
        }
        if let Some(stuck) = self.outbound.stuck_since() {
            timers.set(LinkTimer::AckTimeout, stuck + ack_timeout);
        }
    }
}
