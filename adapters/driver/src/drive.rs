//! The machinery every driver loop shares, written once against
//! [`Runtime`]: a deadline timer that checks the clock before trusting the
//! timer, the conversion between the runtime's clock and the core's, a
//! budget that makes a busy loop yield, and a readiness flag that spares
//! polls of a socket with nothing to read.
//!
//! Private to the driver. Each value holds only its own small state; nothing
//! here spawns a task, takes a lock or blocks.

use std::fmt::Debug;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use crate::runtime::{AsyncTimer, Runtime};

/// Waits for `timer` to reach `deadline`, checking the clock first: a
/// deadline already past is ready even if the timer future would still say
/// Pending (tokio's cooperative budget can do that; quinn's `drive_timer`
/// makes the same check). Re-arms the timer only when the deadline moved.
#[derive(Debug)]
pub(crate) struct DriveTimer {
    timer: Pin<Box<dyn AsyncTimer>>,
    armed: Option<Instant>,
}

impl DriveTimer {
    pub(crate) fn new(runtime: &dyn Runtime) -> Self {
        let now = runtime.now();
        DriveTimer {
            timer: runtime.new_timer(now),
            armed: None,
        }
    }

    /// Ready when `deadline` (if any) has passed.
    pub(crate) fn poll(
        &mut self,
        runtime: &dyn Runtime,
        deadline: Option<Instant>,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        let Some(at) = deadline else {
            self.armed = None;
            return Poll::Pending;
        };
        if runtime.now() >= at {
            return Poll::Ready(());
        }
        if self.armed != Some(at) {
            self.timer.as_mut().reset(at);
            self.armed = Some(at);
        }
        self.timer.as_mut().poll(cx)
    }
}

/// Converts between the runtime's clock and the core's [`kitestring_core::Instant`]
/// (nanoseconds since a start instant fixed when the driver starts).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    start: Instant,
}

impl Clock {
    pub(crate) fn new(runtime: &dyn Runtime) -> Self {
        Clock {
            start: runtime.now(),
        }
    }

    pub(crate) fn core(&self, at: Instant) -> kitestring_core::Instant {
        let nanos = at.saturating_duration_since(self.start).as_nanos();
        kitestring_core::Instant::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    pub(crate) fn now(&self, runtime: &dyn Runtime) -> kitestring_core::Instant {
        self.core(runtime.now())
    }

    pub(crate) fn std(&self, at: kitestring_core::Instant) -> Instant {
        let d = std::time::Duration::from_nanos(at.as_nanos());
        self.start
            .checked_add(d)
            .unwrap_or(self.start + std::time::Duration::from_secs(86_400 * 365))
    }
}

/// Makes a driver loop yield to the executor after a run of inputs that
/// were all ready at once (a flood of frames, say), so one busy connection
/// cannot monopolize a worker thread on runtimes without a cooperative
/// budget (async-io based ones).
#[derive(Debug, Default)]
pub(crate) struct Budget {
    ready_in_a_row: u32,
}

impl Budget {
    const MAX_READY: u32 = 64;

