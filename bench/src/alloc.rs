//! A global allocator that counts allocations while asked to, to check
//! that the steady state allocates nothing beyond the payload.
//!
//! It counts only between [`start`] and [`stop`]: a counter bumped by every
//! allocation of every thread is a cache line the cores pass back and
//! forth, a cost no real server pays, and it would charge each server of
//! the comparisons (the server children are this binary too) by how often
//! it allocates.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Counts every allocation and reallocation while counting is on, then
/// defers to the system.
pub(crate) struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static COUNTING: AtomicBool = AtomicBool::new(false);

#[inline]
fn count() {
    // Read-only while off: the line stays shared in every core's cache.
    if COUNTING.load(Ordering::Relaxed) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged; the counter has no effect on memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: forwarded as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Starts counting.
pub(crate) fn start() {
    COUNTING.store(true, Ordering::SeqCst);
}

/// Stops counting.
pub(crate) fn stop() {
    COUNTING.store(false, Ordering::SeqCst);
}

/// Allocations counted so far.
pub(crate) fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}
