#!/usr/bin/env bash
# Inference bench (called by `bash scripts/bench.sh inference`, or directly after a release
# build): the FastAPI example's /api/predict/risk (onnxruntime, no simulated delay, one uvicorn
# worker) on CPU 0 with the load generator, and outrider (release, one proxy thread, the model's
# compute thread) alone on CPU 1 answering the same route in-process with the same risk.onnx.
# Single-row requests at CONNS connections (no prediction cache: every request runs the model).
# Prints req/s, p50/p99 latency and CPU per request of the process that answered (from
# /proc/<pid>/stat before and after each run), and the ratios measured in this run; with nginx
# installed, also nginx returning a fixed string of the same shape from CPU 1: the floor of
# what any server answers at on this host in this run.
# Env: DURATION (s, default 8), CONNS (default 64), BATCH (the model's batch: map, default
# "{ max_size: 32, max_wait: 1ms }"), WARMUP (s of the same load before each closed-loop
# measurement, uncounted, for both servers; default 2).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
DURATION=${DURATION:-8} CONNS=${CONNS:-64} WARMUP=${WARMUP:-2} BATCH=${BATCH:-"{ max_size: 32, max_wait: 1ms }"}
APP_PORT=18001 PORT=18100 ADMIN=18190
W=$(mktemp -d -t outrider-inferbench.XXXXXX)
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
models:
  risk: { path: $ROOT/examples/models/risk.onnx, batch: $BATCH, threads: 1 }
routes:
  - name: risk
    match: { path: /api/predict/risk, methods: [POST] }
    upstream: app
    inference:
      model: risk
      fallback: error
      json: { extra: { model: risk, model_version: 1 }, error_code: invalid_features }
YAML
taskset -c 1 "${OUTRIDER:-$ROOT/target/release/outrider}" run --config "$W/outrider.yaml" >"$W/outrider.log" 2>&1 &
SUT_PID=$!; PIDS+=("$SUT_PID")
wait_port "http://127.0.0.1:$APP_PORT/healthz"
wait_port "http://127.0.0.1:$ADMIN/ready"

BODY='{"features": [0.35, 2.0, 0.6, 0.4]}'
post() { curl -fsS -H 'content-type: application/json' --data "$BODY" "$1"; }
# Same answer from both (within 1e-5), and the in-process one never reached the app.
python3 - "$(post "http://127.0.0.1:$PORT/api/predict/risk")" "$(post "http://127.0.0.1:$APP_PORT/api/predict/risk")" <<'PY'
import json, sys
ours, theirs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
assert ours.keys() == theirs.keys(), (ours, theirs)
assert all(abs(a - b) <= 1e-5 for a, b in zip(ours["risk"], theirs["risk"])), (ours, theirs)
print(f"# same answer: in-process {ours['risk']} app {theirs['risk']}")
PY

lua_post "$BODY" >"$W/post.lua"

echo "| scenario | req/s | p50 | p99 | CPU µs/req (answering process) |"
echo "|---|---|---|---|---|"
measure in-process "$SUT_PID" "http://127.0.0.1:$PORT/api/predict/risk" "$W/post.lua"
measure app-direct "$APP_PID" "http://127.0.0.1:$APP_PORT/api/predict/risk" "$W/post.lua"
# The floor on this host right now: nginx (one process, CPU 1 like outrider) answering the same
# POST with a fixed string of the same shape: no model, no JSON, just HTTP over loopback.
if command -v nginx >/dev/null 2>&1; then
  mkdir -p "$W/nginx"
  cat >"$W/nginx/nginx.conf" <<NGINX
master_process off; daemon off; worker_processes 1; pid $W/nginx/nginx.pid; error_log $W/nginx/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $W/nginx; proxy_temp_path $W/nginx; fastcgi_temp_path $W/nginx;
  uwsgi_temp_path $W/nginx; scgi_temp_path $W/nginx;
  server { listen 127.0.0.1:18102; default_type application/json;
    location / { return 200 '{"risk":[0.5336988568305969],"model":"risk","model_version":1}'; } }
}
NGINX
  taskset -c 1 nginx -p "$W/nginx" -e "$W/nginx/error.log" -c "$W/nginx/nginx.conf" &
  NGINX_PID=$!; PIDS+=("$NGINX_PID")
  for _ in $(seq 50); do
    curl -fsS -o /dev/null http://127.0.0.1:18102/ 2>/dev/null && break
    kill -0 "$NGINX_PID" 2>/dev/null || break
    sleep 0.1
  done
  # Only our own nginx counts (another server on the port would be measured by mistake).
  if kill -0 "$NGINX_PID" 2>/dev/null && curl -fsS -o /dev/null http://127.0.0.1:18102/ 2>/dev/null; then
    measure nginx-fixed-string "$NGINX_PID" "http://127.0.0.1:18102/api/predict/risk" "$W/post.lua"
  else
    echo "(nginx did not start on 127.0.0.1:18102: no floor row; see $W/nginx/error.log)" >&2
  fi
fi
read -r ours_rps ours_p99 ours_cpu <"$W/in-process"
read -r app_rps _ app_cpu <"$W/app-direct"
floor_p99=-
if [[ -f $W/nginx-fixed-string ]]; then read -r _ floor_p99 _ <"$W/nginx-fixed-string"; fi
python3 - "$ours_rps" "$app_rps" "$ours_cpu" "$app_cpu" "$ours_p99" "$floor_p99" <<'PY'
import re, sys
ours, app, ours_cpu, app_cpu, p99, floor = sys.argv[1:]
def ms(text):  # wrk prints 812.00us, 2.56ms, 1.02s or 1.05m
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]
print(f"# throughput in-process / app: {float(ours) / float(app):.1f}x (target >= 10x); "
      f"CPU per request app / in-process: {float(app_cpu) / max(float(ours_cpu), 1e-9):.1f}x; "
      f"in-process p99 {p99} (target <= 5ms)"
      + (f"; p99 in-process / nginx fixed string: {ms(p99) / ms(floor):.2f}x" if floor != "-" else ""))
PY
curl -fsS "http://127.0.0.1:$ADMIN/metrics" | awk '/^outrider_inference_batch_size_(sum|count)/ {v[$1]=$2} END {for (k in v) printf "# %s %s\n", k, v[k]}'

# The p99 target at a load the throughput target names: 10x the app's throughput offered open-loop
# over CONNS connections (a closed loop at CONNS connections only measures its own queue: p50 is
# CONNS / req/s by Little's law).
echo
echo "| open loop | rate asked/s | req/s | p50 | p99 | p99.9 | failed |"
echo "|---|---|---|---|---|---|---|"
rate_latency in-process-at-10x-app "http://127.0.0.1:$PORT/api/predict/risk" \
  "$(python3 -c "print(int(float('$app_rps') * 10))")" "$BODY"
