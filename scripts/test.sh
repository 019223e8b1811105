#!/usr/bin/env bash
# Installs everything the tests need, then runs them: `bash scripts/test.sh [pytest args]`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing Debian chromium for the browser tests..." >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "chromium is missing and cannot be installed here: the browser tests will be skipped" >&2
  fi
fi
python3 -m pip install -q --disable-pip-version-check -r requirements.txt
export HF_HUB_OFFLINE=1
exec python3 -m pytest "$@"
