#![no_main]

#[global_allocator]
static ALLOC: kitestring_fuzz::Counting = kitestring_fuzz::Counting;

use kitestring_core::fuzzing::{inflate, ArbCompressed};

libfuzzer_sys::fuzz_target!(|input: ArbCompressed| inflate(&input, &kitestring_fuzz::Probe));
