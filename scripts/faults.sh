#!/usr/bin/env bash
# Fault suite: each scenario runs outrider (release build) under load on loopback for a bounded
# time while a fault is injected, and prints one table row:
#   scenario | requests | failed | p99 ms | RSS before/after MB
# Not a test (timings are the machine's); the latest table is in docs/operations.md.
#
#   bash scripts/faults.sh [scenario...]      (default: all)
#
# Scenarios: baseline redis-kill redis-pause backend-kill origin-close reloads sigterm
#            slow-drip big-heads soak
# Env: DURATION (seconds of load per scenario, default 10), CONNS (default 32),
#      SOAK_SECONDS (default 60; 1800 for the 30-minute soak; its RSS "before" is taken after a
#      warm-up of a tenth of it), OUTRIDER_BIN (a built binary
#      to use instead of building target/release/outrider).
# Needs wrk, nginx, redis-server (installed from Debian when missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
DURATION=${DURATION:-10}
CONNS=${CONNS:-32}
SOAK_SECONDS=${SOAK_SECONDS:-60}
SCENARIOS=("$@")
[[ ${#SCENARIOS[@]} -eq 0 ]] && SCENARIOS=(baseline redis-kill redis-pause backend-kill origin-close reloads sigterm slow-drip big-heads soak)

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || need+=(nginx)
command -v redis-server >/dev/null || need+=(redis-server)
if [[ ${#need[@]} -gt 0 ]]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
scripts/setup-debian.sh
if [[ -z ${OUTRIDER_BIN:-} ]]; then
  cargo build --release --bin outrider >/dev/null
fi
BIN=${OUTRIDER_BIN:-$ROOT/target/release/outrider}

W=$(mktemp -d -t outrider-faults.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [[ -n $p ]] && kill -9 "$p" 2>/dev/null || true; done
  # Processes restarted inside a scenario's subshell are found by what they serve.
  pkill -9 -f "redis-server 127.0.0.1:$REDIS" 2>/dev/null || true
  pkill -9 -f "nginx -c $W/nginx/nginx.conf" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port) ADMIN=$(free_port) BACKEND=$(free_port) REDIS=$(free_port)

start_backend() { # a fixed ~1 KB JSON answer, like bench.sh's
  mkdir -p "$W/nginx"
  cat >"$W/nginx/nginx.conf" <<EOF
daemon off; master_process off; worker_processes 1; pid $W/nginx/nginx.pid; error_log $W/nginx/error.log;
events { worker_connections 4096; }
http { access_log off;
  server { listen 127.0.0.1:$BACKEND; keepalive_requests 100000;
    location / { default_type application/json; return 200 '{"ok":true,"pad":"$(head -c 900 /dev/zero | tr '\0' x)"}'; } } }
EOF
  nginx -c "$W/nginx/nginx.conf" -p "$W/nginx" &
  wait_port "$BACKEND"
}
stop_backend() {
  pkill -9 -f "nginx -c $W/nginx/nginx.conf" 2>/dev/null || true
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$BACKEND") 2>/dev/null || return 0; sleep 0.05; done
}

start_redis() {
  redis-server --port "$REDIS" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
  wait_port "$REDIS"
}
redis_pid() { pgrep -f "redis-server 127.0.0.1:$REDIS" | head -1; }

start_closer() { # accepts and closes without answering
  python3 - "$BACKEND" <<'EOF' &
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(1024)
while True:
    c, _ = s.accept(); c.close()
EOF
  wait_port "$BACKEND"
}

wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }

write_config() { # $1: extra route cache options
  cat >"$W/outrider.yaml" <<EOF
listen: 127.0.0.1:$PORT
admin: { listen: 127.0.0.1:$ADMIN }
threads: 1
upstreams:
  app: { url: "http://127.0.0.1:$BACKEND", connect_timeout: 200ms, timeout: 2s }
cache:
  redis: { url: "redis://127.0.0.1:$REDIS", timeout: 50ms }
telemetry: { access_log: off }
shutdown: { grace_period: 10s, ready_delay: 3s }
routes:
  - name: items
    match: { path_prefix: /api/items }
    upstream: app
    cache: { ttl: 1s, stale_if_error: 1h }
  - name: pass
    match: { path_prefix: / }
    upstream: app
EOF
}

start_outrider() {
  "$BIN" run --config "$W/outrider.yaml" >"$W/outrider.log" 2>&1 &
  OUTRIDER_PID=$!; PIDS+=("$OUTRIDER_PID")
  for _ in $(seq 200); do curl -fs "http://127.0.0.1:$ADMIN/ready" >/dev/null && return 0; sleep 0.05; done
  echo "outrider did not become ready" >&2; cat "$W/outrider.log" >&2; return 1
}
stop_outrider() { kill -9 "$OUTRIDER_PID" 2>/dev/null || true; wait "$OUTRIDER_PID" 2>/dev/null || true; }
rss_mb() { awk '/VmRSS/ {printf "%.0f", $2/1024}' "/proc/$1/status" 2>/dev/null || echo "-"; }

# load PATH SECONDS -> runs wrk, leaves its output in $W/wrk.txt
load() { wrk -t2 -c"$CONNS" -d"${2}s" --latency "http://127.0.0.1:$PORT$1" >"$W/wrk.txt" 2>&1 || true; }
row() { # scenario rss_before rss_after
  python3 - "$1" "$2" "$3" "$W/wrk.txt" <<'EOF'
import re, sys
name, before, after, path = sys.argv[1:5]
t = open(path).read()
req = re.search(r"(\d+) requests in", t)
non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)
p99 = re.search(r"\s99%\s+([\d.]+)(us|ms|s)", t)
failed = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0)
ms = "-"
if p99:
    v, u = float(p99.group(1)), p99.group(2)
    ms = f"{v / 1000 if u == 'us' else v * 1000 if u == 's' else v:.2f}"
print(f"| {name} | {req.group(1) if req else '-'} | {failed} | {ms} | {before} / {after} |")
EOF
}

echo "| scenario | requests | failed | p99 ms | RSS before/after MB |"
echo "|---|---|---|---|---|"
start_backend
start_redis
write_config
for scenario in "${SCENARIOS[@]}"; do
  start_outrider
  curl -fs "http://127.0.0.1:$PORT/api/items/1" >/dev/null
  before=$(rss_mb "$OUTRIDER_PID")
  case $scenario in
    baseline) load /api/items/1 "$DURATION" ;;
    redis-kill)
      ( sleep 3; kill -9 "$(redis_pid)"; sleep 3; start_redis ) & f=$!
      load /api/items/1 "$DURATION"; wait $f || true ;;
    redis-pause)
      ( sleep 3; kill -STOP "$(redis_pid)"; sleep 3; kill -CONT "$(redis_pid)" ) & f=$!
      load /api/items/1 "$DURATION"; wait $f || true ;;
    backend-kill) # the cached route serves stale while the app is gone
      ( sleep 3; stop_backend; sleep 3; start_backend ) & f=$!
      load /api/items/1 "$DURATION"; wait $f || true ;;
    origin-close) # the app accepts and closes without answering: stale stands in for it
      ( sleep 3; stop_backend; start_closer; closer=$!; sleep 3; kill -9 "$closer" || true; wait "$closer" 2>/dev/null || true; start_backend ) & f=$!
      load /api/items/1 "$DURATION"; wait $f || true ;;
    reloads) # 1000 reloads, alternating a valid and an invalid file
      cp "$W/outrider.yaml" "$W/good.yaml"; sed 's/ttl: 1s/ttl: nonsense/' "$W/good.yaml" >"$W/bad.yaml"
      ( for i in $(seq 500); do
          cp "$W/bad.yaml" "$W/outrider.yaml"; curl -s -XPOST "http://127.0.0.1:$ADMIN/reload" >/dev/null
          cp "$W/good.yaml" "$W/outrider.yaml"; curl -s -XPOST "http://127.0.0.1:$ADMIN/reload" >/dev/null
        done ) & f=$!
      load /pass/1 "$DURATION"; wait $f || true; cp "$W/good.yaml" "$W/outrider.yaml" ;;
    sigterm) # SIGTERM at 2 s; the load ends within the 3 s ready delay, as a balancer's would
      ( sleep 2; kill -TERM "$OUTRIDER_PID" ) & f=$!
      load /pass/1 4; wait $f || true ;;
    slow-drip) # 500 connections dripping a header byte a second next to normal traffic
      python3 - "$PORT" "$DURATION" <<'EOF' & f=$!
