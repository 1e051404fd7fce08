#!/usr/bin/env bash
# Runs the public HTTP caching test suite (github.com/http-tests/cache-tests, the suite behind
# cache-tests.fyi) against outrider, nginx and Varnish in one run and prints
#
#   implementation | passed / 265 | required failures
#
# counted as cache-tests.fyi counts: a test whose `depends_on` prerequisite did not pass is not
# counted, informational `check` tests and browser-only tests are excluded (265 remain), and a
# "required failure" is a failed test of kind `required` (or no kind). Setup failures (the
# harness could not talk to its origin through the cache) are shown in brackets.
#
# nginx and Varnish are configured as the suite's docker image configures them for
# cache-tests.fyi (docker/nginx/nginx.conf; varnishd with the stock VCL and
# `-p default_ttl=0 -p default_grace=0 -p default_keep=3600`).
#
# Usage: scripts/cache-conformance.sh [debug|release]    (default: debug; builds the binary)
# Env:   SUITE   the suite's source: a git dir (bare or not) or a checked-out directory
#                (default /work/.mirror/http-tests+cache-tests/repo)
#        ONLY    run only these implementations (space separated: outrider nginx varnish)
#        ID      run one test by id against each implementation and print its dump
#        KEEP    keep the temp dir (results JSON, logs) and print its path
#        OUTRIDER_BIN  an outrider binary to test instead of building one
#        ROUTE_CACHE   the route's `cache:` block (flow YAML) instead of the default below
#        VERBOSE=1     also list optional failures and tests not counted
#
# Needs node >= 20 and npm (with registry access: the suite's dependencies are installed with
# `npm install`), nginx and varnishd. Uses only ports 18400-18409. Not part of CI (network).
set -euo pipefail

PROFILE=${1:-debug}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SUITE=${SUITE:-/work/.mirror/http-tests+cache-tests/repo}
ONLY=${ONLY:-outrider nginx varnish}
# The route's cache block: origin freshness only, RFC 9111's heuristic, revalidation.
ROUTE_CACHE=${ROUTE_CACHE:-"{ respect_origin: true, ttl: 1s, heuristic: last_modified, cdn_cache_control: true, origin_stale: true, vary: match, client_directives: honour }"}
ORIGIN_PORT=18400
OUTRIDER_PORT=18401
ADMIN_PORT=18402
NGINX_PORT=18403
VARNISH_PORT=18404

case $PROFILE in
  debug | release) ;;
  *) echo "usage: $0 [debug|release]" >&2; exit 2 ;;
esac
if [[ -n ${OUTRIDER_BIN:-} ]]; then
  BIN=$OUTRIDER_BIN
else
  flag=()
  [[ $PROFILE == release ]] && flag=(--release)
  cargo build --quiet "${flag[@]}" --bin outrider --manifest-path "$ROOT/Cargo.toml"
  BIN="$ROOT/target/$PROFILE/outrider"
fi

WORK=$(mktemp -d -t cache-conformance.XXXXXX)
# nginx workers and varnishd drop privileges: they must reach their files.
chmod 755 "$WORK"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  [[ -f $WORK/varnish.pid ]] && kill "$(cat "$WORK/varnish.pid")" 2>/dev/null || true
  if [[ -n ${KEEP:-} ]]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# The suite, with its dependencies.
mkdir -p "$WORK/suite"
if [[ -d $SUITE/tests && -f $SUITE/package.json ]]; then
  cp -r "$SUITE/." "$WORK/suite/"
else
  git --git-dir="$SUITE" archive HEAD | tar -x -C "$WORK/suite"
fi
(cd "$WORK/suite" && npm install --omit=dev --no-audit --no-fund --loglevel=error >"$WORK/npm.log" 2>&1) ||
  { cat "$WORK/npm.log" >&2; exit 1; }
SUITE_REV=$(git --git-dir="$SUITE" rev-parse --short HEAD 2>/dev/null || echo unknown)

wait_port() { # port
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2
  return 1
}

# The suite's origin server.
(cd "$WORK/suite" && npm_config_protocol=http npm_config_port=$ORIGIN_PORT \
  npm_config_pidfile="$WORK/origin.pid" exec node test-engine/server/server.mjs) \
  >"$WORK/origin.log" 2>&1 &
PIDS+=($!)
wait_port $ORIGIN_PORT

start_outrider() {
  cat >"$WORK/outrider.yaml" <<YAML
listen: 127.0.0.1:$OUTRIDER_PORT
admin: { listen: 127.0.0.1:$ADMIN_PORT }
upstreams:
  origin: { url: "http://127.0.0.1:$ORIGIN_PORT", timeout: 30s }
cache:
  memory: { max_size: 64MiB }
telemetry: { access_log: off }
shutdown: { grace_period: 1s }
routes:
  - name: all
    match: { path_prefix: / }
    upstream: origin
    cache: $ROUTE_CACHE
YAML
  "$BIN" run --config "$WORK/outrider.yaml" >"$WORK/outrider.log" 2>&1 &
  PIDS+=($!)
  wait_port $OUTRIDER_PORT
}

