//! The shared end-to-end scenarios on smol (tasks on smol's global executor).
#![allow(clippy::unwrap_used, clippy::expect_used)]

kitestring_scenarios::scenarios!(smol::block_on, kitestring_smol::runtime());
