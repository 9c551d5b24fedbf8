//! The handshake: a connection's first frame, the `hello`, answered by a
//! `welcome` or a `reject` (`on_hello`). Owns version and codec selection
//! (the client's preference wins among codecs both sides speak), agreeing
//! to compression (when the client offers it and the server is configured
//! for it), the resume
//! checks (the key, the identity, the numbers the client claims), the
//! session limit, creating a session, the resume key itself
//! ([`Server::resume_key`]), and where the answer goes: the upgrade
//! response or a frame (`answer_hello`).
//!
//! It handles only a connection's first frame, never an open session's.
//! A wrong or missing key is answered exactly as an unknown session: it
//! never says whether a session exists.

use crate::close::CloseCode;
use crate::config::Acknowledge;
use crate::link::{Link, CAP_BATCH, OWN_CAPS};
use crate::reliable::Outbound;
use crate::wire::{self, Frame, Hello, Reject, ResumeKey, SessionId, Welcome, PROTOCOL_VERSION};

use super::conn::ConnPhase;
use super::delivery::{conn_tx, LinkDeadlines};
use super::session::Session;
use super::{duration_ms, ConnectionId, Server, ServerEvent, ServerTimer, SessionState};

/// Why an upgrade request is refused in-band, after a `101`, for a client
/// that cannot read an HTTP status ([`Server::handle_refused_upgrade`]):
/// each is the in-band form of a status the upgrade would otherwise get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum UpgradeRefusal {
    /// 401: no valid credentials. `reject` `unauthorized`, 4401.
    Unauthorized,
    /// 403 from authentication: not allowed. `reject` `forbidden`, 4403.
    Forbidden,
    /// 403 for the request's `Origin`. `reject` `origin_not_allowed`, 4403.
    Origin,
    /// 503 (or 429): not now. `reject` `try_later`, 4429, with the hint.
    TryLater {
        /// How long the client should wait before its next attempt.
        retry_after: core::time::Duration,
    },
}

impl UpgradeRefusal {
    /// The close code that follows the `reject`.
    pub fn code(self) -> CloseCode {
        match self {
            UpgradeRefusal::Unauthorized => CloseCode::UNAUTHORIZED,
            UpgradeRefusal::Forbidden | UpgradeRefusal::Origin => CloseCode::FORBIDDEN,
            UpgradeRefusal::TryLater { .. } => CloseCode::TRY_LATER,
        }
    }

    /// The `reject`'s machine-readable `reason`.
    pub fn reason(self) -> &'static str {
        match self {
            UpgradeRefusal::Unauthorized => "unauthorized",
            UpgradeRefusal::Forbidden => "forbidden",
            UpgradeRefusal::Origin => "origin_not_allowed",
            UpgradeRefusal::TryLater { .. } => "try_later",
        }
    }

    fn message(self) -> &'static str {
        match self {
            UpgradeRefusal::Unauthorized => "no valid credentials",
            UpgradeRefusal::Forbidden => "not allowed",
            UpgradeRefusal::Origin => "pages of this origin may not connect",
            UpgradeRefusal::TryLater { .. } => "the server cannot take the connection now",
        }
    }
}

impl Server {
    /// Refuses a connection opened only to be refused
    /// ([`Server::handle_refused_upgrade`]).
    pub(super) fn refuse_upgrade(&mut self, connection: ConnectionId, refusal: UpgradeRefusal) {
        let retry = match refusal {
            UpgradeRefusal::TryLater { retry_after } => Some(duration_ms(retry_after)),
            _ => None,
        };
        self.reject(
            connection,
            refusal.code(),
            refusal.reason(),
            refusal.message().to_owned(),
            retry,
        );
    }

