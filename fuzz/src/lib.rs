//! Support shared by the fuzz targets: a global allocator that counts the
//! bytes in use and their peak, so the decode targets can bound how much a
//! hostile message makes the decoder allocate.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use kitestring_core::fuzzing::AllocProbe;

/// The system allocator, counting.
pub struct Counting;

static IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static BASE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call forwards to the system allocator unchanged; the
// counters are only statistics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let now = IN_USE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            if new_size >= layout.size() {
                let grow = new_size - layout.size();
                let now = IN_USE.fetch_add(grow, Ordering::Relaxed) + grow;
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                IN_USE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

/// Reads the counters of [`Counting`]; only meaningful in a binary that
/// installs it as the global allocator.
pub struct Probe;

impl AllocProbe for Probe {
    fn reset(&self) {
        let now = IN_USE.load(Ordering::Relaxed);
        BASE.store(now, Ordering::Relaxed);
        PEAK.store(now, Ordering::Relaxed);
    }

    fn peak(&self) -> usize {
        PEAK.load(Ordering::Relaxed)
            .saturating_sub(BASE.load(Ordering::Relaxed))
    }
}
