#!/usr/bin/env bash
# The browser suite: real pages in headless Chromium, driven by
# playwright-core, against the suite server (examples/suite_server.rs).
# What CI runs (.ci/run calls this script), and the one command to run it
# by hand:
#
#     bash adapters/web/test.sh            # the core's unit tests in the browser, then every test file
#     bash adapters/web/test.sh echo       # the files whose names contain "echo"
#     bash adapters/web/test.sh core       # the core's unit tests in the browser only
#     bash adapters/web/test.sh --setup    # install and build only (the bench crate's browser scenarios)
#
# The core's unit tests run first, compiled to wasm32 in a page of the same
# headless Chromium (wasm-bindgen-test-runner through chromedriver, which
# gives the browser a fresh profile of its own).
#
# Installs what is missing on a machine with only Rust: Chromium, its
# chromedriver and Node.js from Debian's packages (as root, with apt-get), playwright-core
# from npm (pinned by package-lock.json), the wasm toolchain (build.sh).
# Everything runs at the lowest priority: the machine may be shared.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
suite="$here/tests/browser"
nice="nice -n ${KITESTRING_NICE:-19}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"

say() { printf 'test.sh: %s\n' "$*" >&2; }

apt_updated=
apt_install() {
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    say "missing $*: install it (Debian: apt-get install $*)"
    exit 1
  fi
  if [ -z "$apt_updated" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  say "installing $*"
  DEBIAN_FRONTEND=noninteractive $nice apt-get install -y -qq "$@" >/dev/null
}

export CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
[ -x "$CHROMIUM" ] || apt_install chromium
export CHROMEDRIVER="${CHROMEDRIVER:-/usr/bin/chromedriver}"
[ -x "$CHROMEDRIVER" ] || apt_install chromium-driver
command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm

if [ ! -d "$suite/node_modules/playwright-core" ] || [ "$suite/package-lock.json" -nt "$suite/node_modules/.package-lock.json" ]; then
  say "installing playwright-core"
  (cd "$suite" && $nice npm ci --no-audit --no-fund --loglevel=error)
fi

bash "$here/build.sh"

say "building the suite server"
(cd "$root" && $nice cargo build --locked --quiet -p kitestring-web --example suite_server)
export SUITE_SERVER="$CARGO_TARGET_DIR/debug/examples/suite_server"
[ "${1:-}" = --setup ] && exit 0

if [ -z "${1:-}" ] || [ "$1" = core ]; then
  say "the core's unit tests, compiled to wasm32, in headless Chromium"
  tests="$(cd "$root" && $nice cargo test --locked --quiet -p kitestring-core --lib \
    --target wasm32-unknown-unknown --no-run --message-format=json |
    sed -n 's/.*"executable":"\([^"]*\.wasm\)".*/\1/p' | tail -n 1)"
  [ -n "$tests" ] || { say "no wasm32 test binary for kitestring-core"; exit 1; }
  # The runner reads the browser's settings from webdriver.json in its
  # working directory; these flags keep Chromium from stalling on a machine
  # without a display, sandbox or network services.
  scratch="$(mktemp -d)"
  trap 'rm -rf "$scratch"' EXIT
  cat >"$scratch/webdriver.json" <<JSON
{ "goog:chromeOptions": { "binary": "$CHROMIUM", "args": ["--headless", "--no-sandbox",
  "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"] } }
JSON
  (cd "$scratch" && WASM_BINDGEN_TEST_TIMEOUT=300 $nice wasm-bindgen-test-runner "$tests")
  [ "${1:-}" = core ] && exit 0
fi

files=()
for f in "$suite"/suite/*.test.mjs; do
  case "$(basename "$f")" in *"${1:-}"*) files+=("$f") ;; esac
done
say "running ${#files[@]} test files"
cd "$suite"
started=$(date +%s)
$nice node --test --test-concurrency=1 "${files[@]}"
say "browser suite passed in $(( $(date +%s) - started )) s"
