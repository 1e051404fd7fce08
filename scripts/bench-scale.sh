#!/usr/bin/env bash
# Scale-out bench (called by `bash scripts/bench.sh scale`, or directly after a release build):
# L2-only hits (L1 disabled) against one Redis server and against a 3-master Redis Cluster, in the
# same run, and the Redis memory an entry costs.
#
#   single   outrider (one thread, L1 off) -> one redis-server
#   cluster  outrider (one thread, L1 off) -> a 3-master cluster (no replicas) on loopback
#
# Both outriders sit on CPU 1, Redis and the load generator on CPU 0, and each is driven by wrk
# over KEYS distinct cached paths (so the cluster's three masters all serve). Prints req/s,
# p50/p99 as the client saw them, outrider's own mean Redis GET time (from
# outrider_cache_redis_duration_seconds{op="get"}) and the cluster/single ratios; then the Redis
# `used_memory` per stored entry for a few body sizes (the overhead per cached MiB).
# Env: DURATION (s, default 8), CONNS (default 32), KEYS (default 256), OUTRIDER (binary, default
# target/release/outrider). Ports: 18300-18399 only (cluster bus ports set with --cluster-port).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
DURATION=${DURATION:-8} CONNS=${CONNS:-32} KEYS=${KEYS:-256}
OUTRIDER=${OUTRIDER:-$ROOT/target/release/outrider}
BACKEND=18302 SINGLE=18301 NODES=(18311 18312 18313)
W=$(mktemp -d -t outrider-scalebench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [[ -n $p ]] && kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
command -v wrk >/dev/null || { echo "wrk is needed (apt-get install wrk)" >&2; exit 1; }
[[ -x $OUTRIDER ]] || { echo "no $OUTRIDER (cargo build --release)" >&2; exit 1; }

# shellcheck source=scripts/bench-lib.sh
source "$ROOT/scripts/bench-lib.sh"

# A backend whose /hit/<size>/<n> answers <size> bytes, cacheable.
cat >"$W/backend.py" <<'PY'
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        parts = self.path.split("/")
        size = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 64
        body = b"x" * size
        self.send_response(200)
        self.send_header("content-type", "application/octet-stream")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
taskset -c 0 python3 "$W/backend.py" $BACKEND &
PIDS+=($!)

redis() { # port [args...]
  local port=$1; shift
  mkdir -p "$W/r$port"
  taskset -c 0 redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$W/r$port" "$@" >/dev/null &
  PIDS+=($!)
  for _ in $(seq 1 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "redis on $port did not start" >&2; exit 1
}
redis $SINGLE
for p in "${NODES[@]}"; do
  redis "$p" --cluster-enabled yes --cluster-port $((p + 40)) --cluster-config-file "$W/r$p/nodes.conf"
done
redis-cli --cluster create "${NODES[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes >/dev/null
for p in "${NODES[@]}"; do
  for _ in $(seq 1 200); do redis-cli -p "$p" cluster info | grep -q cluster_state:ok && break; sleep 0.05; done
done

outrider() { # name port admin redis-yaml
  cat >"$W/$1.yaml" <<YAML
listen: 127.0.0.1:$2
threads: 1
admin: { listen: 127.0.0.1:$3 }
upstreams:
  be: { url: "http://127.0.0.1:$BACKEND", timeout: 30s }
cache:
  memory: { max_size: 0 }
  redis: { $4, timeout: 50ms }
  max_entry_size: 4MiB
telemetry: { access_log: off }
shutdown: { grace_period: 1s }
routes:
  - name: hit
    match: { path_prefix: /hit/, methods: [GET, HEAD] }
    upstream: be
    cache: { ttl: 10m }
YAML
  taskset -c 1 "$OUTRIDER" run --config "$W/$1.yaml" >"$W/$1.log" 2>&1 &
  PIDS+=($!)
  eval "PID_$1=$!"
  wait_port "http://127.0.0.1:$3/ready"
  for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$3/ready" | grep -q '"redis":{[^}]*"status":"up"' && return 0; sleep 0.1
  done
  echo "$1: redis not up" >&2; cat "$W/$1.log" >&2; exit 1
}
seeds=$(printf '"redis://127.0.0.1:%s", ' "${NODES[@]}")
outrider single 18320 18390 "url: \"redis://127.0.0.1:$SINGLE\""
outrider cluster 18321 18391 "cluster_nodes: [${seeds%, }]"

# Fill: every key once through each (misses), then wait for the background writes.
for port in 18320 18321; do
  for i in $(seq 1 "$KEYS"); do curl -fsS -o /dev/null "http://127.0.0.1:$port/hit/1024/$i"; done
done
count() { local n=0 p; for p in "$@"; do n=$((n + $(redis-cli -p "$p" dbsize))); done; echo $n; }
for _ in $(seq 1 100); do
  [[ $(count $SINGLE) -ge $KEYS && $(count "${NODES[@]}") -ge $KEYS ]] && break; sleep 0.1
done
echo "cluster spread: $(for p in "${NODES[@]}"; do printf '%s ' "$(redis-cli -p "$p" dbsize)"; done)keys per master"
for port in 18320 18321; do
  curl -fsS -D - -o /dev/null "http://127.0.0.1:$port/hit/1024/1" | grep -qi '^x-cache-status: HIT' \
    || { echo "not an L2 hit on $port" >&2; exit 1; }
done

cat >"$W/keys.lua" <<LUA
local i = 0
request = function()
  i = (i % $KEYS) + 1
  return wrk.format("GET", "/hit/1024/" .. i)
end
LUA
get_stats() { # admin -> "sum count"
  curl -fsS "http://127.0.0.1:$1/metrics" | awk '/^outrider_cache_redis_duration_seconds_(sum|count)\{op="get"\}/ {printf "%s ", $2}'
}
declare -A RPS P50 GETUS
echo
echo "| target | req/s | p50 | p99 | outrider's mean Redis GET (µs) | CPU µs/req (outrider) |"
echo "|---|---|---|---|---|---|"
for name in single cluster; do
  admin=$([[ $name == single ]] && echo 18390 || echo 18391)
  port=$([[ $name == single ]] && echo 18320 || echo 18321)
  pid_var="PID_$name"
  read -r s0 c0 <<<"$(get_stats "$admin")"
  row=$(measure "$name" "${!pid_var}" "http://127.0.0.1:$port/hit/1024/1" "$W/keys.lua")
  read -r s1 c1 <<<"$(get_stats "$admin")"
  mean=$(python3 -c "print('%.0f' % (($s1 - $s0) / max(1, $c1 - $c0) * 1e6))")
  # measure prints "| name | rps | p50 | p99 | cpu |": put the Redis GET mean before the CPU.
  IFS='|' read -r _ n r p5 p9 cpu <<<"$row"
  echo "|$n|$r|$p5|$p9| $mean |$cpu|"
  RPS[$name]=$(tr -d ' ' <<<"$r"); GETUS[$name]=$mean
done
python3 -c "print('cluster/single: throughput %.2f, mean Redis GET %.2f' % (float('${RPS[cluster]}') / float('${RPS[single]}'), float('${GETUS[cluster]}') / max(1.0, float('${GETUS[single]}'))))"

# Memory: N entries of each size into the single server; used_memory per entry and per MiB.
echo
echo "| body | entries | Redis bytes/entry | overhead/entry | Redis MiB per cached body MiB |"
echo "|---|---|---|---|---|"
for size in 1024 16384 131072; do
  n=$((size >= 131072 ? 200 : 1000))
  redis-cli -p $SINGLE flushall >/dev/null
  before=$(redis-cli -p $SINGLE info memory | awk -F: '/^used_memory:/ {print $2+0}')
  for i in $(seq 1 "$n"); do curl -fsS -o /dev/null "http://127.0.0.1:18320/hit/$size/m$i"; done
  for _ in $(seq 1 100); do [[ $(count $SINGLE) -ge $n ]] && break; sleep 0.1; done
  after=$(redis-cli -p $SINGLE info memory | awk -F: '/^used_memory:/ {print $2+0}')
  python3 -c "
per = ($after - $before) / $n
print('| %d B | %d | %.0f | %.0f | %.3f |' % ($size, $n, per, per - $size, per / $size))"
done
