#!/usr/bin/env bash
# Fuzz the HTTP API with Schemathesis against a live stub server: every phase
# (examples, coverage, fuzzing, stateful), several seeds, many examples per
# operation; the only check is "no 5xx" (not_a_server_error). Prints each seed's
# result and exits non-zero when any run found a server error.
#   bench/fuzz.sh                       # seeds 1 2 3, 300 examples per operation
#   SEEDS="7" EXAMPLES=1000 bench/fuzz.sh
#   URL=http://127.0.0.1:4030 bench/fuzz.sh   # fuzz a server you started yourself
set -uo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"1 2 3"}
EXAMPLES=${EXAMPLES:-300}
WORKDIR=$(mktemp -d -t easel-fuzz-XXXXXX)
server_pid=""
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; wait 2>/dev/null; }
trap cleanup EXIT

if [ -z "${URL:-}" ]; then
  PORT=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
  URL="http://127.0.0.1:$PORT"
  cat > "$WORKDIR/settings.json" <<JSON
{"models": {"stub": {"backend": "stub", "enabled": true, "tasks": ["generate", "edit"], "max_images": 4,
  "max_pixels": 262144, "default_width": 64, "default_height": 64, "recommended_steps": 2}},
 "default_model": "stub", "limits": {"max_body_mib": 4, "max_steps": 20}}
JSON
  python3 server.py --config "$WORKDIR/settings.json" --port "$PORT" > "$WORKDIR/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 200); do curl -sf "$URL/healthz" > /dev/null && break; sleep 0.1; done
fi

status=0
for seed in $SEEDS; do
  echo "== seed $seed, $EXAMPLES examples per operation, $URL"
  (cd "$WORKDIR" && schemathesis run "$URL/openapi.json" --checks not_a_server_error \
    --phases examples,coverage,fuzzing,stateful --max-examples "$EXAMPLES" --seed "$seed" \
    --suppress-health-check all --request-timeout 30 --no-color ${EXTRA:-}) || status=1  # its .schemathesis/ cache stays in WORKDIR
done
if [ -n "$server_pid" ] && grep -q "unhandled error" "$WORKDIR/server.log"; then
  echo "== the server logged unhandled errors:"; grep -A3 "unhandled error" "$WORKDIR/server.log" | head -40; status=1
fi
[ $status -eq 0 ] && echo "fuzz: no server errors" || echo "fuzz: SERVER ERRORS FOUND (see above; server log in $WORKDIR)"
exit $status
