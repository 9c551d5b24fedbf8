//! The handshake: from an open transport to an open session.
//!
//! Owns the `hello` (offered in the upgrade request, or sent as the first
//! frame) and the server's answers to it: a `welcome` (the connection's
//! settings, compression offered and agreed or not, the session resumed
//! or lost), a `reject`, a `goaway` (which may also come on an open
//! session). It never delivers messages. An answer
//! that ends the attempt goes to `connection_ended`, except the two settled
//! here: a welcome choosing a version or codec never offered fails at once,
//! and a rotation `goaway` resumes without counting a failure.

use core::time::Duration;

use crate::close::{CloseCode, Disposition};
use crate::link::CAP_BATCH;
use crate::time::Instant;
use crate::wire::{
    self, Frame, Hello, Incoming, Limits, Reject, Resume, Welcome, PROTOCOL_VERSION,
};

use super::{
    Cause, Client, ConnSettings, Event, FailReason, LostReason, State, Timer, TransportId,
};

impl Client {
    /// The `hello` to put in the upgrade request of `transport`, in the
    /// [`wire::HELLO_HEADER`] header: call it after [`Output::Connect`],
    /// before the request goes out. Report the `101` response with
    /// [`handle_upgraded`](Self::handle_upgraded).
    ///
    /// `None`: send the upgrade without it; the `hello` then goes as the
    /// first frame. That is so when [`ClientConfig::hello_in_upgrade`] is
    /// off, after a server left one unanswered, when the `hello` is longer
    /// than [`wire::MAX_HELLO_HEADER`], or when `transport` is not the one
    /// being opened.
    ///
    /// [`Output::Connect`]: super::Output::Connect
    /// [`ClientConfig::hello_in_upgrade`]: crate::config::ClientConfig::hello_in_upgrade
    pub fn upgrade_hello(&mut self, transport: TransportId) -> Option<String> {
        if !self.config.hello_in_upgrade
            || self.hello_upgrade_refused
            || self.transport != Some(transport)
            || !matches!(self.state, State::Connecting { .. })
        {
            return None;
        }
        let value = wire::handshake_header(&self.hello()).ok()?;
        if value.len() > wire::MAX_HELLO_HEADER {
            return None;
        }
        self.hello_upgrade = Some(transport);
        self.stats.traffic.frames_out += 1;
        self.stats.traffic.bytes_out += value.len() as u64;
        Some(value)
    }

    /// The `hello` to put in the request URL of `transport`, in the query
    /// parameter [`wire::HELLO_PARAM`] (percent-encoded): for drivers that
    /// can neither set request headers nor read the response's, as in a
    /// browser. Call it after [`Output::Connect`], before the request goes
    /// out. The server then answers as its first frame (PROTOCOL.md,
    /// section 4.2), and the client sends no `hello` frame.
    ///
    /// `None`: open the WebSocket without it; the `hello` then goes as the
    /// first frame. That is so after a server never answered one (it
    /// closed with 4002 or the connect timeout passed while the client
    /// waited for the answer), when the `hello` is longer than
    /// [`wire::MAX_HELLO_HEADER`], or when `transport` is not the one
    /// being opened.
    ///
    /// [`Output::Connect`]: super::Output::Connect
    pub fn url_hello(&mut self, transport: TransportId) -> Option<String> {
        if self.hello_url_refused
            || self.transport != Some(transport)
            || !matches!(self.state, State::Connecting { .. })
        {
            return None;
        }
        let value = wire::handshake_header(&self.hello()).ok()?;
        if value.len() > wire::MAX_HELLO_HEADER {
            return None;
        }
        self.hello_url = Some(transport);
        self.stats.traffic.frames_out += 1;
        self.stats.traffic.bytes_out += value.len() as u64;
        Some(value)
    }