import asyncio, sys
port, seconds = int(sys.argv[1]), int(sys.argv[2])
async def drip():
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /pass/slow HTTP/1.1\r\nHost: x\r\n")
        for _ in range(seconds + 2):
            await asyncio.sleep(1); w.write(b"X-Drip: 1\r\n"); await w.drain()
    except Exception:
        pass
async def main():
    await asyncio.gather(*(drip() for _ in range(500)))
asyncio.run(main())
EOF
      sleep 1; load /pass/1 "$DURATION"; wait $f || true ;;
    big-heads) # 400 connections at a time each sending a 960 KiB head (431 past limits.max_header_size)
      python3 - "$PORT" "$DURATION" <<'EOF' & f=$!
import socket, sys, threading, time
port, seconds = int(sys.argv[1]), int(sys.argv[2])
head = b"GET /pass/big HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (960 * 1024) + b"\r\n\r\n"
def one():
    try:
        s = socket.create_connection(("127.0.0.1", port)); s.settimeout(10)
        s.sendall(head); s.recv(64)
    except Exception:
        pass
end = time.time() + seconds
while time.time() < end:
    ts = [threading.Thread(target=one) for _ in range(400)]
    [t.start() for t in ts]; [t.join() for t in ts]
EOF
      sleep 1; load /pass/1 "$DURATION"; wait $f || true ;;
    soak) # 10 000 cached keys (1 s TTL: refreshed all the time) and pass-through paths; RSS is
          # sampled after a warm-up (a tenth of the run) and at the end: growth <= 5 % is the aim.
      cat >"$W/soak.lua" <<'EOF'
