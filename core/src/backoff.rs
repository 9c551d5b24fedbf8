//! Reconnect delays: exponential backoff with jitter.
//!
//! Owns the arithmetic only: which attempt it is and when the machine gives up
//! is the client state machine's business. Never returns a zero delay for a
//! retry unless configured to, so a policy can never degrade into a tight loop
//! (the failure mode of backoff iterators that "run out" and then retry at once).

use core::time::Duration;

use crate::rng::Rng;

/// How random jitter is added to each delay.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Jitter {
    /// No jitter: every client retries at the same moments (for tests).
    None,
    /// The delay `d` becomes a uniform value in `[d, d * (1 + fraction)]`.
    /// The default is `Proportional(0.5)`: 0 to 50 % on top.
    Proportional(f64),
    /// "Full jitter": a uniform value in `[base, d]`. Spreads a thundering
    /// herd the most while never retrying sooner than the base delay.
    Full,
}

/// Exponential backoff settings.
#[derive(Clone, Debug, PartialEq)]
pub struct BackoffConfig {
    /// Delay before the first retry. Default 1 s.
    pub base: Duration,
    /// Growth factor per attempt. Default 2.
    pub factor: u32,
    /// Largest delay before jitter is added. Default 30 s.
    pub max: Duration,
    /// Jitter mode. Default `Proportional(0.5)`.
    pub jitter: Jitter,
    /// Consecutive failed attempts before the client gives up and enters
    /// `Failed`. `None` retries forever. Default `Some(10)`.
    pub max_attempts: Option<u32>,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            base: Duration::from_secs(1),
            factor: 2,
            max: Duration::from_secs(30),
            jitter: Jitter::Proportional(0.5),
            max_attempts: Some(10),
        }
    }
}

impl BackoffConfig {
    /// The delay before retry number `attempt` (1 for the first retry),
    /// before jitter: `min(max, base * factor^(attempt-1))`.
    pub fn nominal(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1);
        let mut d = self.base;
        for _ in 0..exp {
            d = d.saturating_mul(self.factor.max(1));
            if d >= self.max {
                return self.max.max(self.base);
            }
        }
        d.min(self.max.max(self.base))
    }

    /// The range `[low, high]` that the jittered delay for `attempt` falls in.
    pub fn bounds(&self, attempt: u32) -> (Duration, Duration) {
        let d = self.nominal(attempt);
        match self.jitter {
            Jitter::None => (d, d),
            Jitter::Proportional(f) => {
                let f = if f.is_finite() {
                    f.clamp(0.0, 10.0)
                } else {
                    0.0
                };
                (d, d.saturating_add(scale(d, f)))
            }
            Jitter::Full => (self.base.min(d), d),
        }
    }

    /// The jittered delay for `attempt`, drawn from `rng`.
    pub(crate) fn delay(&self, attempt: u32, rng: &mut Rng) -> Duration {
        let (low, high) = self.bounds(attempt);
        let span = u64::try_from(high.saturating_sub(low).as_nanos()).unwrap_or(u64::MAX);
        low + Duration::from_nanos(rng.below_inclusive(span))
    }
}

/// `d` times `f` (a finite factor of at most 10), to the nanosecond below,
/// saturating past `u64::MAX` nanoseconds (584 years).
/// `Duration::mul_f64` would bring its float conversion and its panics
/// into the browser package.
pub(crate) fn scale(d: Duration, f: f64) -> Duration {
    // `as` from a float saturates (and takes NaN to 0).
    Duration::from_nanos((d.as_nanos() as f64 * f) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn nominal_doubles_to_the_cap() {
        let c = BackoffConfig::default();
        let secs: Vec<u64> = (1..=8).map(|a| c.nominal(a).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(c.nominal(u32::MAX), Duration::from_secs(30));
        assert_eq!(c.nominal(0), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_in_bounds() {
        let mut rng = Rng::new(42);
        for jitter in [Jitter::None, Jitter::Proportional(0.5), Jitter::Full] {
            let c = BackoffConfig {
                jitter,
                ..BackoffConfig::default()
            };
            for attempt in 1..=12 {
                let (lo, hi) = c.bounds(attempt);
                assert!(lo >= c.base, "{jitter:?}: never sooner than base");
                for _ in 0..50 {
                    let d = c.delay(attempt, &mut rng);
                    assert!(lo <= d && d <= hi, "{jitter:?} attempt {attempt}: {d:?}");
                }
            }
        }
        let c = BackoffConfig::default();
        assert_eq!(
            c.bounds(1),
            (Duration::from_secs(1), Duration::from_millis(1500))
        );
    }

    #[test]
    fn hostile_settings_do_not_panic() {
        let c = BackoffConfig {
            base: Duration::MAX,
            factor: u32::MAX,
            max: Duration::ZERO,
            jitter: Jitter::Proportional(f64::NAN),
            max_attempts: None,
        };
        let mut rng = Rng::new(1);
        for a in [0, 1, 2, 64, u32::MAX] {
            let _ = c.delay(a, &mut rng);
        }
    }
}
