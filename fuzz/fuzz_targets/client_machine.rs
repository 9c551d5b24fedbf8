#![no_main]

use kitestring_core::fuzzing::{client_machine, ClientOp, ClientSetup};

libfuzzer_sys::fuzz_target!(|input: (ClientSetup, Vec<ClientOp>)| {
    client_machine(input.0, input.1);
});
