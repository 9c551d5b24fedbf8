//! The shared end-to-end scenarios on async-std.
#![allow(clippy::unwrap_used, clippy::expect_used)]

kitestring_scenarios::scenarios!(async_std::task::block_on, kitestring_async_std::runtime());
