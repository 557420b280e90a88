#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need, then runs
# formatting and lint gates, every unit/property/integration test (including the fuzz
# corpus replay), a short bounded run of every fuzz target, and a short demo through a
# real edge pair.
#
# Usage: scripts/test.sh            (from the repository root or anywhere)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s ==\n' "$*"; }

log "toolchain"
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is missing: install Rust (https://rustup.rs) and re-run" >&2
  exit 1
fi
cargo --version
# rustfmt and clippy ship as rustup components; add them when missing.
if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi
# The zstd crate builds libzstd from source with a C compiler; the zstd CLI is the
# baseline the QEMU cluster test compares against.
missing=()
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
# libFuzzer (the fuzz smoke below) is C++.
command -v c++ >/dev/null 2>&1 || missing+=(g++)
command -v zstd >/dev/null 2>&1 || missing+=(zstd)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# The TPROXY tests build network namespaces and divert with nftables and with
# iptables/ip6tables TPROXY rules (both recipes of docs/DEPLOY.md).
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v nft >/dev/null 2>&1 || missing+=(nftables)
{ command -v iptables && command -v ip6tables; } >/dev/null 2>&1 || missing+=(iptables)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi
# The packet-level WAN path (testkit::wan_path) makes TUN devices: a container may
# lack the device node even where the kernel has the driver.
if [ "$(id -u)" = 0 ] && [ ! -c /dev/net/tun ]; then
  log "creating /dev/net/tun for the packet-level WAN path"
  modprobe tun 2>/dev/null || true
  mkdir -p /dev/net
  [ -c /dev/net/tun ] || mknod /dev/net/tun c 10 200
fi

log "disk"
# The build (about 4 GB of target/) and the QEMU tests' disk images and stream captures
# (up to about 2 GB at once in the temporary directory) need room; a full disk shows up
# much later as tests failing with ENOSPC, so say it here first.
tmp_dir=${TMPDIR:-/tmp}
df -h . "$tmp_dir"
free_kib=$(df -Pk . | awk 'NR == 2 { print $4 }')
tmp_free_kib=$(df -Pk "$tmp_dir" | awk 'NR == 2 { print $4 }')
if [ "$free_kib" -lt $((8 * 1024 * 1024)) ] || [ "$tmp_free_kib" -lt $((3 * 1024 * 1024)) ]; then
  echo "warning: the suite needs about 8 GiB free here and 3 GiB in $tmp_dir;" \
    "tests may fail with 'No space left on device'" >&2
fi

log "QEMU 7.2 and 10.0 for the end-to-end migration tests"
bash scripts/install-qemu.sh

log "a real Linux guest (Debian cloud kernel + busybox initramfs) for the guest tests"
bash scripts/guest-linux.sh

log "format"
cargo fmt --all -- --check

log "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "tests"
cargo test --workspace --locked

log "fuzz smoke (every target: the committed corpus, then 5000 runs from a fixed seed)"
# cargo-fuzz builds with the sanitizer flags of a nightly compiler; RUSTC_BOOTSTRAP
# lets the stable toolchain accept them. A fixed seed and run count make the run
# repeatable; new inputs go to a scratch directory, not the committed corpus.
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
fuzz_scratch=$(mktemp -d)
trap 'rm -rf "$fuzz_scratch"' EXIT
(
  cd fuzz
  for target in $(cargo fuzz list); do
    mkdir -p "$fuzz_scratch/$target"
    out="$fuzz_scratch/$target.log"
    if ! RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "$fuzz_scratch/$target" "corpus/$target" -- \
      -seed=1 -runs=5000 -max_len=20000 >"$out" 2>&1; then
      tail -60 "$out" >&2
      echo "fuzz target $target failed: the input is in fuzz/artifacts/$target/" >&2
      exit 1
    fi
    echo "$target: $(grep -E '^Done [0-9]+ runs' "$out" | tail -1)"
  done
)

log "demo smoke (2 VMs x 32 MiB through a TLS edge pair)"
cargo build --release --locked -p shrinker-proxy
./target/release/shrinker demo --vms 2 --vm-size 32MiB --shared-pool 16MiB

log "benchmark smoke (2 real QEMU VMs at once through every path, RAM compared)"
cargo build --release --locked -p shrinker-bench
smoke_logs=$(mktemp -d)
./target/release/shrinker-bench cluster --vms 2 --ram-mib 32 --pool-mib 16 \
  --rate-mbit 400 --delay-ms 2 --concurrent \
  --scenarios direct,relay,edge,zstd3,zstd3-long27,zstd3-long30-shared,lan,lan-relay \
  --keep-logs "$smoke_logs"
test -s "$smoke_logs/edge-a.json"
test -s "$smoke_logs/edge-b.log"
rm -rf "$smoke_logs"
# A run that fails keeps its logs too (here: a scenario name it does not know, after
# one that ran).
if ./target/release/shrinker-bench cluster --vms 1 --ram-mib 16 --pool-mib 8 \
  --rate-mbit 400 --delay-ms 2 --scenarios edge,no-such-scenario \
  --keep-logs "$smoke_logs" > /dev/null 2>&1; then
  echo "a cluster run with an unknown scenario succeeded" >&2
  exit 1
fi
test -s "$smoke_logs/edge-a.log"
rm -rf "$smoke_logs"
# The same across the packet-level WAN path (two namespaces, the hosts' own TCP sees
# the round trip, losses included), concurrent with multifd. It needs root, as the
# namespace tests do. (Not the zstd tunnels: like a user's own tunnel they connect to
# the destination in whatever order their WAN connections arrive, and a lost packet
# can put a multifd channel before the main one, which QEMU 7.2 then refuses.)
if [ "$(id -u)" = 0 ] || [ -z "${SHRINKER_SKIP_NETNS:-}" ]; then
  ./target/release/shrinker-bench cluster --vms 2 --ram-mib 32 --pool-mib 16 \
    --rate-mbit 200 --delay-ms 5 --concurrent --multifd 2 --packet-path --loss-pct 0.1 \
    --scenarios direct,edge
else
  echo "SKIPPED: the packet-path benchmark smoke needs root (SHRINKER_SKIP_NETNS is set)"
fi
# Page hashing side by side in release code (it checks every id against blake3::hash).
./target/release/shrinker-bench hash --mib 16 --runs 1
# The per-new-chunk analysis on the pages of a real file (the edge binary itself).
./target/release/shrinker-bench analyse target/release/shrinker --runs 1

log "all tests passed"
