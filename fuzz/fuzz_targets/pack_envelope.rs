#![no_main]

#[global_allocator]
static ALLOC: kitestring_fuzz::Counting = kitestring_fuzz::Counting;

libfuzzer_sys::fuzz_target!(|env: kitestring_core::fuzzing::ArbEnvelope| {
    let _ = kitestring_core::fuzzing::pack_envelope(&env, &kitestring_fuzz::Probe);
});
