#!/usr/bin/env bash
# Builds a tiny Linux guest for realistic guest-memory tests and benchmarks:
#   OUTDIR/vmlinuz     the Debian bookworm cloud kernel (linux-image-cloud-amd64)
#   OUTDIR/initrd.img  a gzip'ed newc initramfs: static busybox + an /init that mounts
#                      proc/sys/devtmpfs, fills memory the way a real system does (page
#                      cache copies of binaries, text files, kernel symbol tables with
#                      KASLR addresses, a little random data), starts a counter that
#                      writes a file every second, prints SHRINKER-GUEST-READY on the
#                      console (ttyS0) and idles forever.
# Boot: -kernel OUTDIR/vmlinuz -initrd OUTDIR/initrd.img -append "console=ttyS0 quiet"
#
# Packages are only fetched with `apt-get download` and unpacked with `dpkg -x` into a
# temporary directory: nothing is installed. `apt-get update` runs only if a download
# fails. Idempotent: does nothing if both outputs exist. Usage:
#   scripts/guest-linux.sh [OUTDIR]      (default: <repo>/target/guest-linux)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUTDIR=${1:-$ROOT/target/guest-linux}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
KERNEL=$OUTDIR/vmlinuz
INITRD=$OUTDIR/initrd.img

if [ -s "$KERNEL" ] && [ -s "$INITRD" ]; then
  echo "kernel: $KERNEL"
  echo "initrd: $INITRD"
  exit 0
fi

if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
mkdir "$work/debs"
chmod 777 "$work/debs" # apt-get download runs as the _apt user

# linux-image-cloud-amd64 is a metapackage: download the versioned image it depends on.
resolve_kernel() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}
kpkg=$(resolve_kernel || true)
download() {
  (cd "$work/debs" && apt-get download -q "$@")
}
if [ -z "$kpkg" ] || ! download "$kpkg" busybox-static; then
  echo "apt-get download failed; running apt-get update and retrying" >&2
  $SUDO apt-get update -q
  kpkg=$(resolve_kernel)
  [ -n "$kpkg" ] || { echo "cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
  rm -f "$work/debs"/*.deb
  download "$kpkg" busybox-static
fi
echo "kernel package: $kpkg"

mkdir "$work/x"
for deb in "$work/debs"/*.deb; do dpkg -x "$deb" "$work/x"; done
vmlinuz=$(ls "$work/x"/boot/vmlinuz-* | head -1)
[ -f "$vmlinuz" ] || { echo "no boot/vmlinuz-* in $kpkg" >&2; exit 1; }
busybox=$work/x/bin/busybox
[ -x "$busybox" ] || { echo "no bin/busybox in busybox-static" >&2; exit 1; }

# The initramfs tree.
rootfs=$work/rootfs
mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,mnt,root}
cp "$busybox" "$rootfs/bin/busybox"
ln -s busybox "$rootfs/bin/sh"
cat >"$rootfs/etc/motd" <<'EOF'
Shrinker test guest: a Debian cloud kernel and a static busybox.
EOF
echo "shrinker-guest" >"$rootfs/etc/hostname"
cat >"$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
EOF
cat >"$rootfs/etc/group" <<'EOF'
root:x:0:
EOF
cat >"$rootfs/init" <<'EOF'
#!/bin/busybox sh
# Shrinker test guest: fill memory like a small real system, then idle.
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
hostname -F /etc/hostname
mkdir -p /mnt/fill
mount -t tmpfs -o size=112m tmpfs /mnt/fill

# Page cache: several copies of the binaries and the rest of the root filesystem.
for i in 1 2 3 4; do
  mkdir -p /mnt/fill/copy$i
  cp -a /bin /etc /init /mnt/fill/copy$i/
done
# Text: numbers, help texts, kernel state (kallsyms holds KASLR-relocated addresses).
seq 1 150000 >/mnt/fill/numbers.txt
busybox --list >/mnt/fill/applets.txt
for a in $(busybox --list); do busybox $a --help </dev/null 2>&1; done >/mnt/fill/help.txt
cat /proc/kallsyms >/mnt/fill/kallsyms.txt
dmesg >/mnt/fill/dmesg.txt
cat /proc/meminfo /proc/cpuinfo /proc/iomem /proc/interrupts /proc/modules \
  /proc/devices /proc/filesystems >/mnt/fill/proc.txt 2>/dev/null
find / -xdev >/mnt/fill/files.txt 2>/dev/null
# Compressed data and a little that is random per boot (keys, buffers).
gzip -c /mnt/fill/numbers.txt >/mnt/fill/numbers.txt.gz
tar -cf /mnt/fill/etc.tar /etc /init 2>/dev/null
head -c 1048576 /dev/urandom >/mnt/fill/random.bin
# A process that keeps working: a counter written to a file every second.
(n=0; while true; do n=$((n + 1)); echo "$n $(cat /proc/uptime)" >/run/counter; sleep 1; done) &
sync
echo SHRINKER-GUEST-READY
while true; do sleep 1; echo tick >/dev/null; done
EOF
chmod 755 "$rootfs/init"

# newc archive: cpio when available, else a small Python writer (both add /dev/console
# so the kernel can open an initial console before devtmpfs is mounted).
tmp_initrd=$OUTDIR/.initrd.img.$$
if command -v cpio >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  mknod -m 600 "$rootfs/dev/console" c 5 1
  (cd "$rootfs" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -9n >"$tmp_initrd"
else
  python3 - "$rootfs" <<'PY' | gzip -9n >"$tmp_initrd"
import os, stat, sys

root = sys.argv[1]
out = sys.stdout.buffer
ino = [300000]

def entry(name, mode, data=b"", nlink=1, rmajor=0, rminor=0):
    ino[0] += 1
    name_b = name.encode() + b"\0"
    fields = [ino[0], mode, 0, 0, nlink, 0, len(data), 0, 0, rmajor, rminor, len(name_b), 0]
    hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
    out.write(hdr + name_b)
    out.write(b"\0" * (-(len(hdr) + len(name_b)) % 4))
    out.write(data)
    out.write(b"\0" * (-len(data) % 4))

paths = []
for d, dirs, files in os.walk(root):
    for n in dirs + files:
        paths.append(os.path.relpath(os.path.join(d, n), root))
for rel in sorted(paths):
    full = os.path.join(root, rel)
    st = os.lstat(full)
    perm = stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        entry(rel, stat.S_IFDIR | perm, nlink=2)
    elif stat.S_ISLNK(st.st_mode):
        entry(rel, stat.S_IFLNK | 0o777, os.readlink(full).encode())
    elif stat.S_ISREG(st.st_mode):
        with open(full, "rb") as f:
            entry(rel, stat.S_IFREG | perm, f.read())
if "dev/console" not in paths:
    entry("dev/console", stat.S_IFCHR | 0o600, rmajor=5, rminor=1)
entry("TRAILER!!!", 0)
PY
fi
cp "$vmlinuz" "$OUTDIR/.vmlinuz.$$"
mv "$OUTDIR/.vmlinuz.$$" "$KERNEL"
mv "$tmp_initrd" "$INITRD"
echo "kernel: $KERNEL ($(basename "$vmlinuz"))"
echo "initrd: $INITRD"
