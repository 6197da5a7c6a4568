#!/usr/bin/env bash
# A local wheelhouse for the image build: every runtime dependency of sutra-embed as a
# wheel, at exactly the versions the host's .venv runs (the tested set), including the
# CPU build of torch that pip finds through this host's own index configuration.
#
#   tools/containers/wheelhouse.sh [DIR]     default build/wheelhouse
#
# The Dockerfile installs with `pip --no-index --find-links`, so an image builds without
# any package index once this folder exists, and never pulls a multi-GB CUDA torch.
# A folder whose wheels still match pyproject's dependencies and the venv's versions is
# kept as it is (seconds); otherwise it is made again (about 40 s from a warm pip cache).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-build/wheelhouse}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"

# Prints the stamp of the runtime set: pyproject's dependencies, then the venv's
# version of each distribution in the wheelhouse (or of each installed one, at first).
stamp() {
  "$py" - "$out" <<'PY'
import re, sys, tomllib
from importlib import metadata
from pathlib import Path
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))
wheels = {norm(p.name.split("-")[0]) for p in Path(sys.argv[1]).glob("*.whl")}
for dist in sorted(metadata.distributions(), key=lambda d: norm(d.metadata["Name"])):
    name = norm(dist.metadata["Name"])
    if name != "sutra-embed" and (not wheels or name in wheels):
        print(f"{name}=={dist.version}")
PY
}

if [ -f "$out/.stamp" ] && stamp | cmp -s - "$out/.stamp"; then
  echo "wheelhouse $out up to date ($(ls "$out"/*.whl | wc -l) wheels)"
  exit 0
fi
reqs=$(mktemp) constraints=$(mktemp)
trap 'rm -f "$reqs" "$constraints"' EXIT
rm -f "$out"/*.whl "$out/.stamp"
stamp | grep -v '==' >"$reqs"
stamp | grep '==' >"$constraints"
echo "building wheelhouse in $out"
"$py" -m pip wheel --quiet --wheel-dir "$out" -r "$reqs" -c "$constraints" 2> >(grep -v "^WARNING: Location" >&2)
stamp >"$out/.stamp"
echo "wheelhouse $out: $(ls "$out"/*.whl | wc -l) wheels, $(du -sh "$out" | cut -f1)"