    /// The `hello` in the URL of the transport that just ended went
    /// unanswered (`code` 4002 from a server that waited for a `hello`
    /// frame, or no code: the connect timeout): later connections send
    /// it as the first frame. Any other end leaves the choice as it was.
    pub(super) fn url_hello_unanswered(&mut self, code: Option<CloseCode>) {
        let waiting = matches!(self.state, State::Handshaking { .. })
            && self.hello_url.is_some()
            && self.hello_url == self.transport;
        if waiting && code.is_none_or(|c| c == CloseCode::BAD_HANDSHAKE) {
            self.hello_url_refused = true;
        }
    }

    /// The transport the machine asked for is open (the WebSocket upgrade
    /// succeeded), and its response carried no [`wire::WELCOME_HEADER`]:
    /// the same as [`handle_upgraded`](Self::handle_upgraded) with `None`.
    pub fn handle_transport_opened(&mut self, now: Instant, transport: TransportId) {
        self.handle_upgraded(now, transport, None);
    }

    /// The transport the machine asked for is open: the WebSocket upgrade
    /// succeeded. `welcome` is the value of the response's
    /// [`wire::WELCOME_HEADER`] header, if it had one.
    ///
    /// If the request carried the `hello` ([`upgrade_hello`](Self::upgrade_hello))
    /// and the server answered it, the answer is handled like a first frame
    /// (a `welcome` opens the session at once). Otherwise the `hello` goes
    /// out as the first frame, and later connections no longer offer it in
    /// the upgrade. An answer nobody asked for is ignored.
    pub fn handle_upgraded(&mut self, now: Instant, transport: TransportId, welcome: Option<&str>) {
        self.advance(now);
        if self.transport != Some(transport) {
            return;
        }
        let State::Connecting { attempt } = self.state else {
            return;
        };
        let offered = self.hello_upgrade.take() == Some(transport);
        self.set_state(State::Handshaking { attempt });
        if self.hello_url == Some(transport) && !offered {
            // The `hello` went in the URL: its answer is the first frame.
            return;
        }
        match welcome {
            Some(text) if offered => {
                self.stats.traffic.frames_in += 1;
                self.stats.traffic.bytes_in += text.len() as u64;
                let limits = Limits {
                    max_message: self.config.max_message_size,
                    version: PROTOCOL_VERSION,
                };
                match wire::decode(Incoming::Text(text), &limits) {
                    Ok(frame) => self.on_frame(frame),
                    // The server considers the handshake done; this
                    // connection cannot be repaired.
                    Err(e) => self.protocol_error(format!("the upgrade's welcome header: {e}")),
                }
            }
            _ => {
                if offered {
                    self.hello_upgrade_refused = true;
                }
                let hello = self.hello();
                self.transmit_hello(transport, &hello);
            }
        }
    }

    /// The `hello` for a new connection: resuming the session, if any;
    /// for a new session, with the joins waiting at the front of the queue
    /// in its `join`, so that they cost no round trip (they go back to the
    /// queue unless the `welcome` says the server took them).
    fn hello(&mut self) -> Frame {
        self.restore_hello_joins();
        self.hello_rooms.clear();
        let join = if self.session.is_none() {
            self.hello_joins = self.link.outbound.take_front_joins(wire::MAX_LIST_LEN);
            self.hello_joins
                .iter()
                .filter_map(|j| j.room.clone())
                .collect()
        } else {
            // Resuming: the rooms it is in, for a server that finds the
            // session lost to join at once, as long as they leave the
            // `hello` well within a header (room names escaped as JSON
            // grow at most threefold).
            let size: usize = self
                .rooms
                .iter()
                .map(|r| r.len() + 2 * r.bytes().filter(|b| !b.is_ascii()).count() + 3)
                .sum();
            if self.rooms.iter().count() <= wire::MAX_LIST_LEN && size <= wire::MAX_HELLO_HEADER / 2
            {
                self.hello_rooms = self.rooms.iter().cloned().collect();
            }
            self.hello_rooms.clone()
        };
        Frame::Hello(Hello {
            versions: self.config.versions.clone(),
            client: self.client_id,
            resume: self.session.map(|session| Resume {
                session,
                delivered: self.link.inbound.delivered(),
                key: self.resume_key,
                acked: Some(self.link.outbound.acked_through()),
            }),
            // Built once with the machine (`ClientConfig::hello_caps`): the
            // names it knows are borrowed, so this copies one list.
            caps: self.hello_caps.clone(),
            codecs: self.config.codecs.clone(),
            join,
        })
    }

