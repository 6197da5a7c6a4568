#!/usr/bin/env bash
# `make compose-check` in one command, from a fresh clone: docker and compose installed and
# running (ensure_docker.sh), the images built through the offline path (build_images.sh:
# debootstrap base, wheelhouse), then the stack run, validated, a replica and a shard killed under
# load and everything removed (python -m tools.containers.compose_check). The last line
# printed is the one-line summary; the exit status is the check's.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tools/containers/common.sh
py=${PYTHON:-.venv/bin/python}

tools/containers/ensure_docker.sh
start=$SECONDS
tools/containers/build_images.sh
export SUTRA_BUILD_SECONDS=$((SECONDS - start))
SUTRA_COMPOSE=$(compose_cmd)
export SUTRA_COMPOSE SUTRA_IMAGE_TAG="$VERSION"
exec "$py" -m tools.containers.compose_check
