#![no_main]

use kitestring_core::fuzzing::{server_stream, StreamOp, StreamSetup};

libfuzzer_sys::fuzz_target!(|input: (StreamSetup, Vec<StreamOp>)| {
    server_stream(input.0, input.1);
});