    /// The session a `hello` (JSON text, as carried in the upgrade
    /// request or as a first frame) asks to resume, if it shows the
    /// session's key and this server does not hold it: a driver whose
    /// servers share sessions claims it from where it is
    /// ([`import_session`](Self::import_session)) before running the
    /// `hello`. `None` for anything else, malformed input included: the
    /// `hello` then takes its ordinary course.
    pub fn session_to_claim(&self, hello: &str) -> Option<SessionId> {
        let limits = wire::Limits {
            max_message: self.config.max_message_size,
            version: PROTOCOL_VERSION,
        };
        let Ok(Frame::Hello(h)) = wire::decode(wire::Incoming::Text(hello), &limits) else {
            return None;
        };
        let r = h.resume?;
        if self.sessions.contains_key(&r.session) {
            return None;
        }
        r.key
            .filter(|k| k.matches(&self.resume_key(r.session)))
            .map(|_| r.session)
    }

    /// The key that resumes `session`: SipHash-2-4 (128 bits) of its id
    /// under the configured [`ResumeSecret`](crate::config::ResumeSecret).
    pub(crate) fn resume_key(&self, session: SessionId) -> ResumeKey {
        use siphasher::sip128::{Hasher128, SipHasher24};
        let mut h = SipHasher24::new_with_key(&self.config.resume_secret.0);
        core::hash::Hasher::write(&mut h, &session.0);
        ResumeKey(h.finish128().as_bytes())
    }

    fn reject(
        &mut self,
        connection: ConnectionId,
        code: CloseCode,
        reason: &'static str,
        message: String,
        retry_after_ms: Option<u64>,
    ) {
        self.stats.rejected += 1;
        let frame = Frame::Reject(Reject {
            code: code.0,
            reason: reason.into(),
            message,
            versions: self.config.versions.clone(),
            retry_after_ms,
        });
        self.answer_hello(connection, &frame, PROTOCOL_VERSION);
        self.emit(ServerEvent::Rejected {
            connection,
            code,
            reason,
        });
        self.disconnect(connection, code, reason);
    }

    /// Answers a first frame that is not a usable `hello`: `reject`
    /// `bad_hello` (4002) saying why, then the close.
    pub(super) fn reject_hello(&mut self, connection: ConnectionId, message: String) {
        self.reject(
            connection,
            CloseCode::BAD_HANDSHAKE,
            "bad_hello",
            message,
            None,
        );
    }

