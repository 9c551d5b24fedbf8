#!/usr/bin/env bash
# Runs every fuzz target for a short, fixed time on the committed seed
# corpora (copied to a temporary directory, so the repository does not grow)
# and exits non-zero on the first crash.
#
# Built without `-O`: cargo-fuzz then builds in release mode with debug
# assertions on, so the machines' own checks (`debug_assert!`, such as the
# client's transition table) run under fuzzing too, and overflow checks with
# them.
#
#   FUZZ_SECONDS   seconds per target (default 20)
#   FUZZ_TARGETS   space-separated subset of targets (default: all)
set -euo pipefail

cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-20}"
targets="${FUZZ_TARGETS:-decode_json decode_msgpack inflate pack_envelope decode_binary_header handshake frame_roundtrip client_machine server_machine server_stream lww_merge pair session_image records}"

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cargo +nightly fuzz build

status=0
for target in $targets; do
    mkdir -p "$work/$target"
    if [ -d "corpus/$target" ]; then
        cp -r "corpus/$target/." "$work/$target/"
    fi
    args=(-max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=0)
    case "$target" in
        decode_json | handshake) args+=(-dict=dict/json.dict -max_len=4096) ;;
        decode_msgpack | decode_binary_header) args+=(-dict=dict/msgpack.dict -max_len=4096) ;;
    esac
    echo "== $target (${seconds}s)"
    if ! cargo +nightly fuzz run "$target" "$work/$target" -- "${args[@]}" \
        >"$work/$target.log" 2>&1; then
        echo "!! $target crashed; reproducer under fuzz/artifacts/$target/"
        grep -E -A20 "panicked|ERROR: libFuzzer" "$work/$target.log" | head -60 || true
        status=1
    else
        grep -E "^Done" "$work/$target.log" || true
    fi
done
if [ "$status" -eq 0 ]; then
    echo "fuzz: all targets ran ${seconds}s without a crash"
fi
exit "$status"
