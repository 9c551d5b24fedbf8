//! Random faults that can be switched off.
//!
//! The chaos proxy's own random faults are scheduled per connection when it
//! is accepted and keep running for that connection's life, so they cannot
//! be stopped for connections that already exist. This injector runs on its
//! own thread instead: every 50 ms it gives each forwarding connection a
//! chance of `rate × 0.05` to be faulted (so `rate` is in faults per
//! connection-second), a black hole with probability `black_hole_share`,
//! otherwise a cut. [`FaultInjector::stop`] ends it at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kitestring_chaos::{Mode, Proxy};

/// How often the injector rolls the dice.
const TICK: Duration = Duration::from_millis(50);

/// Fault settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FaultPlan {
    /// Mean faults per connection per second.
    pub rate: f64,
    /// Share of faults that black-hole (silently stop forwarding) instead of
    /// cutting, in `0.0..=1.0`.
    pub black_hole_share: f64,
    /// Seed of the fault schedule.
    pub seed: u64,
}

/// Faults injected so far.
#[derive(Debug, Default)]
pub struct FaultCounts {
    /// Connections cut.
    pub cuts: AtomicU64,
    /// Connections black-holed.
    pub black_holes: AtomicU64,
}

impl FaultCounts {
    /// `(cuts, black holes)`.
    pub fn get(&self) -> (u64, u64) {
        (
            self.cuts.load(Ordering::Relaxed),
            self.black_holes.load(Ordering::Relaxed),
        )
    }
}

/// A running injector. Dropping it stops it too.
#[derive(Debug)]
pub struct FaultInjector {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    counts: Arc<FaultCounts>,
}

impl FaultInjector {
    /// Starts faulting `proxy`'s connections.
    pub fn start(proxy: Arc<Proxy>, plan: FaultPlan) -> std::io::Result<FaultInjector> {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(FaultCounts::default());
        let (s, c) = (stop.clone(), counts.clone());
        let thread = std::thread::Builder::new()
            .name("fault-injector".into())
            .spawn(move || {
                let mut rng = SplitMix(plan.seed);
                let chance = (plan.rate * TICK.as_secs_f64()).clamp(0.0, 1.0);
                while !s.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    for link in proxy.links() {
                        if link.mode() != Mode::Forward || rng.unit() >= chance {
                            continue;
                        }
                        if rng.unit() < plan.black_hole_share {
                            link.black_hole();
                            c.black_holes.fetch_add(1, Ordering::Relaxed);
                        } else {
                            link.cut();
                            c.cuts.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })?;
        Ok(FaultInjector {
            stop,
            thread: Some(thread),
            counts,
        })
    }

    /// The counters (they stay readable after [`stop`](Self::stop)).
    pub fn counts(&self) -> Arc<FaultCounts> {
        self.counts.clone()
    }

    /// Stops injecting; returns once no further fault can happen.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FaultInjector {
    fn drop(&mut self) {
        self.stop();
    }
}

/// SplitMix64: small and seeded.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}