    pub(super) fn on_hello(&mut self, connection: ConnectionId, h: Hello) {
        let Some(version) = self
            .config
            .versions
            .iter()
            .copied()
            .filter(|v| h.versions.contains(v))
            .max()
        else {
            let message = format!(
                "client offered versions {:?}, server speaks {:?}",
                h.versions, self.config.versions
            );
            self.reject(
                connection,
                CloseCode::UNSUPPORTED_VERSION,
                "unsupported_version",
                message,
                None,
            );
            return;
        };
        // The client's preference wins among codecs both sides speak.
        let Some(codec) = h
            .codecs
            .iter()
            .copied()
            .find(|c| self.config.codecs.contains(c))
        else {
            self.reject(
                connection,
                CloseCode::UNSUPPORTED_CODEC,
                "unsupported_codec",
                "no codec in common".into(),
                None,
            );
            return;
        };
        let Some(conn) = self.conns.get(&connection) else {
            return;
        };
        let identity = conn.identity.clone();
        let fresh = conn.fresh_session;

        let stream = h.caps.iter().any(|c| c == wire::CAP_STREAM);
        let latest = h.caps.iter().any(|c| c == wire::CAP_LATEST);
        let mut was_latest = false;
        let mut lost = None;
        let mut resumed = None;
        if let Some(r) = h.resume {
            let key_ok = r
                .key
                .is_some_and(|k| k.matches(&self.resume_key(r.session)));
            match self.sessions.get(&r.session) {
                // A wrong or missing key is an unknown session: knowing a
                // session's id (from logs, say) is not enough, and the
                // answer does not say whether the session exists.
                None => lost = Some("unknown_session"),
                Some(_) if !key_ok => lost = Some("unknown_session"),
                Some(s) if s.identity != identity => {
                    // Another identity holds this session id: never hand it over.
                    self.stats.resumes_failed += 1;
                    self.reject(
                        connection,
                        CloseCode::FORBIDDEN,
                        "session_forbidden",
                        "the session belongs to another identity".into(),
                        None,
                    );
                    return;
                }
                // Taken up after its server was lost: the client's numbers
                // are the only ones left, and it must say what it had
                // acknowledged (older clients do not).
                Some(s) if s.recovering && r.acked.is_none() => lost = Some("inconsistent"),
                Some(s) if s.recovering && s.stream != stream => lost = Some("inconsistent"),
                Some(s) if s.recovering => resumed = Some(r),
                // More than was ever sent (numbered while detached is not
                // sent), or less than the client already acknowledged (those
                // messages are gone and cannot be sent again): either way the
                // numbers cannot be reconciled.
                Some(s)
                    if r.delivered > s.link.outbound.sent_through()
                        || r.delivered < s.link.outbound.acked_through() =>
                {
                    lost = Some("inconsistent")
                }
                // Its rooms came as streams or through its own sequence: a
                // client that changed its mind would lose what was sent the
                // other way.
                Some(s) if s.stream != stream => lost = Some("inconsistent"),
                Some(_) => resumed = Some(r),
            }
        }
        if lost.is_some() {
            self.stats.resumes_failed += 1;
        }

        let mut recovered = false;
        let (session, delivered) = if let Some(r) = resumed {
            self.set_session_state(r.session, SessionState::Attached(connection));
            let Some(s) = self.sessions.get_mut(&r.session) else {
                return;
            };
            s.client = h.client;
            was_latest = s.latest;
            s.latest = latest;
            if s.recovering {
                // The client's view is the session's: numbering carries on
                // after what it received, and everything it sent after what
                // was acknowledged comes again.
                s.recovering = false;
                recovered = true;
                s.link.outbound.recover(r.delivered);
                s.link.inbound.restore(r.acked.unwrap_or(0));
            }
            // Live room entries wait until the client says where its
            // streams stand.
            s.awaiting_subs = s.stream;
            let acked = s.link.outbound.on_ack(r.delivered).ok();
            if let Some(through) = acked.and_then(|a| a.through) {
                s.link.inbound.release(through.0);
            }
            let delivered = s.link.inbound.ack_point();
            s.link.inbound.on_new_connection();
            self.stats.sessions_resumed += 1;
            if let Some((first, last)) = acked.and_then(|a| a.reported) {
                self.emit(ServerEvent::Acked {
                    session: r.session,
                    first,
                    last,
                });
            }
            (r.session, delivered)
        } else {
            if self.sessions.len() >= self.config.max_sessions {
                self.reject(
                    connection,
                    CloseCode::TRY_AGAIN_LATER,
                    "overloaded",
                    "session limit reached".into(),
                    Some(5_000),
                );
                return;
            }
            let id = fresh;
            if self.sessions.contains_key(&id) {
                // Only a driver passing non-random bytes gets here; never merge
                // two clients into one session.
                self.disconnect(
                    connection,
                    CloseCode::INTERNAL_ERROR,
                    "session id collision",
                );
                return;
            }
            let mut link = Link::new(Outbound::new(&self.config.queue, &self.config.reliability));
            if self.config.acknowledge == Acknowledge::AfterHandled {
                link.inbound.wait_for_handling();
            }
            self.sessions.insert(
                id,
                Box::new(Session {
                    client: h.client,
                    identity: identity.clone(),
                    state: SessionState::Attached(connection),
                    link,
                    deadlines: LinkDeadlines::default(),
                    rooms: Vec::new(),
                    stream,
                    awaiting_subs: false,
                    latest,
                    recovering: false,
                    codec: None,
                }),
            );
            self.stats.sessions_created += 1;
            (id, 0)
        };

        // Compression if the client offers it and this server compresses.
        let deflate = wire::COMPRESSION_BUILT
            && self.config.compression.is_some()
            && h.caps.iter().any(|c| c == wire::CAP_DEFLATE);
        if let Some(s) = self.sessions.get_mut(&session) {
            s.codec = Some(codec);
        }
        if let Some(conn) = self.conns.get_mut(&connection) {
            if let Some(decoder) = conn.decoder.as_mut() {
                decoder.set_compression(deflate);
            }
            conn.phase = ConnPhase::Open {
                session,
                codec,
                version,
                batches: h.caps.iter().any(|c| c == CAP_BATCH),
                detach: h.caps.iter().any(|c| c == wire::CAP_DETACH),
                pinged: h.caps.iter().any(|c| c == wire::CAP_PING),
                deflate,
                maps: h.caps.iter().any(|c| c == wire::CAP_MAPS),
            };
            conn.hello_deadline = None;
        }
        let pinged = h.caps.iter().any(|c| c == wire::CAP_PING);
        let welcome = Frame::Welcome(Welcome {
            version,
            codec,
            session,
            resumed: resumed.is_some(),
            lost: lost.map(String::from),
            delivered,
            features: self.features[usize::from(deflate)].clone(),
            ping_interval_ms: duration_ms(self.config.ping_interval),
            pong_timeout_ms: duration_ms(self.config.pong_timeout),
            max_message: self.config.max_message_size as u64,
            key: Some(self.resume_key(session)),
            recovered,
        });
        self.answer_hello(connection, &welcome, version);
        self.emit(ServerEvent::SessionOpened {
            connection,
            session,
            client: h.client,
            identity,
            resumed: resumed.is_some(),
        });
        let idle_at = self.now + self.config.idle_timeout;
        self.arm(idle_at, ServerTimer::Idle(connection));
        if pinged {
            let at = self.now + self.config.ping_interval;
            self.arm(at, ServerTimer::Ping(connection));
        }
        if let Some(age) = self.config.max_connection_age {
            // Up to 10 % earlier, derived from the connection id: spread out,
            // yet deterministic.
            let spread = age.mul_f64((spread_hash(connection.0) % 1000) as f64 / 10_000.0);
            let at = self.now + age.saturating_sub(spread);
            self.arm(at, ServerTimer::Rotate(connection));
        }
        self.retransmit(session, 1);
        if resumed.is_none() {
            // A new session: the rooms the hello asks for, answered right
            // after the welcome (a resumed session has its rooms).
            for room in &h.join {
                self.join_from_hello(session, room);
            }
        }
        self.flush(session);
        self.latest_snapshot(session, was_latest);
        self.maps_snapshot(session);
        if self.lag_worth(session) {
            self.watch_lag(session);
        }
    }

