#!/usr/bin/env bash
# Builds a Debian base image with debootstrap, for machines that cannot pull python:3.12-slim (no
# Docker Hub) but reach a Debian mirror: minbase + python3 + python3-venv, imported as TAG.
# Usage: docker/debian_base.sh TAG [SUITE] [MIRROR]. Needs root (debootstrap chroots and mknods).
set -euo pipefail

tag=${1:?usage: debian_base.sh TAG [SUITE] [MIRROR]}
suite=${2:-bookworm}
mirror=${3:-http://deb.debian.org/debian}

if [ "$(id -u)" != 0 ]; then
    echo "debian_base.sh: debootstrap needs root" >&2
    exit 1
fi
if ! command -v debootstrap >/dev/null; then
    # Debian's package; apt-get update only when the lists we have do not know it.
    apt-get install -y -q debootstrap >/dev/null 2>&1 \
        || (apt-get update -q >/dev/null 2>&1; apt-get install -y -q debootstrap >/dev/null) \
        || { echo "debian_base.sh: cannot install debootstrap" >&2; exit 1; }
fi

# Outside the repository: the root file system must never end up in a build context.
root=$(mktemp -d /var/tmp/tandem-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "debian_base.sh: debootstrap $suite from $mirror into $root"
if ! debootstrap --variant=minbase --include=python3,python3-venv "$suite" "$root/fs" "$mirror" \
        >"$root/debootstrap.log" 2>&1; then
    tail -n 30 "$root/debootstrap.log" >&2
    echo "debian_base.sh: debootstrap failed" >&2
    exit 1
fi
# What an image needs no copy of: downloaded packages, package lists, documentation, translations.
# The host's resolv.conf and hostname are left out: Docker provides its own at run time.
rm -rf "$root"/fs/var/cache/apt/archives/*.deb "$root"/fs/var/lib/apt/lists/* "$root"/fs/usr/share/doc/* \
    "$root"/fs/usr/share/man/* "$root"/fs/usr/share/info/* "$root"/fs/usr/share/locale/* "$root"/fs/var/log/*
: >"$root/fs/etc/resolv.conf"
: >"$root/fs/etc/hostname"
tar --numeric-owner -C "$root/fs" -c . | docker import \
    --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    --message "debootstrap --variant=minbase --include=python3,python3-venv $suite $mirror" - "$tag" >/dev/null
echo "debian_base.sh: imported $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
