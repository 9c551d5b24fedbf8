//! Conformance tooling for Kitestring: a deterministic network simulator
//! ([`sim`]) on which the property suites run, and a hand-driven client
//! ([`script`]) for golden transcripts.
#![forbid(unsafe_code)]

pub mod script;
pub mod sim;
