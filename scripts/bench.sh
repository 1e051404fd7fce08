#!/usr/bin/env bash
# End-to-end benchmarks with ../shared/bench/bench.sh (nginx, HAProxy, nginx proxy_cache and
# Varnish measured in the same run, every proxy on its own CPU with one worker):
#
#   bash scripts/bench.sh [fast|app|redis|bare|tracing|graphql|llm|overload|inference|scale]...  (default: fast bare)
#   Env OUTRIDER: the binary to measure (default: a release build of this checkout).
#
#   fast   outrider with L1 caching GET /hit/*, passing /pass/* through; nginx backend
#   app    the same in front of the FastAPI backend (~20 ms per call)
#   redis  L1 disabled: every hit comes from Redis (L2), to read Redis-tier throughput/latency
#   bare   a bare Pingora pass-through (examples/bare_pingora.rs) next to nginx, the baseline
#          for outrider's own per-request cost
#   tracing  pass-through CPU per request with tracing off (no endpoint), on at sample_ratio 0
#          and on at sample_ratio 1 (every request exported to a local OTLP sink): three
#          outriders measured in alternating rounds (env ROUNDS, default 5; DURATION, default 5 s)
#          from their process CPU time; prints each variant's median CPU/request and its ratio
#          to "off"
#   overload the FastAPI example (1 worker, ~20 ms per call) driven open-loop at about twice its
#          capacity (oha open loop, summarised by scripts/overload-report.py): no protection
#          (plain outrider), nginx with limit_conn, outrider with a fixed limit, outrider adaptive; admitted p50/p95/p99, goodput, shed
#          ratio and shed answer latency (as the client saw it, and as outrider decided it, from
#          outrider_slo_admission_wait_seconds), over the whole run and in "steady" from its
#          first second on. Each proxy gets a warm-up of the same load first. Capacity is probed
#          closed-loop with wrk. Env OVERLOAD_SECONDS (default 10), OVERLOAD_WARMUP (default 2).
#   graphql  a GraphQL APQ hit from the response cache (hashed GET and hash-only POST) next to an
#          L1 HTTP cache hit and the same query sent straight to the FastAPI example
#          (scripts/bench-graphql.sh)
#   llm    an LLM chat-completion cache hit next to LiteLLM's proxy with its in-memory cache (when
#          installed apart, see scripts/bench-llm.sh) and the fake provider directly
#   scale  L2-only hits (L1 off) against one Redis server and a 3-master Redis Cluster in the same
#          run, their ratio, and Redis memory per cached entry (scripts/bench-scale.sh)
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
# The binary under test: OUTRIDER=path, or a release build of this checkout. (The example is
# built on its own, in `bare` mode: building it with the binary unifies dev-dependency features
# into the binary's build and rebuilds every dependency.)
if [[ -z ${OUTRIDER:-} ]]; then
  cargo build --release --bin outrider
  OUTRIDER=$ROOT/target/release/outrider
fi
export OUTRIDER
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
      SUT_NAME=outrider SUT_CMD="$OUTRIDER run --config $OUT/outrider.yaml" \
        bash "$BENCH" "$mode"
      ;;
    redis)
      port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
      taskset -c 0 redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
      REDIS_PID=$!
      config 0 "redis://127.0.0.1:$port" >"$OUT/outrider.yaml"
      echo "### redis: outrider with L1 disabled (every hit from Redis) vs nginx proxy_cache"
      PEERS="nginx-cache" SUT_NAME=outrider-l2 \
        SUT_CMD="$OUTRIDER run --config $OUT/outrider.yaml" bash "$BENCH" fast
      kill "$REDIS_PID"; REDIS_PID=
      ;;
    bare)
      cargo build --release --example bare_pingora
      echo "### bare: a bare Pingora pass-through vs nginx (baseline for outrider's own cost)"
      PEERS="nginx" SUT_NAME=bare-pingora \
        SUT_CMD="$ROOT/target/release/examples/bare_pingora 127.0.0.1:18100 127.0.0.1:18001" \
        bash "$BENCH" fast
      ;;
    tracing)
      # Three outriders side by side, each alone on CPU 1 in turn: tracing off, on at ratio 0,
      # on at ratio 1 (every request exported to an OTLP/HTTP sink on CPU 0). Rounds alternate
      # the variants so the shared machine's drift hits all three alike; each variant's CPU per
      # request is read from its process's CPU time (all threads, the exporter's included).
      command -v nginx >/dev/null 2>&1 && command -v wrk >/dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq nginx wrk >/dev/null; }
      rounds=${ROUNDS:-5}; secs=${DURATION:-5}
      mkdir -p "$OUT/be"
      cat >"$OUT/be/nginx.conf" <<NGINX
