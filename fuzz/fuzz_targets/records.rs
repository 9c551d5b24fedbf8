#![no_main]

#[global_allocator]
static ALLOC: kitestring_fuzz::Counting = kitestring_fuzz::Counting;

libfuzzer_sys::fuzz_target!(|data: &[u8]| kitestring_core::fuzzing::records(
    data,
    &kitestring_fuzz::Probe
));
