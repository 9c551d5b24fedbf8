#![no_main]

use kitestring_core::fuzzing::{frame_roundtrip, ArbFrame};

libfuzzer_sys::fuzz_target!(|frames: Vec<ArbFrame>| frame_roundtrip(frames));