start_nginx() {
  mkdir -p "$WORK/nginx/cache/tmp" "$WORK/nginx/logs"
  chmod -R a+rwx "$WORK/nginx"
  # docker/nginx/nginx.conf of the suite, in a minimal main context.
  cat >"$WORK/nginx/nginx.conf" <<NGINX
daemon off;
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/tmp-body;
    proxy_cache_path  $WORK/nginx/cache levels=1:2 keys_zone=my-cache:8m max_size=1000m inactive=600m;
    proxy_temp_path $WORK/nginx/cache/tmp;
    server {
        listen       127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://127.0.0.1:$ORIGIN_PORT;
            proxy_cache my-cache;
            proxy_cache_revalidate on;
            proxy_http_version 1.1;
        }
    }
}
NGINX
  nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" >"$WORK/nginx.log" 2>&1 &
  PIDS+=($!)
  wait_port $NGINX_PORT
}

start_varnish() {
  mkdir -p "$WORK/varnish"
  chmod 755 "$WORK/varnish"
  # The stock VCL with the origin's address (the suite's docker/setup.sh edits the port).
  cat >"$WORK/varnish/default.vcl" <<VCL
vcl 4.1;
backend default {
    .host = "127.0.0.1";
    .port = "$ORIGIN_PORT";
}
VCL
  varnishd -n "$WORK/varnish/work" -P "$WORK/varnish.pid" -a "127.0.0.1:$VARNISH_PORT" \
    -f "$WORK/varnish/default.vcl" -p default_ttl=0 -p default_grace=0 -p default_keep=3600 \
    -s malloc,64M >"$WORK/varnish.log" 2>&1
  wait_port $VARNISH_PORT
}

run_suite() { # name port
  (cd "$WORK/suite" && npm_config_base="http://127.0.0.1:$2" npm_config_id="${ID:-}" npm_package_config_id="" \
    node --no-warnings test-engine/cli.mjs) >"$WORK/$1.json" 2>"$WORK/$1.err" ||
    { echo "$1: the suite's CLI failed:" >&2; cat "$WORK/$1.err" >&2; return 1; }
}

# Counts as cache-tests.fyi does, with the suite's own result logic.
cat >"$WORK/suite/summarise.mjs" <<'JS'
import { readFileSync } from 'node:fs'
import tests from './tests/index.mjs'
import { determineTestResult, resultTypes } from './test-engine/lib/results.mjs'
const counted = []
for (const s of tests) for (const t of s.tests) if (!t.browser_only && t.kind !== 'check') counted.push(t)
const verbose = process.env.VERBOSE === '1'
console.log(`| implementation | passed / ${counted.length} | required failures (⛔) |`)
console.log('|---|---|---|')
const details = []
for (const arg of process.argv.slice(2)) {
  const [name, file] = arg.split('=')
  const results = JSON.parse(readFileSync(file, 'utf8'))
  let pass = 0; let fail = 0; let setup = 0
  const failed = []; const optional = []; const blocked = []
  for (const t of counted) {
    const r = determineTestResult(tests, t.id, results)
    if (r === resultTypes.pass) pass++
    else if (r === resultTypes.fail) { fail++; failed.push(t.id) }
    else if (r === resultTypes.optional_fail) optional.push(t.id)
    else if (r === resultTypes.dependency_fail) blocked.push(t.id)
    else if (r !== resultTypes.untested) { setup++; failed.push(`${t.id} (setup)`) }
  }
  console.log(`| ${name} | ${pass} | ${fail}${setup ? ` (+${setup} setup)` : ''} |`)
  details.push(`${name}: required failures: ${failed.join(' ') || 'none'}`)
  if (verbose) {
    details.push(`${name}: optional failures: ${optional.join(' ')}`)
    details.push(`${name}: not counted (prerequisite failed): ${blocked.join(' ')}`)
  }
}
console.log('')
for (const d of details) console.log(d)
JS

ARGS=()
for impl in $ONLY; do
  case $impl in
    outrider) start_outrider; run_suite outrider $OUTRIDER_PORT ;;
    nginx) start_nginx; run_suite nginx $NGINX_PORT ;;
    varnish) start_varnish; run_suite "varnish" $VARNISH_PORT ;;
    *) echo "unknown implementation $impl" >&2; exit 2 ;;
  esac
  ARGS+=("$impl=$WORK/$impl.json")
done

if [[ -n ${ID:-} ]]; then
  for impl in $ONLY; do echo "=== $impl"; cat "$WORK/$impl.json"; done
  exit 0
fi
echo "cache-tests $SUITE_REV; outrider $(git -C "$ROOT" rev-parse --short HEAD) ($PROFILE);" \
  "$(nginx -v 2>&1 | sed 's/.*: //'); $(varnishd -V 2>&1 | head -1 | sed 's/ (.*//')"
(cd "$WORK/suite" && node --no-warnings summarise.mjs "${ARGS[@]}")