worker_processes 1; daemon off; pid $OUT/be/nginx.pid; error_log $OUT/be/error.log;
events { worker_connections 4096; }
http {
  access_log off; keepalive_requests 1000000;
  client_body_temp_path $OUT/be; proxy_temp_path $OUT/be; fastcgi_temp_path $OUT/be;
  uwsgi_temp_path $OUT/be; scgi_temp_path $OUT/be;
  server { listen 127.0.0.1:18001;
    location / { default_type application/json; return 200 '{"id":1,"name":"item","tags":["a","b","c"]}'; } }
}
NGINX
      taskset -c 0 nginx -c "$OUT/be/nginx.conf" & BE_PID=$!
      sink_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
      taskset -c 0 python3 - "$sink_port" <<'PY' &
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
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
      declare -A TPID
      i=0
      for variant in off ratio0 ratio1; do
        case $variant in
          off) otlp='{}' ;;
          ratio0) otlp="{ endpoint: \"http://127.0.0.1:$sink_port\", sample_ratio: 0.0 }" ;;
          ratio1) otlp="{ endpoint: \"http://127.0.0.1:$sink_port\", sample_ratio: 1.0 }" ;;
        esac
        config 256MiB "" "$otlp" | sed -e "s/18100/1811$i/; s/18190/1819$i/" >"$OUT/trace-$variant.yaml"
        taskset -c 1 "$OUTRIDER" run --config "$OUT/trace-$variant.yaml" \
          >"$OUT/trace-$variant.log" 2>&1 &
        TPID[$variant]=$!
        for _ in $(seq 100); do curl -fsS -o /dev/null "http://127.0.0.1:1811$i/pass/1" && break; sleep 0.1; done
        i=$((i + 1))
      done
      cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
      : >"$OUT/trace-samples.txt"
      for round in $(seq "$rounds"); do
        i=0
        for variant in off ratio0 ratio1; do
          pid=${TPID[$variant]}
          before=$(cpu_ticks "$pid")
          reqs=$(taskset -c 0 wrk -t1 -c32 -d"${secs}s" "http://127.0.0.1:1811$i/pass/1" |
            awk '/requests in/ {print $1}')
          after=$(cpu_ticks "$pid")
          echo "$variant $round $reqs $((after - before))" >>"$OUT/trace-samples.txt"
          i=$((i + 1))
        done
      done
      echo "### tracing overhead: CPU per pass-through request, $rounds alternating rounds of ${secs}s (median)"
      python3 - "$OUT/trace-samples.txt" "$(getconf CLK_TCK)" <<'PY'
import statistics, sys
hz = float(sys.argv[2])
per = {}
for line in open(sys.argv[1]):
    variant, _, reqs, ticks = line.split()
    per.setdefault(variant, []).append(float(ticks) / hz * 1e6 / max(1.0, float(reqs)))
base = statistics.median(per["off"])
for variant in ("off", "ratio0", "ratio1"):
    values = per[variant]
    med = statistics.median(values)
    print(f"{variant:7} cpu_us={med:.2f} (min {min(values):.2f}, max {max(values):.2f}) cpu/off={med / base:.3f}")