request = function()
  local n = math.random(1, 10000)
  if n % 4 == 0 then return wrk.format("GET", "/pass/" .. n) end
  return wrk.format("GET", "/api/items/" .. n)
end
EOF
      warm=$(( SOAK_SECONDS / 10 > 0 ? SOAK_SECONDS / 10 : 1 ))
      wrk -t2 -c"$CONNS" -d"${warm}s" -s "$W/soak.lua" "http://127.0.0.1:$PORT" >/dev/null 2>&1 || true
      before=$(rss_mb "$OUTRIDER_PID")
      left=$(( SOAK_SECONDS - warm ))
      wrk -t2 -c"$CONNS" -d"${left}s" --latency -s "$W/soak.lua" "http://127.0.0.1:$PORT" >"$W/wrk.txt" 2>&1 &
      soak_wrk=$!
      # RSS over the run (to stderr): a plateau is warm-up, a steady climb is a leak.
      samples=("$before")
      step=$(( left / 6 > 0 ? left / 6 : 1 ))
      for _ in 1 2 3 4 5; do sleep "$step"; samples+=("$(rss_mb "$OUTRIDER_PID")"); done
      wait "$soak_wrk" || true
      echo "soak RSS MB every ${step}s after the warm-up: ${samples[*]} $(rss_mb "$OUTRIDER_PID")" >&2 ;;
    *) echo "unknown scenario $scenario" >&2; exit 2 ;;
  esac
  after=$(rss_mb "$OUTRIDER_PID")
  row "$scenario" "$before" "$after"
  stop_outrider
done
