#![no_main]

use kitestring_conformance::fuzzing::{pair, PairOp, PairSetup};

libfuzzer_sys::fuzz_target!(|input: (PairSetup, Vec<PairOp>)| {
    pair(input.0, input.1);
});
