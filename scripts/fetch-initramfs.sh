#!/usr/bin/env bash
# Builds the busybox initramfs for scripts/boot-linux.sh and the Linux boot
# tests (never committed). Leaves under .peer/initramfs/:
#   busybox             Debian's busybox-static binary (apt-get download)
#   initramfs.cpio.gz   a gzipped newc cpio: /init, /bin/busybox, /dev/console
# /init mounts proc, sysfs and devtmpfs, links the busybox applets into /bin,
# prints one line about the machine and runs a shell on the console.
# The download is kept; the archive is rebuilt when /init changes.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.peer/initramfs
mkdir -p "$dest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! [ -x "$dest/busybox" ]; then
    echo "fetch-initramfs: downloading busybox-static"
    # apt's sandbox user cannot write to mktemp's 0700 directory.
    chmod 755 "$work"
    (cd "$work" && apt-get download -qq busybox-static 2>/dev/null) || {
        apt-get update -qq
        (cd "$work" && apt-get download -qq busybox-static)
    }
    dpkg-deb -x "$work"/busybox-static_*.deb "$work/pkg"
    cp "$work/pkg/bin/busybox" "$dest/busybox.tmp"
    mv "$dest/busybox.tmp" "$dest/busybox"
fi

cat >"$work/init" <<'INIT'
#!/bin/busybox sh
# oxvirt demo init: busybox userland, a shell on the serial console.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "oxvirt initramfs: $(uname -sr), $(grep -c ^processor /proc/cpuinfo) CPU(s)," \
    "$(awk '/^MemTotal/ {print $2 " kB"}' /proc/meminfo) RAM; 'poweroff -f' ends the VM"
export PS1='oxvirt-guest:\w# ' HOME=/
exec setsid cttyhack sh
INIT
if [ -s "$dest/initramfs.cpio.gz" ] && cmp -s "$work/init" "$dest/init"; then
    exit 0
fi

root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp}
cp "$dest/busybox" "$root/bin/busybox"
install -m 755 "$work/init" "$root/init"
# The kernel opens /dev/console for init before anything mounts /dev.
mknod -m 600 "$root/dev/console" c 5 1
# Sorted names, owner root and one fixed time: the same inputs give the
# same archive.
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
    cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -9n >"$dest/initramfs.cpio.gz.tmp"
mv "$dest/initramfs.cpio.gz.tmp" "$dest/initramfs.cpio.gz"
cp "$work/init" "$dest/init"
echo "fetch-initramfs: $dest/initramfs.cpio.gz ($(stat -c %s "$dest/initramfs.cpio.gz") bytes)"