    /// Polls `f` until it is ready, first yielding once if the previous
    /// [`MAX_READY`](Self::MAX_READY) calls were all ready without waiting.
    pub(crate) async fn run<T>(&mut self, mut f: impl FnMut(&mut Context<'_>) -> Poll<T>) -> T {
        let mut first = true;
        let yield_first = self.ready_in_a_row >= Self::MAX_READY;
        let ready_in_a_row = &mut self.ready_in_a_row;
        std::future::poll_fn(move |cx| {
            if first && yield_first {
                first = false;
                *ready_in_a_row = 0;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let was_first = first;
            first = false;
            match f(cx) {
                Poll::Ready(v) => {
                    if was_first {
                        *ready_in_a_row += 1;
                    } else {
                        *ready_in_a_row = 0;
                    }
                    Poll::Ready(v)
                }
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }
}

/// Remembers whether a source (a socket's read side) has signalled since
/// it last returned `Pending`, so a task that polls several sources on every
/// wake-up does not poll one that is known to have nothing. This matters for
/// sockets: tungstenite zero-fills its read buffer (4 KiB) before every read
/// attempt, so a spurious poll costs a few hundred instructions and a
/// `read` system call that fails.
pub(crate) struct ReadyFlag {
    inner: std::sync::Arc<FlagWaker>,
    /// `inner` as a waker, made once: the source is polled with it on
    /// every read attempt, and making it each time would bump and drop the
    /// shared count, a cache line the waking thread also writes.
    waker: std::task::Waker,
}

struct FlagWaker {
    ready: std::sync::atomic::AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl std::task::Wake for FlagWaker {
    fn wake(self: std::sync::Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &std::sync::Arc<Self>) {
        self.ready.store(true, std::sync::atomic::Ordering::Release);
        self.task.wake();
    }
}

impl ReadyFlag {
    /// A flag that starts ready: the first poll always goes through.
    pub(crate) fn new() -> Self {
        let inner = std::sync::Arc::new(FlagWaker {
            ready: std::sync::atomic::AtomicBool::new(true),
            task: futures_util::task::AtomicWaker::new(),
        });
        ReadyFlag {
            waker: std::task::Waker::from(inner.clone()),
            inner,
        }
    }

    /// Polls the source through `poll` only if it may have something: it
    /// signalled since its last `Pending`, or its last poll was `Ready`
    /// (more may be buffered). Otherwise `Pending`, and the task is woken
    /// when the source signals.
    pub(crate) fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.inner.task.register(cx.waker());
        if !self
            .inner
            .ready
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            return Poll::Pending;
        }
        let mut flagged = Context::from_waker(&self.waker);
        let result = poll(&mut flagged);
        if result.is_ready() {
            self.inner
                .ready
                .store(true, std::sync::atomic::Ordering::Release);
        }
        result
    }
}

impl Debug for ReadyFlag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadyFlag")
            .field(
                "ready",
                &self.inner.ready.load(std::sync::atomic::Ordering::Relaxed),
            )
            .finish()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::runtime::{AsyncListener, BoxFuture, BoxIo};
    use std::io;
    use std::sync::Mutex;
    use std::task::Waker;

    /// A runtime whose timers never fire, whose clock is set by hand, and
    /// which runs nothing it is given: tests drive what they need from
    /// threads of their own.
    #[derive(Debug)]
    pub(crate) struct Frozen(pub(crate) Mutex<Instant>);

    #[derive(Debug)]
    struct NeverTimer;

    impl AsyncTimer for NeverTimer {
        fn reset(self: Pin<&mut Self>, _: Instant) {}
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            Poll::Pending
        }
    }

    impl Runtime for Frozen {
        fn new_timer(&self, _: Instant) -> Pin<Box<dyn AsyncTimer>> {
            Box::pin(NeverTimer)
        }
        fn spawn(&self, _: BoxFuture<'static, ()>) {}
        fn now(&self) -> Instant {
            *self.0.lock().unwrap()
        }
        fn connect_tcp(&self, _: String, _: u16) -> BoxFuture<'static, io::Result<BoxIo>> {
            Box::pin(async { Err(io::Error::other("none")) })
        }
        fn wrap_listener(&self, _: std::net::TcpListener) -> io::Result<Box<dyn AsyncListener>> {
            Err(io::Error::other("none"))
        }
    }

    #[test]
    fn an_overdue_deadline_fires_even_if_the_timer_says_pending() {
        let start = Instant::now();
        let rt = Frozen(Mutex::new(start));
        let mut timer = DriveTimer::new(&rt);
        let mut cx = Context::from_waker(Waker::noop());
        let at = start + std::time::Duration::from_millis(10);
        assert!(timer.poll(&rt, Some(at), &mut cx).is_pending());
        assert!(timer.poll(&rt, None, &mut cx).is_pending());
        *rt.0.lock().unwrap() = at;
        assert!(timer.poll(&rt, Some(at), &mut cx).is_ready());
    }

    #[test]
    fn clock_round_trips() {
        let start = Instant::now();
        let rt = Frozen(Mutex::new(start));
        let clock = Clock::new(&rt);
        let later = start + std::time::Duration::from_millis(1500);
        let core = clock.core(later);
        assert_eq!(core.as_millis(), 1500);
        assert_eq!(clock.std(core), later);
        assert_eq!(
            clock
                .core(start - std::time::Duration::from_secs(1))
                .as_nanos(),
            0
        );
    }

    #[test]
    fn a_ready_flag_polls_only_after_a_signal() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::{Arc, Mutex};
        use std::task::{Context, Poll, Waker};

        let polls = AtomicUsize::new(0);
        let registered: Mutex<Option<Waker>> = Mutex::new(None);
        let flag = ReadyFlag::new();
        let noop = Waker::noop();
        let mut cx = Context::from_waker(noop);
        let source = |cx: &mut Context<'_>| -> Poll<()> {
            polls.fetch_add(1, Ordering::SeqCst);
            *registered.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        };
        assert!(flag.poll(&mut cx, source).is_pending());
        assert_eq!(
            polls.load(Ordering::SeqCst),
            1,
            "the first poll goes through"
        );
        for _ in 0..5 {
            assert!(flag.poll(&mut cx, source).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1, "no signal, no poll");
        let waker = registered.lock().unwrap().take().unwrap();
        waker.wake();
        assert!(flag.poll(&mut cx, source).is_pending());
        assert_eq!(
            polls.load(Ordering::SeqCst),
            2,
            "polled again after the signal"
        );
        let ready = |_: &mut Context<'_>| Poll::Ready(());
        let flag = Arc::new(ReadyFlag::new());
        assert!(flag.poll(&mut cx, ready).is_ready());
        assert!(
            flag.poll(&mut cx, ready).is_ready(),
            "after Ready, more may be buffered"
        );
    }

    /// A waker that counts its wake-ups, for tests of who wakes whom.
    pub(crate) struct CountingWaker(std::sync::atomic::AtomicUsize);

    impl CountingWaker {
        /// The counter, and a waker that adds to it.
        pub(crate) fn new() -> (std::sync::Arc<CountingWaker>, Waker) {
            let count = std::sync::Arc::new(CountingWaker(Default::default()));
            let waker = Waker::from(count.clone());
            (count, waker)
        }

        /// Wake-ups so far.
        pub(crate) fn count(&self) -> usize {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    impl std::task::Wake for CountingWaker {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_ready_flag_wakes_its_task_for_a_signal_at_any_moment() {
        use std::task::{Context, Poll};

        let (wakes, task) = CountingWaker::new();
        let mut cx = Context::from_waker(&task);
        let woken = || wakes.count();

        // A signal while the source is polled (a frame arriving as the
        // read attempt ends).
        let flag = ReadyFlag::new();
        let signalling = |cx: &mut Context<'_>| -> Poll<()> {
            cx.waker().wake_by_ref();
            Poll::Pending
        };
        assert!(flag.poll(&mut cx, signalling).is_pending());
        assert_eq!(woken(), 1, "the signal during the poll is not lost");

        // A signal after Pending, with the source's waker kept.
        let kept: Mutex<Option<Waker>> = Mutex::new(None);
        let keeping = |cx: &mut Context<'_>| -> Poll<()> {
            *kept.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        };
        assert!(flag.poll(&mut cx, keeping).is_pending());
        assert_eq!(woken(), 1);
        // Nothing signalled: polling again registers, and still no poll.
        let unexpected = |_: &mut Context<'_>| -> Poll<()> { panic!("polled without a signal") };
        assert!(flag.poll(&mut cx, unexpected).is_pending());
        kept.lock().unwrap().take().unwrap().wake();
        assert_eq!(woken(), 2, "the signal after Pending wakes the task");
        assert!(
            flag.poll(&mut cx, keeping).is_pending(),
            "and the source is polled again"
        );
    }
}