PY
      exported=$(curl -fsS http://127.0.0.1:18192/metrics | awk '/^outrider_trace_spans_exported_total/ {print $2}')
      dropped=$(curl -fsS http://127.0.0.1:18192/metrics | awk '/^outrider_trace_spans_dropped_total/ {s += $2} END {print s + 0}')
      echo "ratio1 spans exported: $exported, dropped: $dropped"
      for variant in off ratio0 ratio1; do kill "${TPID[$variant]}" 2>/dev/null || true; done
      kill "$SINK_PID" "$BE_PID" 2>/dev/null || true
      ;;
    scale)
      echo "### scale: L2-only hits, one Redis server vs a 3-master cluster; Redis memory per entry"
      DURATION=${DURATION:-8} CONNS=${CONNS:-32} bash scripts/bench-scale.sh
      ;;
    graphql)
      echo "### graphql: APQ + response-cache hits vs an L1 HTTP cache hit vs the app directly"
      DURATION=${DURATION:-8} CONNS=${CONNS:-64} bash scripts/bench-graphql.sh
      ;;
    llm)
      echo "### llm: a chat-completion cache hit vs LiteLLM's proxy cache vs the provider directly"
      DURATION=${DURATION:-8} CONNS=${CONNS:-64} bash scripts/bench-llm.sh
      ;;
    inference)
      echo "### inference: /api/predict/risk in-process (tract) vs the FastAPI app (onnxruntime)"
      DURATION=${DURATION:-8} CONNS=${CONNS:-64} bash scripts/bench-inference.sh
      ;;
    overload)
      command -v nginx >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq nginx >/dev/null; }
      secs=${OVERLOAD_SECONDS:-10}
      # The load: oha, open loop (a native generator; a Python one added its own event-loop lag).
      oha=$(command -v oha || echo "${OHA:-/work/tools/bin/oha}")
      if [[ ! -x $oha ]]; then
        cargo install --locked oha --root "$OUT/oha" || { echo "cannot install oha" >&2; exit 1; }
        oha="$OUT/oha/bin/oha"
      fi
      (cd examples/fastapi-backend && APP_DELAY_MS=20 exec taskset -c 0 python3 -m uvicorn app:app \
        --host 127.0.0.1 --port 18001 --workers 1 --log-level warning --no-access-log) &
      APP_PID=$!
      for _ in $(seq 100); do curl -fs -o /dev/null http://127.0.0.1:18001/healthz && break; sleep 0.2; done
      # The app has CPU 0 to itself; the load generators and the proxies share CPU 1.
      # Capacity: what the app answers closed-loop with plenty of concurrency, measured directly
      # with wrk.
      cap=$(taskset -c 1 wrk -t1 -c32 -d5s http://127.0.0.1:18001/api/items/1 |
        awk '/^Requests\/sec/ {print $2}')
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
  # A constant key: every request counts against the one limit (an empty key is not counted).
  limit_conn_zone \$server_port zone=app:1m;
  upstream app { server 127.0.0.1:18001; keepalive 64; }
  server { listen 127.0.0.1:18101;
    location / { limit_conn app 32; limit_conn_status 503; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_pass http://app; } }
}
NGINX
      # oha shares CPU 1 with the proxy under test: at real-time priority it runs the moment a
      # request is due or an answer arrives, so the scheduler's wait behind the proxy's own work
      # (a few ms under CFS) is not counted as the proxy's latency. Without the privilege, as is.
      rt=()
      if chrt -f 50 true 2>/dev/null; then rt=(chrt -f 50); fi
      # Each proxy first gets OVERLOAD_WARMUP seconds (default 2) of the same load, not counted:
      # a freshly started process pays once for its allocator's first pages, its upstream
      # connections and its first accepts, and the measured run is about the steady state (the
      # warm-up also trains outrider's adaptive limit; the server-side shed histogram printed
      # below includes the warm-up's sheds).
      warmup=${OVERLOAD_WARMUP:-2}
      run_sut() { # name port
        for _ in $(seq 100); do curl -fs -o /dev/null "http://127.0.0.1:$2/healthz" && break; sleep 0.1; done
        printf '%-22s ' "$1"
        if [[ $warmup != 0 ]]; then
          taskset -c 1 "${rt[@]}" "$oha" -z "${warmup}s" -q "$rate" -c 512 --no-tui \
            --output-format json "http://127.0.0.1:$2/api/items/1" >/dev/null
          sleep 2 # what the warm-up left queued in the app drains
        fi
        rm -f "$OUT/oha-overload.db"
        # --db-url keeps every answer (due time, end, status): the report also gives the
        # figures from the first second on, once oha has opened its 512 connections.
        taskset -c 1 "${rt[@]}" "$oha" -z "${secs}s" -q "$rate" --latency-correction -c 512 --no-tui \
          --stats-success-breakdown --db-url "$OUT/oha-overload.db" --output-format json \
          "http://127.0.0.1:$2/api/items/1" >"$OUT/oha-overload.json" 2>"$OUT/oha-overload.err" ||
          { echo; cat "$OUT/oha-overload.err" >&2; exit 1; }
        python3 scripts/overload-report.py "$OUT/oha-overload.json" "$secs" "$rate" "$OUT/oha-overload.db"
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
            taskset -c 1 "$OUTRIDER" run --config "$OUT/overload.yaml" >"$OUT/overload.log" 2>&1 & SUT_PID=$!
            run_sut "outrider-$variant" 18100
            # How long outrider took to decide each shed (the client's figure above is the whole
            # round trip, scheduling on the shared CPU included).
            printf '%-22s ' ""
            curl -fsS http://127.0.0.1:18190/metrics | python3 scripts/shed-latency.py items || true
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
