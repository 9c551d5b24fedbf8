#!/usr/bin/env bash
# Every test: the workspace's (unit tests, golden transcripts, property
# suites, real-socket scenarios on three runtimes, hostile input, server
# nodes sharing a real redis-server) and the browser suite (real pages in
# headless Chromium, adapters/web/test.sh). The one test command README.md
# gives, and what CI runs.
#
# On a machine with only Rust, installs what is missing: redis-server from
# Debian's packages (as root, with apt-get; the tests start their own on a
# free port and stop it), and for the browser suite Chromium and Node.js
# (Debian), playwright-core from npm (pinned by its lock file), the wasm32
# target and wasm-bindgen-cli (at the version Cargo.lock pins).
#
#     bash test.sh               # everything
#     bash test.sh --no-browser  # the workspace's tests only
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "test.sh: redis-server is missing: install it (Debian: apt-get install redis-server)" >&2
    exit 1
  fi
  echo "test.sh: installing redis-server" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi

cargo test --workspace --locked
if [ "${1:-}" != "--no-browser" ]; then
  bash adapters/web/test.sh
fi
