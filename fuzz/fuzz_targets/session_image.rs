#![no_main]

use kitestring_core::fuzzing::session_image;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    session_image(data);
});
