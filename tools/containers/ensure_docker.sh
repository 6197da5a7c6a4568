#!/usr/bin/env bash
# Make `docker` and a compose implementation usable here: install Debian's docker.io and
# docker-compose (1.29) when missing, and start dockerd when no daemon answers.
#
#   tools/containers/ensure_docker.sh
#
# A daemon that already answers (systemd's, Docker Desktop's, one started before) is used
# as it is. Otherwise dockerd is started in the background with its log in
# build/images/dockerd.log and left running for the next command (images stay cached);
# this script never stops a daemon. Root only for those two steps, like apt-get.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tools/containers/common.sh

wanted=()
command -v dockerd >/dev/null || [ -x /usr/sbin/dockerd ] || wanted+=(docker.io:dockerd)
command -v docker >/dev/null || wanted+=(docker.io:docker)
compose_cmd >/dev/null 2>&1 || wanted+=(docker-compose)
[ ${#wanted[@]} -eq 0 ] || tools/install_debian_packages.sh "${wanted[@]}"

if ! docker info >/dev/null 2>&1; then
  mkdir -p "$IMAGE_CACHE"
  echo "starting dockerd (log: $IMAGE_CACHE/dockerd.log)"
  nohup "$(command -v dockerd || echo /usr/sbin/dockerd)" >"$IMAGE_CACHE/dockerd.log" 2>&1 </dev/null &
  for _ in $(seq 120); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || { tail -20 "$IMAGE_CACHE/dockerd.log" >&2; echo "dockerd did not start" >&2; exit 1; }
fi
echo "docker $(docker version --format '{{.Server.Version}}' 2>/dev/null), compose: $(compose_cmd)"