    /// Puts joins a `hello` carried back at the front of the waiting
    /// queue, in order: its connection ended before a `welcome`, or the
    /// `welcome` did not take them.
    pub(super) fn restore_hello_joins(&mut self) {
        for j in std::mem::take(&mut self.hello_joins).into_iter().rev() {
            self.link.outbound.push_front_system(j);
        }
    }

    /// The `welcome` of a new session from a server that joins a
    /// `hello`'s rooms (`join` among its features) took the joins the
    /// `hello` carried: acknowledged, as a message would be once the
    /// server took it, and remembered by room for a refusal (id 0).
    fn hello_joins_taken(&mut self) {
        self.hello_joined.clear();
        for j in std::mem::take(&mut self.hello_joins) {
            if !j.own {
                self.emit(Event::Acked {
                    first: j.id,
                    last: j.id,
                });
            }
            if let Some(room) = j.room {
                self.hello_joined.push((room, j.id));
            }
        }
    }

    /// Whether the `hello` offers compression: configured, and built.
    fn offers_deflate(&self) -> bool {
        wire::COMPRESSION_BUILT && self.config.compression.is_some()
    }

    pub(super) fn on_welcome(&mut self, w: Welcome) {
        let Some(transport) = self.transport else {
            return;
        };
        self.maps_reconnected();
        if !self.config.versions.contains(&w.version) || !self.config.codecs.contains(&w.codec) {
            // The server picked something we never offered: retrying the same
            // offer would get the same answer.
            self.drop_connection(
                CloseCode::UNSUPPORTED_VERSION,
                "server chose an unoffered version or codec",
            );
            let reason = if self.config.versions.contains(&w.version) {
                FailReason::UnsupportedCodec
            } else {
                FailReason::UnsupportedVersion {
                    offered: self.config.versions.clone(),
                    supported: vec![w.version],
                }
            };
            self.set_state(State::Failed { reason });
            return;
        }
        let hb = &self.config.heartbeat;
        let ping_interval = clamp_ms(w.ping_interval_ms, 100, 3_600_000, hb.interval);
        let pong_timeout = clamp_ms(w.pong_timeout_ms, 100, 600_000, hb.timeout);
        let peer_max = usize::try_from(w.max_message).unwrap_or(usize::MAX).max(64);
        self.timers.stop(Timer::Connect);
        // Compression only if offered: a server that agrees to what was
        // never offered is not taken at its word.
        let deflate = self.offers_deflate() && w.features.iter().any(|f| f == wire::CAP_DEFLATE);
        self.decoder.set_compression(deflate);
        self.conn = Some(ConnSettings {
            id: transport,
            version: w.version,
            codec: w.codec,
            ping_interval,
            pong_timeout,
            peer_max_message: peer_max,
            peer_batches: w.features.iter().any(|f| f == CAP_BATCH),
            peer_detach: w.features.iter().any(|f| f == wire::CAP_DETACH),
            deflate,
            ping: None,
            last_rx: self.now,
            in_grace: false,
        });
        let requested = self.session;
        let resumed = w.resumed && requested == Some(w.session);
        if w.resumed && !resumed {
            self.protocol_error("welcome resumed a session that was not requested".into());
            return;
        }
        let joins_taken = !resumed && w.features.iter().any(|f| f == wire::FEATURE_JOIN);
        if !joins_taken || requested.is_none() {
            self.hello_rooms.clear();
        }
        if resumed {
            match self.link.outbound.on_ack(w.delivered) {
                Ok(done) => {
                    if let Some((first, last)) = done.reported {
                        self.emit(Event::Acked { first, last });
                    }
                    if let Some(through) = done.through {
                        self.left_through(through);
                        // Taken before this connection: its snapshot,
                        // next, has them.
                        self.maps_acked(through);
                    }
                }
                Err(_) => {
                    // The server claims more than we ever sent: its session is
                    // not ours. Start clean rather than guess.
                    self.discard_session(LostReason::Inconsistent, false);
                    self.drop_connection(CloseCode::PROTOCOL_ERROR, "inconsistent resume");
                    self.connection_ended(
                        Cause::Protocol("welcome acknowledged unsent messages".into()),
                        Disposition::Reconnect,
                        None,
                    );
                    return;
                }
            }
            self.stats.resumes += 1;
        } else if requested.is_some() {
            let reason =
                LostReason::NotResumed(w.lost.clone().unwrap_or_else(|| "not_resumed".into()));
            self.discard_session(reason, false);
        }
        // The rooms the resuming `hello` listed, joined in the new session:
        // those the lost session's rejoins leave out.
        let rooms_taken = std::mem::take(&mut self.hello_rooms);
        self.session = Some(w.session);
        self.resume_key = w.key;
        self.hello_url = None;
        self.link.inbound.on_new_connection();
        self.stats.opens += 1;
        self.emit(Event::Connected {
            session: w.session,
            resumed,
            recovered: resumed && w.recovered,
            version: w.version,
            codec: w.codec,
        });
        if joins_taken {
            self.hello_joins_taken();
            for room in rooms_taken {
                self.hello_joined
                    .push((room, crate::reliable::MessageId::SYSTEM));
            }
        } else {
            self.restore_hello_joins();
        }
        self.set_state(State::Open);
        if resumed && w.features.iter().any(|f| f == wire::CAP_STREAM) {
            self.send_subs();
        }
        self.timers.set(Timer::Ping, self.now + ping_interval);
        self.timers
            .set(Timer::Stability, self.now + self.config.stability_window);
        self.retransmit_from(1);
        self.flush();
    }

