#![no_main]

use kitestring_core::fuzzing::{lww_merge, ArbUpdate, Schedule};

type Local = Vec<(u8, u8, Option<u8>, u16)>;

libfuzzer_sys::fuzz_target!(|input: (Vec<ArbUpdate>, Vec<Schedule>, Local)| {
    lww_merge(input.0, input.1, input.2);
});
