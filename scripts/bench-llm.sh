#!/usr/bin/env bash
# LLM gateway bench (called by `bash scripts/bench.sh llm`, or directly after a release build):
# a fake OpenAI provider (Python, non-streamed chat completions with usage) and the load
# generator on CPU 0, the proxy under test alone on CPU 1. Measures, with wrk, the same
# chat-completion POST (one prompt, one API key) answered from a cache:
#
#   outrider-hit   outrider (release, one thread), llm route, answer from L1
#   litellm-hit    LiteLLM's proxy (one worker) with its in-memory cache, when installed
#   provider       the fake provider directly (what a miss costs at least)
#
# and prints req/s, p50/p99 latency and CPU per request of the answering process.
# LiteLLM is not a dependency of this repository; install it apart, e.g.
#   python3 -m venv /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install litellm
# and point LITELLM at its `litellm` executable (default /tmp/litellm-venv/bin/litellm).
# Env: DURATION (s, default 8), CONNS (default 64), RATE (open-loop req/s, default 2000), LITELLM, OUTRIDER (the binary, default
# target/release/outrider).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
DURATION=${DURATION:-8} CONNS=${CONNS:-64}
LITELLM=${LITELLM:-/tmp/litellm-venv/bin/litellm}
OUTRIDER=${OUTRIDER:-$ROOT/target/release/outrider}
PROVIDER_PORT=18002 PORT=18100 ADMIN=18190 LITELLM_PORT=18110
W=$(mktemp -d -t outrider-llmbench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [[ -n $p ]] && kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
command -v wrk >/dev/null || { echo "wrk is needed (apt-get install wrk)" >&2; exit 1; }
# shellcheck source=scripts/bench-lib.sh
source "$ROOT/scripts/bench-lib.sh"

taskset -c 0 python3 - "$PROVIDER_PORT" <<'PY' &
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Provider(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.reply({"ok": True})
    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        self.reply({
            "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000,
            "model": req.get("model", "gpt-4o-mini"), "system_fingerprint": "fp_bench",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "A cached answer of modest length, as a chat model would give it.", "refusal": None},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 24, "completion_tokens": 16, "total_tokens": 40},
        })
    def reply(self, body):
        data = json.dumps(body).encode()
        # One write: no Nagle/delayed-ACK stall on keep-alive connections.
        self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data))
    def log_message(self, *args):
        pass

ThreadingHTTPServer.daemon_threads = True
# wrk resets its connections at the end of a run: not worth a traceback.
ThreadingHTTPServer.handle_error = lambda self, request, address: None
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Provider).serve_forever()
PY
PIDS+=("$!"); PROVIDER_PID=$!

cat >"$W/outrider.yaml" <<YAML
listen: 127.0.0.1:$PORT
threads: 1
admin: { listen: 127.0.0.1:$ADMIN }
upstreams:
  openai: { url: "http://127.0.0.1:$PROVIDER_PORT", timeout: 30s }
telemetry: { access_log: off }
shutdown: { grace_period: 1s }
routes:
  - name: chat
    match: { path: /v1/chat/completions, methods: [POST] }
    upstream: openai
    llm:
      provider: openai
      cache: { ttl: 1h, scope: api_key }
      pricing: { gpt-4o-mini: { input_per_mtok: 0.15, output_per_mtok: 0.60 } }
YAML
taskset -c 1 "$OUTRIDER" run --config "$W/outrider.yaml" >"$W/outrider.log" 2>&1 &
SUT_PID=$!; PIDS+=("$SUT_PID")
wait_port "http://127.0.0.1:$PROVIDER_PORT/"
wait_port "http://127.0.0.1:$ADMIN/ready"

BODY='{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"What does a sidecar cache do?"}],"temperature":0}'
KEY=sk-bench-0123456789
lua_post "$BODY" "Authorization: Bearer $KEY" >"$W/chat.lua"
chat() { curl -fsS -D - -o /dev/null -H 'content-type: application/json' -H "authorization: Bearer $KEY" --data "$BODY" "$1"; }
chat "http://127.0.0.1:$PORT/v1/chat/completions" >/dev/null
chat "http://127.0.0.1:$PORT/v1/chat/completions" | grep -qi '^x-cache-status: HIT' || { echo "outrider: not a hit" >&2; exit 1; }

echo "| scenario | req/s | p50 | p99 | CPU µs/req (answering process) |"
echo "|---|---|---|---|---|"
measure outrider-hit "$SUT_PID" "http://127.0.0.1:$PORT/v1/chat/completions" "$W/chat.lua"

if [[ -x $LITELLM ]]; then
  cat >"$W/litellm.yaml" <<YAML
model_list:
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: http://127.0.0.1:$PROVIDER_PORT/v1
      api_key: sk-provider
litellm_settings:
  cache: true
  cache_params: { type: local }
  set_verbose: false
YAML
  LITELLM_MASTER_KEY=$KEY LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_LOG=ERROR \
    taskset -c 1 "$LITELLM" --config "$W/litellm.yaml" --host 127.0.0.1 --port "$LITELLM_PORT" \
    --num_workers 1 >"$W/litellm.log" 2>&1 &
  LITELLM_PID=$!; PIDS+=("$LITELLM_PID")
  # LiteLLM imports for a while before it listens.
  for _ in $(seq 1 1200); do curl -fsS -o /dev/null "http://127.0.0.1:$LITELLM_PORT/health/liveliness" 2>/dev/null && break; sleep 0.1; done
  curl -fsS -o /dev/null "http://127.0.0.1:$LITELLM_PORT/health/liveliness" || { tail -20 "$W/litellm.log" >&2; exit 1; }
  chat "http://127.0.0.1:$LITELLM_PORT/v1/chat/completions" >/dev/null
  # LiteLLM names the cache key it answered from.
  chat "http://127.0.0.1:$LITELLM_PORT/v1/chat/completions" | grep -qi '^x-litellm-cache-key:' \
    || { echo "litellm: not a cache hit" >&2; exit 1; }
  measure litellm-hit "$LITELLM_PID" "http://127.0.0.1:$LITELLM_PORT/v1/chat/completions" "$W/chat.lua"
else
  echo "(LiteLLM not found at $LITELLM: not measured)" >&2
fi
measure provider "$PROVIDER_PID" "http://127.0.0.1:$PROVIDER_PORT/v1/chat/completions" "$W/chat.lua"

# The hit's tail at a steady load (RATE a second, open loop; the closed loop above measures its
# own queue: p50 is CONNS / req/s).
echo
echo "| open loop | rate asked/s | req/s | p50 | p99 | p99.9 | failed |"
echo "|---|---|---|---|---|---|---|"
rate_latency outrider-hit "http://127.0.0.1:$PORT/v1/chat/completions" "${RATE:-2000}" "$BODY" \
  "authorization: Bearer $KEY"

# The hit's own latency: one client sending one request at a time (no queue to wait in, and no
# open-loop timer whose ~1 ms granularity would be counted as latency); LiteLLM likewise.
echo
echo "| one connection, closed loop | req/s | p50 | p99 | CPU µs/req |"
echo "|---|---|---|---|---|"
CONNS=1 measure outrider-hit-1conn "$SUT_PID" "http://127.0.0.1:$PORT/v1/chat/completions" "$W/chat.lua"
if [[ -n ${LITELLM_PID:-} ]]; then
  CONNS=1 measure litellm-hit-1conn "$LITELLM_PID" "http://127.0.0.1:$LITELLM_PORT/v1/chat/completions" "$W/chat.lua"
fi
