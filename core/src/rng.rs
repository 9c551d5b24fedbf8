//! The core's only source of randomness: a small PRNG seeded by the caller.
//!
//! Jitter needs randomness, determinism forbids the OS: the driver passes a
//! seed at construction and the same seed replays the same jitter. This is
//! not a cryptographic generator; anything that must be unguessable (session
//! ids) comes from the driver as bytes.

/// SplitMix64: tiny, fast, passes BigCrush, and every seed (even 0) is fine.
#[derive(Clone, Debug)]
pub(crate) struct Rng {
    state: u64,
}

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform value in `0..=bound` (inclusive), without modulo bias worth
    /// caring about for jitter (Lemire's multiply-shift).
    pub(crate) fn below_inclusive(&mut self, bound: u64) -> u64 {
        if bound == u64::MAX {
            return self.next_u64();
        }
        let range = u128::from(bound) + 1;
        ((u128::from(self.next_u64()) * range) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn same_seed_same_sequence() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        assert_ne!(Rng::new(1).next_u64(), Rng::new(2).next_u64());
    }

    #[test]
    fn bounded_values_stay_in_range() {
        let mut r = Rng::new(0);
        for bound in [0u64, 1, 2, 10, 1_000_000_007, u64::MAX] {
            for _ in 0..200 {
                assert!(r.below_inclusive(bound) <= bound);
            }
        }
        let mut seen = [false; 4];
        for _ in 0..200 {
            seen[r.below_inclusive(3) as usize] = true;
        }
        assert!(seen.iter().all(|s| *s), "every value of 0..=3 shows up");
    }
}
