#!/usr/bin/env bash
# End-to-end benchmarks with ../shared/bench/bench.sh (nginx, HAProxy, nginx proxy_cache and
# Varnish measured in the same run, every proxy on its own CPU with one worker):
#
#   bash scripts/bench.sh [fast|app|redis|bare|tracing|graphql|overload|inference]...      (default: fast bare)
#
#   fast   outrider with L1 caching GET /hit/*, passing /pass/* through; nginx backend
#   app    the same in front of the FastAPI backend (~20 ms per call)
#   redis  L1 disabled: every hit comes from Redis (L2), to read Redis-tier throughput/latency
#   bare   a bare Pingora pass-through (examples/bare_pingora.rs) next to nginx, the baseline
#          for outrider's own per-request cost
#   tracing  pass-through CPU per request with tracing off (no endpoint), on at sample_ratio 0
#          and on at sample_ratio 1 (every request exported to a local OTLP sink), each run next
#          to nginx; prints each variant's CPU/request relative to nginx and to "off"
#   overload the FastAPI example (1 worker, ~20 ms per call) driven open-loop at about twice its
#          capacity (scripts/overload.py): no protection (plain outrider), nginx with limit_conn,
#          outrider with a fixed limit, outrider adaptive; admitted p50/p95/p99, goodput, shed
#          ratio and shed answer latency. Env OVERLOAD_SECONDS (default 10).
#   graphql  a GraphQL APQ hit from the response cache (hashed GET and hash-only POST) next to an
#          L1 HTTP cache hit and the same query sent straight to the FastAPI example
#          (scripts/bench-graphql.sh)
#   inference  the FastAPI example's /api/predict/risk answered in-process (tract) next to the app
#          itself (onnxruntime), single-row requests at 64 connections (scripts/bench-inference.sh)
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
      ;;
    graphql)
      echo "### graphql: APQ + response-cache hits vs an L1 HTTP cache hit vs the app directly"
      DURATION=${DURATION:-8} CONNS=${CONNS:-64} bash scripts/bench-graphql.sh
      ;;
    inference)
      echo "### inference: /api/predict/risk in-process (tract) vs the FastAPI app (onnxruntime)"
      DURATION=${DURATION:-8} CONNS=${CONNS:-64} bash scripts/bench-inference.sh
      ;;
    overload)
      command -v nginx >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq nginx >/dev/null; }
      secs=${OVERLOAD_SECONDS:-10}
      (cd examples/fastapi-backend && APP_DELAY_MS=20 exec taskset -c 0 python3 -m uvicorn app:app \
        --host 127.0.0.1 --port 18001 --workers 1 --log-level warning --no-access-log) &
      APP_PID=$!
      for _ in $(seq 100); do curl -fsS -o /dev/null http://127.0.0.1:18001/healthz && break; sleep 0.2; done
      # Capacity: the most the app answers with plenty of concurrency, measured directly.
      cap=$(taskset -c 0 python3 scripts/overload.py 18001 /api/items/1 3000 5 |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["goodput_rps"])')
      rate=$(python3 -c "print(round(2 * $cap))")
      echo "### overload: app capacity ~${cap} req/s direct; offered ${rate} req/s (2x) for ${secs}s"
      mkdir -p "$OUT/nginx"
      cat >"$OUT/nginx/nginx.conf" <<NGINX
worker_processes 1; daemon off; pid $OUT/nginx/nginx.pid; error_log $OUT/nginx/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $OUT/nginx; proxy_temp_path $OUT/nginx; fastcgi_temp_path $OUT/nginx;
  uwsgi_temp_path $OUT/nginx; scgi_temp_path $OUT/nginx;
  limit_conn_zone \$server_name zone=app:1m;
  upstream app { server 127.0.0.1:18001; keepalive 64; }
  server { listen 127.0.0.1:18101;
    location / { limit_conn app 32; limit_conn_status 503; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_pass http://app; } }
}
NGINX
      run_sut() { # name port
        for _ in $(seq 100); do curl -fsS -o /dev/null "http://127.0.0.1:$2/healthz" && break; sleep 0.1; done
        printf '%-22s ' "$1"
        taskset -c 0 python3 scripts/overload.py "$2" /api/items/1 "$rate" "$secs"
      }
      overload_config() { # slo section
        cat <<YAML
listen: 127.0.0.1:18100
threads: 1
admin: { listen: 127.0.0.1:18190 }
upstreams:
  app: { url: "http://127.0.0.1:18001", timeout: 30s }
telemetry: { access_log: off }
shutdown: { grace_period: 1s }
routes:
  - name: items
    match: { path_prefix: /api/items }
    upstream: app
$1
  - name: rest
    match: { path_prefix: / }
    upstream: app
YAML
      }
      for variant in none nginx-limit_conn fixed adaptive; do
        case $variant in
          nginx-limit_conn)
            taskset -c 1 nginx -c "$OUT/nginx/nginx.conf" & SUT_PID=$!
            run_sut "$variant" 18101
            ;;
          *)
            case $variant in
              none) slo="" ;;
              fixed) slo="    slo: { latency: { p95: 60ms }, enforce: { max_concurrency: 32, queue_timeout: 20ms, queue_size: 8 } }" ;;
              adaptive) slo="    slo: { latency: { p95: 60ms }, enforce: { adaptive: true, max_concurrency: 200, queue_timeout: 20ms, queue_size: 8 } }" ;;
            esac
            overload_config "$slo" >"$OUT/overload.yaml"
            taskset -c 1 "$ROOT/target/release/outrider" run --config "$OUT/overload.yaml" >"$OUT/overload.log" 2>&1 & SUT_PID=$!
            run_sut "outrider-$variant" 18100
            ;;
        esac
        kill "$SUT_PID" 2>/dev/null || true; wait "$SUT_PID" 2>/dev/null || true
        sleep 1
      done
      kill "$APP_PID" 2>/dev/null || true; wait "$APP_PID" 2>/dev/null || true
      ;;
    *) echo "unknown mode $mode" >&2; exit 2 ;;
  esac
done
