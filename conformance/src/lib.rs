//! Conformance tooling for Kitestring: a deterministic network simulator
//! ([`sim`]) on which the property suites run, and a hand-driven client
//! ([`script`]) for golden transcripts.
#![forbid(unsafe_code)]

pub mod script;
pub mod sim;
pub mod store;

// Body of the `pair` fuzz target, compiled only for fuzzing and its tests.
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
