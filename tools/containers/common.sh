# Shared by tools/containers/*.sh: image names, the cache folder, and a docker
# client that can build with BuildKit.
#
# Debian bookworm ships Docker 20.10, whose own client builds with BuildKit when
# DOCKER_BUILDKIT=1 (build secrets, RUN --mount). A newer client (23+) needs the
# buildx plugin for that; without it, `docker build` falls back to the legacy builder,
# which cannot read the CA secret. docker_build picks whichever works on this host.

IMAGE_CACHE=${SUTRA_IMAGE_CACHE:-build/images}
BASE_IMAGE=${SUTRA_BASE_IMAGE:-sutra-base:bookworm}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
IMAGE_REPO=${SUTRA_IMAGE_REPO:-sutra-embed}
HAPROXY_REPO=${SUTRA_HAPROXY_REPO:-sutra-haproxy}
export DOCKER_CLI_HINTS=false

docker_() { docker "$@"; }

# docker_build ARGS...: `docker build` with BuildKit, through buildx when the client has
# it, else through a client with BuildKit built in (Debian's /usr/bin/docker).
docker_build() {
  if docker buildx version >/dev/null 2>&1; then
    DOCKER_BUILDKIT=1 docker buildx build --load "$@"
    return
  fi
  local client
  for client in docker /usr/bin/docker; do
    command -v "$client" >/dev/null || continue
    major=$("$client" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1)
    if [ -n "$major" ] && [ "$major" -lt 23 ]; then
      DOCKER_BUILDKIT=1 "$client" build "$@"
      return
    fi
  done
  echo "no docker client here can build with BuildKit: install the buildx plugin or Debian's docker.io" >&2
  return 1
}
HAPROXY_TAG=2.6

# compose_cmd: the compose implementation to use, printed as a command line:
# SUTRA_COMPOSE if set, else the `docker compose` plugin (v2), else docker-compose (v1,
# Debian's 1.29). The file works with both (tests/test_deploy_manifests.py checks v2).
compose_cmd() {
  if [ -n "${SUTRA_COMPOSE:-}" ]; then
    echo "$SUTRA_COMPOSE"
  elif docker compose version >/dev/null 2>&1; then
    echo "docker compose"
  elif command -v docker-compose >/dev/null && docker-compose version >/dev/null 2>&1; then
    echo "docker-compose"
  else
    return 1
  fi
}