    /// Sends the answer to a `hello` (`welcome` or `reject`, always JSON):
    /// kept for the upgrade response while [`Server::handle_upgrade`] runs
    /// for this connection, else as a frame.
    fn answer_hello(&mut self, connection: ConnectionId, frame: &Frame, version: u8) {
        if matches!(self.upgrade, Some((c, None)) if c == connection) {
            if let Ok(answer) = wire::handshake_header(frame) {
                self.stats.traffic.frames_out += 1;
                self.stats.traffic.bytes_out += answer.len() as u64;
                self.upgrade = Some((connection, Some(answer)));
                return;
            }
        }
        let (encoder, outputs) = (&mut self.encoder, &mut self.outputs);
        let mut tx = conn_tx(
            connection,
            &ConnPhase::AwaitingHello,
            None,
            encoder,
            outputs,
            &mut self.stats,
        );
        tx.version = version;
        if tx.send(frame).is_err() {
            self.encode_failed(connection);
        }
    }
}

impl Server {
    /// The `welcome`'s features: the configured ones, the server's own, and
    /// `deflate` when the connection agreed on compression (`deflate`
    /// true). Built once, with the server: every `welcome` shares them.
    pub(super) fn welcome_features(
        config: &crate::config::ServerConfig,
        deflate: bool,
    ) -> std::sync::Arc<[wire::CapName]> {
        let mut features: Vec<wire::CapName> = config
            .features
            .iter()
            .map(|f| wire::cap_name(f.as_str().into()))
            .collect();
        for name in OWN_CAPS
            .into_iter()
            .chain([wire::FEATURE_JOIN])
            .chain(deflate.then_some(wire::CAP_DEFLATE))
        {
            if !features.iter().any(|f| f == name) {
                features.push(wire::CapName::Borrowed(name));
            }
        }
        features.into()
    }
}

/// SplitMix64's finalizer: a well-spread hash of a small integer.
pub(super) fn spread_hash(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
