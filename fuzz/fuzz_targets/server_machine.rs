#![no_main]

use kitestring_core::fuzzing::{server_machine, ServerOp, ServerSetup};

libfuzzer_sys::fuzz_target!(|input: (ServerSetup, Vec<ServerOp>)| {
    server_machine(input.0, input.1);
});
