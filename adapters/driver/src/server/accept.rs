//! The server task: accepts connections from the listener (if any), fires
//! the core's timers, starts the asynchronous re-authentication checks the
//! state left for it, and carries out shutdown once every handle is gone or
//! one asked for it.
//!
//! It never reads or writes a connection's socket and never awaits a
//! check: each accepted socket and each check gets a task of its own
//! ([`serve_accepted`], [`settle_token`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_channel::mpsc;
use futures_util::StreamExt;
use kitestring_core::close::CloseCode;
use tracing::{debug, trace, warn};

use crate::drive::DriveTimer;
use crate::runtime::AsyncListener;

use super::auth::AuthReject;
use super::shared::{lock_slot, CloseOrder, ServerShared, TokenCheck, Wakes};
use super::upgrade::serve_accepted;

/// The server task: accepts connections, fires the core's timers, and
/// carries out shutdown. Everything else happens in the connection tasks
/// and the handles' calls.
pub(super) struct ServerTask {
    pub(super) shared: Arc<ServerShared>,
    pub(super) timer: DriveTimer,
    pub(super) listener: Option<Box<dyn AsyncListener>>,
    /// Ends (`Ready(None)`) when the last handle is dropped.
    pub(super) alive: mpsc::Receiver<()>,
    pub(super) handles_gone: bool,
    /// When the timer is to wake the task: the core's deadline, or the end
    /// of shutdown's wait, as the task last saw them under the state's
    /// lock. Only a look at the state ([`ServerShared::look`]) changes it.
    pub(super) deadline: Option<std::time::Instant>,
}

impl ServerTask {
    /// Connections accepted per wake-up before yielding to the executor.
    const ACCEPT_BUDGET: usize = 64;

    pub(super) async fn run(mut self) {
        std::future::poll_fn(|cx| self.poll(cx)).await;
        let mut wakes = Wakes::default();
        let replies = {
            let mut st = self.shared.lock();
            st.stopped = true;
            self.shared.stop_events(&mut wakes);
            // Connections still open after the close timeout are told again.
            for slot in st.conns.values() {
                lock_slot(slot).order(
                    CloseOrder {
                        code: CloseCode::GOING_AWAY,
                        reason: "shutting down",
                        flush: false,
                        abort: false,
                    },
                    &mut wakes,
                );
            }
            st.shutdown.take().map(|s| s.replies).unwrap_or_default()
        };
        wakes.wake(&self.shared);
        for r in replies {
            let _ = r.send(());
        }
        debug!("server task stopped");
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let shared = self.shared.clone();
        shared.task.register(cx.waker());
        if !self.handles_gone {
            if let Poll::Ready(None) = self.alive.poll_next_unpin(cx) {
                // Every handle is gone: nobody can send or shut down any
                // more, so shut down now.
                self.handles_gone = true;
                shared.run(None, |st, now| st.begin_shutdown(&shared, now, None));
            }
        }
        if shared.stop_listening.load(Ordering::Acquire) {
            self.listener = None;
        }
        if let Some(listener) = &self.listener {
            for accepted in 0.. {
                if accepted == Self::ACCEPT_BUDGET {
                    cx.waker().wake_by_ref();
                    break;
                }
                match listener.poll_accept(cx) {
                    Poll::Ready(Ok((io, addr))) => {
                        trace!(%addr, "accepted");
                        shared
                            .runtime
                            .spawn(serve_accepted(shared.clone(), io, Some(addr)));
                    }
                    Poll::Ready(Err(e)) => {
                        // Out of file descriptors and the like: keep serving
                        // the connections we have, and try again later.
                        warn!(error = %e, "accept failed");
                        cx.waker().wake_by_ref();
                        break;
                    }
                    Poll::Pending => break,
                }
            }
        }
        // Look at the state again without being asked: the timer fired.
        let mut again = false;
        loop {
            if !std::mem::take(&mut again) && !shared.look.swap(false, Ordering::AcqRel) {
                // Woken for the listener alone: the deadline is the one
                // seen last, so the state's lock is not needed.
                if self
                    .timer
                    .poll(&*shared.runtime, self.deadline, cx)
                    .is_ready()
                {
                    again = true;
                    continue;
                }
                return Poll::Pending;
            }
            let now_std = shared.runtime.now();
            let now = shared.clock.core(now_std);
            let mut wakes = Wakes::default();
            let checks;
            let (deadline, stop) = {
                let mut st = shared.lock();
                checks = std::mem::take(&mut st.token_checks);
                let deadline = st.server.poll_timeout().map(|d| d.at);
                if deadline.is_some_and(|at| now >= at) {
                    st.server.handle_timeout(now);
                    st.armed = None;
                    st.drain(&shared, now, None, &mut wakes);
                    drop(st);
                    wakes.wake(&shared);
                    for check in checks {
                        let task = settle_token(shared.clone(), check);
                        shared.runtime.spawn(Box::pin(task));
                    }
                    again = true;
                    continue;
                }
                st.armed = deadline;
                let mut deadline = deadline.map(|at| shared.clock.std(at));
                let mut stop = false;
                if let Some(shutdown) = &st.shutdown {
                    stop = st.conns.is_empty() || now_std >= shutdown.give_up;
                    deadline = Some(deadline.map_or(shutdown.give_up, |d| d.min(shutdown.give_up)));
                }
                (deadline, stop)
            };
            for check in checks {
                let task = settle_token(shared.clone(), check);
                shared.runtime.spawn(Box::pin(task));
            }
            if stop {
                return Poll::Ready(());
            }
            self.deadline = deadline;
            if self.timer.poll(&*shared.runtime, deadline, cx).is_ready() {
                again = true;
                continue;
            }
            return Poll::Pending;
        }
    }
}

/// Awaits an asynchronous re-authentication verdict (bounded by the
/// authentication timeout: past it, the connection is closed with 1013 and
/// the client comes back later), then carries it out under the lock.
async fn settle_token(shared: Arc<ServerShared>, check: TokenCheck) {
    let limit = shared.options.auth_timeout;
    let verdict = crate::util::timeout(&*shared.runtime, limit, check.verdict)
        .await
        .unwrap_or_else(|| {
            debug!(
                connection = check.connection.0,
                ?limit,
                "re-authentication timed out"
            );
            Err(AuthReject::Unavailable)
        });
    shared.run(None, |st, now| {
        if !st.stopped {
            st.apply_token(now, check.connection, check.session, verdict);
        }
    });
}
