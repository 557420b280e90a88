#!/usr/bin/env bash
# Installs the QEMU builds the end-to-end tests migrate real VMs with:
#  - QEMU 7.2 from Debian bookworm (apt-get install qemu-system-x86 qemu-utils; when a
#    newer qemu-utils is installed and blocks it, both are taken from bookworm);
#  - QEMU 10.0 from bookworm-backports, unpacked into $QEMU10_DIR without installing
#    it (a temporary apt source, `apt-get download`, `dpkg -x`, source removed again).
# Prints the two binaries' paths. Needs root (or sudo) for apt.
set -euo pipefail
QEMU10_DIR=${QEMU10_DIR:-/opt/shrinker-qemu-10.0}
if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive

if ! command -v qemu-system-x86_64 >/dev/null 2>&1 || ! command -v qemu-img >/dev/null 2>&1; then
  $SUDO apt-get update -q
  if ! $SUDO apt-get install -y -q --no-install-recommends qemu-system-x86 qemu-utils; then
    # A newer qemu-utils already installed (e.g. 10.0 from bookworm-backports) Breaks
    # qemu-system-common 7.2, so apt refuses. The tests need 7.2 itself: take the
    # system emulator and the utilities both from bookworm (qemu-img 7.2 does all the
    # tests ask of it).
    echo "apt refused QEMU 7.2 beside the installed qemu-utils; installing both from bookworm" >&2
    $SUDO apt-get install -y -q --no-install-recommends --allow-downgrades \
      qemu-system-x86/bookworm qemu-utils/bookworm
  fi
fi

if [ ! -x "$QEMU10_DIR/usr/bin/qemu-system-x86_64" ]; then
  list=/etc/apt/sources.list.d/shrinker-bookworm-backports.list
  trap '$SUDO rm -f "$list"; $SUDO apt-get update -q >/dev/null 2>&1 || true' EXIT
  echo "deb http://deb.debian.org/debian bookworm-backports main" | $SUDO tee "$list" >/dev/null
  $SUDO apt-get update -q
  work=$(mktemp -d)
  chmod 777 "$work"   # apt downloads as the _apt user
  (cd "$work" && apt-get download -t bookworm-backports qemu-system-x86 qemu-system-common qemu-system-data)
  $SUDO mkdir -p "$QEMU10_DIR"
  for deb in "$work"/*.deb; do $SUDO dpkg -x "$deb" "$QEMU10_DIR"; done
  rm -rf "$work"
  $SUDO rm -f "$list"
  trap - EXIT
  $SUDO apt-get update -q >/dev/null 2>&1 || true
fi

echo "qemu 7.2:  $(command -v qemu-system-x86_64) ($(qemu-system-x86_64 --version | head -1))"
echo "qemu 10.x: $QEMU10_DIR/usr/bin/qemu-system-x86_64 ($("$QEMU10_DIR/usr/bin/qemu-system-x86_64" -L "$QEMU10_DIR/usr/share/qemu" --version | head -1))"
