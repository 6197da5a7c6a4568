#!/usr/bin/env bash
# `make image-base`: a Debian bookworm base image built from Debian's archive with
# debootstrap, for hosts that cannot pull from a container registry.
#
#   tools/containers/image_base.sh            build (or reuse) sutra-base:bookworm
#
# The rootfs tarball is cached under build/images/ (SUTRA_IMAGE_CACHE), so a second
# run, or a fresh dockerd, only re-imports it (seconds) instead of debootstrapping
# again (about 35 s plus the download). The base carries what both images need from
# Debian and nothing else: python3 + venv for sutra-embed, ca-certificates, and apt's
# sources so the HAProxy image can add Debian's haproxy package.
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian), SUTRA_BASE_IMAGE.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tools/containers/common.sh
. tools/containers/common.sh

mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
tarball="$IMAGE_CACHE/bookworm-rootfs.tar"
packages=python3,python3-venv,ca-certificates

if docker_ image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  echo "base image $BASE_IMAGE present"
  exit 0
fi

if [ ! -s "$tarball" ]; then
  command -v debootstrap >/dev/null || tools/install_debian_packages.sh debootstrap
  mkdir -p "$IMAGE_CACHE"
  rootfs=$(mktemp -d "$IMAGE_CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$rootfs"' EXIT
  echo "debootstrap bookworm ($packages) from $mirror"
  debootstrap --variant=minbase --include="$packages" bookworm "$rootfs" "$mirror" >"$IMAGE_CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$IMAGE_CACHE/debootstrap.log" >&2; exit 1; }
  # Nothing of the build host's apt state or caches goes into the image.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/var/log/*.log "$rootfs"/tmp/*
  tar --numeric-owner -C "$rootfs" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
fi

echo "importing $tarball as $BASE_IMAGE"
docker_ import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  "$tarball" "$BASE_IMAGE" >/dev/null
echo "base image $BASE_IMAGE ready"
