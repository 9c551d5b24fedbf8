#!/usr/bin/env bash
# Every test: the workspace's (unit tests, golden transcripts, property
# suites, real-socket scenarios on three runtimes, hostile input) and the
# browser suite (real pages in headless Chromium, adapters/web/test.sh).
# The one test command README.md gives, and what CI runs.
#
# On a machine with only Rust, installs what the browser suite needs when it
# is missing: Chromium and Node.js from Debian's packages (as root, with
# apt-get), playwright-core from npm (pinned by its lock file), the wasm32
# target and wasm-bindgen-cli (at the version Cargo.lock pins).
#
#     bash test.sh               # everything
#     bash test.sh --no-browser  # the workspace's tests only
set -euo pipefail
cd "$(dirname "$0")"

cargo test --workspace --locked
if [ "${1:-}" != "--no-browser" ]; then
  bash adapters/web/test.sh
fi
