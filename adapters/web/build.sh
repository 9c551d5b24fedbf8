#!/usr/bin/env bash
# Builds the browser package into adapters/web/pkg (or $KITESTRING_WEB_OUT):
# the core's client machine compiled to WebAssembly (profile `wasm` of the
# workspace: opt-level "z", LTO, panic=abort), its wasm-bindgen glue, the
# JavaScript driver and its type declarations. Installs what is missing: the
# wasm32 target, wasm-bindgen-cli at exactly the version of the
# wasm-bindgen crate in Cargo.lock (the glue and the crate must agree).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${KITESTRING_WEB_OUT:-$here/pkg}"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
nice="nice -n ${KITESTRING_NICE:-19}"

say() { printf 'build.sh: %s\n' "$*" >&2; }

version="$(awk '$0 == "name = \"wasm-bindgen\"" { getline; gsub(/version = |"/, ""); print; exit }' "$root/Cargo.lock")"
[ -n "$version" ] || { say "no wasm-bindgen in Cargo.lock"; exit 1; }

if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  say "adding the wasm32-unknown-unknown target"
  rustup target add wasm32-unknown-unknown >/dev/null
fi

if ! wasm-bindgen --version 2>/dev/null | grep -qx "wasm-bindgen $version"; then
  say "installing wasm-bindgen-cli $version"
  # The CLI's own Cargo.lock first; if the registry no longer has one of the
  # versions it pins, the newest compatible ones (the glue depends only on
  # the CLI's own version, which is pinned either way).
  scratch="$(mktemp -d)"
  if ! CARGO_TARGET_DIR="$scratch" $nice cargo install --locked --quiet wasm-bindgen-cli --version "=$version" --no-default-features; then
    say "--locked failed; installing with the newest compatible dependencies"
    CARGO_TARGET_DIR="$scratch" $nice cargo install --quiet wasm-bindgen-cli --version "=$version" --no-default-features
  fi
  rm -rf "$scratch"
fi

say "compiling kitestring-web for wasm32"
(cd "$root" && $nice cargo build --locked --quiet -p kitestring-web --target wasm32-unknown-unknown --profile wasm)

mkdir -p "$out"
wasm-bindgen --target web --remove-name-section --remove-producers-section \
  --out-dir "$out" --out-name kitestring_web \
  "$target_dir/wasm32-unknown-unknown/wasm/kitestring_web.wasm"
rm -f "$out/kitestring_web_bg.wasm.d.ts"
# The glue's doc comments are the binding's Rust docs, half of its size
# gzipped and of no use to a page; kitestring_web.d.ts keeps them for
# editors.
perl -0pi -e 's{^[ \t]*/\*\*.*?\*/[ \t]*\n}{}gms' "$out/kitestring_web.js"

cp "$here/js/kitestring.js" "$here/js/msgpack.js" "$here/js/kitestring.d.ts" "$here/js/package.json" "$out/"
say "built $out: $(cd "$out" && ls | tr '\n' ' ')"
