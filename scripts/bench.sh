#!/usr/bin/env bash
# End-to-end benchmarks with ../shared/bench/bench.sh (nginx, HAProxy, nginx proxy_cache and
# Varnish measured in the same run, every proxy on its own CPU with one worker):
#
#   bash scripts/bench.sh [fast|app|redis|bare|tracing|graphql]...      (default: fast bare)
#
#   fast   outrider with L1 caching GET /hit/*, passing /pass/* through; nginx backend
#   app    the same in front of the FastAPI backend (~20 ms per call)
#   redis  L1 disabled: every hit comes from Redis (L2), to read Redis-tier throughput/latency
#   bare   a bare Pingora pass-through (examples/bare_pingora.rs) next to nginx, the baseline
#          for outrider's own per-request cost
#   tracing  pass-through CPU per request with tracing off (no endpoint), on at sample_ratio 0
#          and on at sample_ratio 1 (every request exported to a local OTLP sink), each run next
#          to nginx; prints each variant's CPU/request relative to nginx and to "off"
#   graphql  a GraphQL APQ hit from the response cache (hashed GET and hash-only POST) next to an
#          L1 HTTP cache hit and the same query sent straight to the FastAPI example
#          (scripts/bench-graphql.sh)
#
# Env: BENCH (path to bench.sh, default ../shared/bench/bench.sh), DURATION, CONNS, REPS as bench.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
BENCH=${BENCH:-$ROOT/../shared/bench/bench.sh}
MODES=("${@:-fast bare}")
read -r -a MODES <<<"${MODES[*]}"
scripts/setup-debian.sh
cargo build --release --bin outrider --example bare_pingora
OUT=$(mktemp -d -t outrider-bench.XXXXXX)
trap 'rm -rf "$OUT"; [[ -n ${REDIS_PID:-} ]] && kill "$REDIS_PID" 2>/dev/null || true' EXIT

config() { # memory_max redis_url [otlp-map]
  cat <<YAML
listen: 127.0.0.1:18100
threads: 1
admin: { listen: 127.0.0.1:18190 }
upstreams:
  be: { url: "http://127.0.0.1:18001", timeout: 30s }
cache:
  memory: { max_size: $1 }
  redis: { url: "$2", timeout: 50ms }
telemetry: { access_log: off, otlp: ${3:-"{}"} }
shutdown: { grace_period: 1s }
routes:
  - name: hit
    match: { path_prefix: /hit/, methods: [GET, HEAD] }
    upstream: be
    cache: { ttl: 60s }
  - name: pass
    match: { path_prefix: / }
    upstream: be
YAML
}

for mode in "${MODES[@]}"; do
  case $mode in
    fast | app)
      config 256MiB "" >"$OUT/outrider.yaml"
      echo "### $mode: outrider (L1 cache) vs peers"
      SUT_NAME=outrider SUT_CMD="$ROOT/target/release/outrider run --config $OUT/outrider.yaml" \
        bash "$BENCH" "$mode"
      ;;
    redis)
      port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
      taskset -c 0 redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
      REDIS_PID=$!
      config 0 "redis://127.0.0.1:$port" >"$OUT/outrider.yaml"
      echo "### redis: outrider with L1 disabled (every hit from Redis) vs nginx proxy_cache"
      PEERS="nginx-cache" SUT_NAME=outrider-l2 \
        SUT_CMD="$ROOT/target/release/outrider run --config $OUT/outrider.yaml" bash "$BENCH" fast
      kill "$REDIS_PID"; REDIS_PID=
      ;;
    bare)
      echo "### bare: a bare Pingora pass-through vs nginx (baseline for outrider's own cost)"
      PEERS="nginx" SUT_NAME=bare-pingora \
        SUT_CMD="$ROOT/target/release/examples/bare_pingora 127.0.0.1:18100 127.0.0.1:18001" \
        bash "$BENCH" fast
      ;;
    tracing)
      # An OTLP/HTTP sink on CPU 0 (with the load generator): accepts every export with 200.
      sink_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
      taskset -c 0 python3 - "$sink_port" <<'PY' &
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Sink(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
PY
      SINK_PID=$!
      summary=$OUT/tracing-summary.txt; : >"$summary"
      for variant in off ratio0 ratio1; do
        case $variant in
          off) otlp='{}' ;;
          ratio0) otlp="{ endpoint: \"http://127.0.0.1:$sink_port\", sample_ratio: 0.0 }" ;;
          ratio1) otlp="{ endpoint: \"http://127.0.0.1:$sink_port\", sample_ratio: 1.0 }" ;;
        esac
        config 256MiB "" "$otlp" >"$OUT/outrider.yaml"
        echo "### tracing: $variant (pass-through /pass/1) vs nginx"
        PEERS="nginx" SUT_NAME="trace-$variant" \
          SUT_CMD="$ROOT/target/release/outrider run --config $OUT/outrider.yaml" \
          bash "$BENCH" fast | tee "$OUT/tracing-$variant.txt"
        awk -v v="$variant" '$1=="proxy" && $2 ~ /^trace-/ {print v, $(NF-3), $NF}' \
          "$OUT/tracing-$variant.txt" >>"$summary"
      done
      kill "$SINK_PID" 2>/dev/null || true
      echo "### tracing overhead: CPU per pass-through request (us), vs nginx in the same run, vs off"
      awk 'NR==1 {base=$3} {printf "%-7s cpu_us=%s cpu/nginx=%s cpu/off=%.2f\n", $1, $2, $3, $3/base}' "$summary"
    graphql)
      echo "### graphql: APQ + response-cache hits vs an L1 HTTP cache hit vs the app directly"
      DURATION=${DURATION:-8} CONNS=${CONNS:-64} bash scripts/bench-graphql.sh
      ;;
    *) echo "unknown mode $mode" >&2; exit 2 ;;
  esac
done
