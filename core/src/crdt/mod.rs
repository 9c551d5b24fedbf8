//! Conflict-free replicated state: hybrid logical clocks and last-writer-wins
//! maps.
//!
//! This module owns [`hlc`], the clock that stamps writes so that they order
//! across replicas, and [`lww`], the map those stamps keep convergent on every
//! replica. Both are for applications that share state over their sessions:
//! no machine and no driver uses them, and neither touches a session, a
//! frame or a connection.
//!
//! Like the rest of the crate, they never read a clock (the caller passes the
//! wall-clock time to every call) and never grow without bound. Both modules
//! are also reachable at the crate root, as `kitestring_core::hlc` and
//! `kitestring_core::lww`.

pub mod hlc;
pub mod lww;
