#!/usr/bin/env bash
# GraphQL bench (called by `bash scripts/bench.sh graphql`, or directly after a release build):
# the FastAPI example (strawberry at /graphql, no simulated delay) on CPU 0 with the load
# generator, outrider (release, one thread) alone on CPU 1. Measures, with wrk:
#
#   http-hit     GET /api/items/1, an L1 HTTP cache hit (the reference cost)
#   apq-get-hit  a hashed GET (useGETForHashedQueries), answered from the GraphQL response cache
#   apq-post-hit a hash-only POST, answered from the GraphQL response cache
#   app-direct   the same query with its full text, POSTed straight to the app
#
# and prints req/s, p50/p99 latency and CPU per request of the process that answered (outrider's
# for the first three, uvicorn's for the last), from /proc/<pid>/stat before and after each run.
# Env: DURATION (s, default 8), CONNS (default 64).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
DURATION=${DURATION:-8} CONNS=${CONNS:-64}
APP_PORT=18001 PORT=18100 ADMIN=18190
W=$(mktemp -d -t outrider-gqlbench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [[ -n $p ]] && kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
command -v wrk >/dev/null || { echo "wrk is needed (apt-get install wrk)" >&2; exit 1; }

# shellcheck source=scripts/bench-lib.sh
source "$ROOT/scripts/bench-lib.sh"

(cd examples/fastapi-backend && APP_DELAY_MS=0 exec taskset -c 0 python3 -m uvicorn app:app \
  --host 127.0.0.1 --port $APP_PORT --no-access-log --log-level warning) &
APP_PID=$!; PIDS+=("$APP_PID")
cat >"$W/outrider.yaml" <<YAML
listen: 127.0.0.1:$PORT
threads: 1
admin: { listen: 127.0.0.1:$ADMIN }
upstreams:
  app: { url: "http://127.0.0.1:$APP_PORT", timeout: 30s }
telemetry: { access_log: off }
shutdown: { grace_period: 1s }
routes:
  - name: items
    match: { path_prefix: /api/items, methods: [GET, HEAD] }
    upstream: app
    cache: { ttl: 5m }
  - name: graphql
    match: { path: /graphql, methods: [GET, POST] }
    upstream: app
    graphql: { response_cache: { ttl: 5m, scope: shared } }
YAML
taskset -c 1 "${OUTRIDER:-$ROOT/target/release/outrider}" run --config "$W/outrider.yaml" >"$W/outrider.log" 2>&1 &
SUT_PID=$!; PIDS+=("$SUT_PID")
wait_port "http://127.0.0.1:$APP_PORT/healthz"
wait_port "http://127.0.0.1:$ADMIN/ready"

QUERY='query BenchItems($limit: Int!) { items(limit: $limit) { id name price } }'
HASH=$(printf '%s' "$QUERY" | sha256sum | cut -d' ' -f1)
VARS='{"limit":5}'
EXT="{\"persistedQuery\":{\"version\":1,\"sha256Hash\":\"$HASH\"}}"
FULL=$(python3 -c 'import json,sys; print(json.dumps({"query":sys.argv[1],"variables":json.loads(sys.argv[2])}))' "$QUERY" "$VARS")
REGISTER=$(python3 -c 'import json,sys; print(json.dumps({"query":sys.argv[1],"variables":json.loads(sys.argv[2]),"extensions":json.loads(sys.argv[3])}))' "$QUERY" "$VARS" "$EXT")
HASH_ONLY=$(python3 -c 'import json,sys; print(json.dumps({"variables":json.loads(sys.argv[1]),"extensions":json.loads(sys.argv[2])}))' "$VARS" "$EXT")
GET_PATH="/graphql?$(python3 -c 'import sys,urllib.parse as u; print(u.urlencode({"variables":sys.argv[1],"extensions":sys.argv[2]}))' "$VARS" "$EXT")"

post() { curl -fsS -H 'content-type: application/json' --data "$2" "$1"; }
# Register the query, fill the response cache, and check that both hits are hits.
post "http://127.0.0.1:$PORT/graphql" "$REGISTER" >/dev/null
curl -fsS -o /dev/null "http://127.0.0.1:$PORT/api/items/1"
for url in "http://127.0.0.1:$PORT$GET_PATH" "http://127.0.0.1:$PORT/api/items/1"; do
  curl -fsS -D - -o /dev/null "$url" | grep -qi '^x-cache-status: HIT' || { echo "not a hit: $url" >&2; exit 1; }
done
curl -fsS -D - -o /dev/null -H 'content-type: application/json' --data "$HASH_ONLY" "http://127.0.0.1:$PORT/graphql" \
  | grep -qi '^x-cache-status: HIT' || { echo "hash-only POST is not a hit" >&2; exit 1; }

lua_post "$HASH_ONLY" >"$W/hash_only.lua"
lua_post "$FULL" >"$W/full.lua"

echo "| scenario | req/s | p50 | p99 | CPU µs/req (answering process) |"
echo "|---|---|---|---|---|"
measure http-hit "$SUT_PID" "http://127.0.0.1:$PORT/api/items/1"
measure apq-get-hit "$SUT_PID" "http://127.0.0.1:$PORT$GET_PATH"
measure apq-post-hit "$SUT_PID" "http://127.0.0.1:$PORT/graphql" "$W/hash_only.lua"
measure app-direct "$APP_PID" "http://127.0.0.1:$APP_PORT/graphql" "$W/full.lua"
read -r _ _ http_cpu <"$W/http-hit"
read -r _ _ get_cpu <"$W/apq-get-hit"
read -r _ _ post_cpu <"$W/apq-post-hit"
python3 - "$http_cpu" "$get_cpu" "$post_cpu" <<'PY'
import sys
http, get, post = map(float, sys.argv[1:])
print(f"# CPU per cached GraphQL hit / L1 HTTP hit: hashed GET {get / http:.2f}x, "
      f"hash-only POST {post / http:.2f}x (target <= 1.5x)")
PY