    pub(super) fn on_reject(&mut self, r: Reject) {
        let code = CloseCode(r.code);
        // Echo the server's code only if it may appear on the wire at all.
        let echo = if code.is_sendable() {
            code
        } else {
            CloseCode::PROTOCOL_ERROR
        };
        self.drop_connection(echo, "rejected");
        let hint = r.retry_after_ms.map(Duration::from_millis);
        let disposition = match code.disposition() {
            // A reject is never a polite end of session.
            Disposition::Stop => Disposition::Reconnect,
            d => d,
        };
        if code == CloseCode::UNSUPPORTED_VERSION {
            self.connection_ended_with(FailReason::UnsupportedVersion {
                offered: self.config.versions.clone(),
                supported: r.versions,
            });
            return;
        }
        let cause = Cause::Rejected {
            code,
            reason: r.reason,
        };
        self.connection_ended(cause, disposition, hint);
    }

    pub(super) fn on_goaway(&mut self, code: CloseCode, retry_after_ms: Option<u64>) {
        let hint = retry_after_ms.map(Duration::from_millis);
        self.drop_connection(CloseCode::RETRY, "server asked to reconnect");
        if code == CloseCode::ROTATE {
            // A planned rotation is not a failure: resume at once.
            self.forget_connection();
            match hint {
                Some(h) if !h.is_zero() => {
                    let at = self.now + h.min(self.config.max_retry_after);
                    self.timers.set(Timer::Backoff, at);
                    self.set_state(State::Reconnecting {
                        attempt: self.failures,
                        at,
                        cause: Cause::GoAway { code },
                    });
                }
                _ => self.start_attempt(),
            }
            return;
        }
        let disposition = match code.disposition() {
            Disposition::Stop => Disposition::Reconnect,
            d => d,
        };
        self.connection_ended(Cause::GoAway { code }, disposition, hint);
    }
}

fn clamp_ms(ms: u64, min: u64, max: u64, fallback: Duration) -> Duration {
    if ms == 0 {
        return fallback;
    }
    Duration::from_millis(ms.clamp(min, max))
}
