#!/usr/bin/env bash
# `make image`: build sutra-embed:<version> and sutra-haproxy:2.6 without any registry
# or package index (the offline path), or from the official images when asked.
#
#   tools/containers/build_images.sh              offline: local Debian base + wheelhouse
#   SUTRA_BASE=official tools/containers/build_images.sh   python:3.11-slim / debian:bookworm-slim
#
# Offline: `make image-base` makes sutra-base:bookworm with debootstrap (cached), the
# wheelhouse holds the venv's exact wheels (CPU torch included), and both go into the
# build; HAProxy comes from Debian's archive. Whatever the base, the host's CA bundle
# (SUTRA_CA_BUNDLE, default /etc/ssl/certs/ca-certificates.crt) is passed as the build
# secret `ca_certs`, so pip trusts a TLS-intercepting proxy when it needs the network.
# Prints each image with its build time.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tools/containers/common.sh

ca=${SUTRA_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
secret=()
[ -s "$ca" ] && secret=(--secret "id=ca_certs,src=$ca")
revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)

if [ "${SUTRA_BASE:-local}" = official ]; then
  app_base=python:3.11-slim-bookworm haproxy_base=debian:bookworm-slim
else
  tools/containers/image_base.sh
  app_base=$BASE_IMAGE haproxy_base=$BASE_IMAGE
fi
tools/containers/wheelhouse.sh

build() {
  local tag=$1; shift
  local start=$SECONDS
  docker_build --progress=plain "$@" -t "$tag" . >"$IMAGE_CACHE/build-${tag%%:*}.log" 2>&1 \
    || { tail -40 "$IMAGE_CACHE/build-${tag%%:*}.log" >&2; echo "building $tag failed (log: $IMAGE_CACHE/build-${tag%%:*}.log)" >&2; return 1; }
  echo "built $tag in $((SECONDS - start)) s"
}

mkdir -p "$IMAGE_CACHE"
build "$IMAGE_REPO:$VERSION" -f deploy/Dockerfile --build-arg "BASE_IMAGE=$app_base" \
  --build-arg "VERSION=$VERSION" --build-arg "REVISION=$revision" "${secret[@]}"
build "$HAPROXY_REPO:$HAPROXY_TAG" -f deploy/haproxy.Dockerfile --build-arg "BASE_IMAGE=$haproxy_base"
# The images these tags replaced (dangling now) would pile up on every rebuild.
docker_ image prune -f --filter "label=org.opencontainers.image.title=sutra-embed" >/dev/null
docker_ image prune -f --filter "label=org.opencontainers.image.title=sutra-haproxy" >/dev/null
