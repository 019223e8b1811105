#!/usr/bin/env bash
# Installs everything the tests need, then runs them: `bash scripts/test.sh [pytest args]`.
# Debian packages: chromium (browser tests), redis-server (the Redis broker's tests
# start their own redis-server processes on loopback ports), podman, mmdebstrap and runc
# (tests/test_containers.py builds and runs the container images).
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
for tool in podman mmdebstrap runc; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
if [ "${#missing[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing Debian ${missing[*]} for the tests..." >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "${missing[*]} missing and cannot be installed here: the tests that need them will be skipped" >&2
  fi
fi
python3 -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
python3 -m pip install -q --disable-pip-version-check -r requirements-gradio.txt
export HF_HUB_OFFLINE=1
# the import layers of server/ (pyproject.toml [tool.importlinter]): no cycles, no upward imports
lint-imports --no-cache
exec python3 -m pytest "$@"
