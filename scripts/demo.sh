#!/usr/bin/env bash
# The main job on embedded defaults: two edges on loopback with mutual TLS, a 4-VM
# migration-like cluster sent through them, every byte checked, savings printed.
# Extra arguments go to `shrinker demo` (see `shrinker demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is missing: install Rust (https://rustup.rs) and re-run" >&2
  exit 1
fi
cargo build --release --locked -p shrinker-proxy
exec ./target/release/shrinker demo "$@"
