//! Requests, responses, and the values `send_latest` holds back.
//!
//! Owns the pending requests and their deadlines (a response settles one as
//! it is delivered; a timeout or the loss of the session fails it),
//! responses to the peer's requests, and the coalescer behind
//! `send_latest`, which holds the newest value per key until its interval
//! has passed. What goes out is an ordinary reliable message, through
//! `enqueue`: nothing here sends a frame or touches the delivery pipe
//! directly.

use core::time::Duration;

use crate::coalesce::{Coalesced, Pushed};
use crate::reliable::{MessageId, Outgoing, SendError};
use crate::time::Instant;
use crate::wire::{MsgKind, Payload};

use super::{Client, Event, RequestError, Timer};

impl Client {
    /// Sends a request: a reliable message the peer answers with a response.
    /// The answer arrives as [`Event::Response`]; if none arrives within
    /// `timeout`, [`Event::RequestFailed`] with [`RequestError::TimedOut`].
    /// A request in flight across a reconnect is answered once the session
    /// resumes; if the session is lost, it fails with
    /// [`RequestError::SessionLost`].
    pub fn request(
        &mut self,
        now: Instant,
        payload: Payload,
        timeout: Duration,
    ) -> Result<MessageId, SendError> {
        self.advance(now);
        let max = self.config.max_pending_requests;
        if self.requests.len() >= max {
            return Err(SendError::TooManyRequests { max });
        }
        let id = self.enqueue(now, Outgoing::new(MsgKind::Request, payload))?;
        let deadline = self.now + timeout;
        self.requests.insert(id, deadline);
        self.request_deadlines.insert((deadline, id));
        self.arm_request_timer();
        Ok(id)
    }

    /// Stops waiting for a request's response. Returns whether it was
    /// pending. A response that arrives later is reported as
    /// [`Event::LateResponse`] and discarded.
    pub fn cancel_request(&mut self, now: Instant, request: MessageId) -> bool {
        self.advance(now);
        let Some(deadline) = self.requests.remove(&request) else {
            return false;
        };
        self.request_deadlines.remove(&(deadline, request));
        self.arm_request_timer();
        true
    }

    /// Answers a request the peer sent (a [`Received`] with `request: true`).
    ///
    /// [`Received`]: super::Received
    pub fn respond(
        &mut self,
        now: Instant,
        request: MessageId,
        payload: Payload,
    ) -> Result<MessageId, SendError> {
        self.enqueue(now, Outgoing::new(MsgKind::Response(request.0), payload))
    }

    /// Sends the latest value for `key` (a cursor, a position): at most one
    /// message per key per [`ClientConfig::coalesce_interval`] (60 a second by
    /// default), the newest value replacing any that waited, and the final
    /// value always sent. Values that go out are ordinary reliable messages.
    ///
    /// [`ClientConfig::coalesce_interval`]: crate::config::ClientConfig::coalesce_interval
    pub fn send_latest(
        &mut self,
        now: Instant,
        key: &str,
        payload: Payload,
    ) -> Result<(), SendError> {
        self.advance(now);
        self.check_sendable(&payload)?;
        match self.coalescer.push(self.now, key.to_owned(), payload) {
            Ok(Pushed::Emit(c)) => {
                self.send_inner(now, c.value, None)?;
            }
            Ok(_) => {}
            Err(_) => {
                return Err(SendError::QueueFull {
                    messages: self.coalescer.len(),
                    bytes: 0,
                })
            }
        }
        self.arm_coalesce_timer();
        Ok(())
    }

    fn arm_coalesce_timer(&mut self) {
        match self.coalescer.poll_timeout() {
            Some(at) => self.timers.set(Timer::Coalesce, at),
            None => self.timers.stop(Timer::Coalesce),
        }
    }

    /// Sends every coalesced value whose time has come (`all`: every held
    /// value, for a close).
    pub(super) fn release_latest(&mut self, all: bool) {
        let ready: Vec<Coalesced<String, Payload>> = if all {
            self.coalescer.flush().collect()
        } else {
            let now = self.now;
            core::iter::from_fn(|| self.coalescer.poll_ready(now)).collect()
        };
        for c in ready {
            if let Err(error) = self.enqueue(self.now, Outgoing::new(MsgKind::Plain, c.value)) {
                self.emit(Event::LatestFailed { key: c.key, error });
            }
        }
        self.arm_coalesce_timer();
    }

    /// Requests waiting for a response.
    pub fn pending_requests(&self) -> usize {
        self.requests.len()
    }

    pub(super) fn arm_request_timer(&mut self) {
        match self.request_deadlines.first() {
            Some((at, _)) => self.timers.set(Timer::Request, *at),
            None => self.timers.stop(Timer::Request),
        }
    }

    pub(super) fn expire_requests(&mut self) {
        while let Some(&(at, id)) = self.request_deadlines.first() {
            if at > self.now {
                break;
            }
            self.request_deadlines.pop_first();
            self.requests.remove(&id);
            self.emit(Event::RequestFailed {
                request: id,
                error: RequestError::TimedOut,
            });
        }
        self.arm_request_timer();
    }

    /// Fails every pending request except those still waiting unsent (they
    /// go out, and can be answered, in the next session).
    pub(super) fn fail_requests(&mut self, error: RequestError, keep: &[MessageId]) {
        let failed: Vec<MessageId> = self
            .requests
            .keys()
            .copied()
            .filter(|id| !keep.contains(id))
            .collect();
        for id in failed {
            if let Some(deadline) = self.requests.remove(&id) {
                self.request_deadlines.remove(&(deadline, id));
            }
            self.emit(Event::RequestFailed { request: id, error });
        }
        self.arm_request_timer();
    }
}
