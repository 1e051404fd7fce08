# Helpers shared by the end-to-end bench scripts (sourced, not run). Needs $CONNS and $DURATION.

# Waits until a URL answers (up to 30 s).
wait_port() { for _ in $(seq 1 300); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "nothing at $1" >&2; exit 1; }

# A wrk script that POSTs a JSON body, with extra "Name: value" headers.
lua_post() { # body [header...]
  python3 -c '
import json, sys
lines = ["wrk.method = \"POST\"", "wrk.headers[\"Content-Type\"] = \"application/json\""]
for h in sys.argv[2:]:
    name, _, value = h.partition(":")
    lines.append("wrk.headers[%s] = %s" % (json.dumps(name.strip()), json.dumps(value.strip())))
lines.append("wrk.body = " + json.dumps(sys.argv[1]))
print("\n".join(lines))' "$@"
}

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)

# One wrk run on CPU 0 against url; prints a table row: req/s, p50, p99 and the CPU per request
# of the process that answered (from /proc/<pid>/stat before and after). With $W set, also leaves
# "req/s p99 cpu_us" in $W/<name> for the script's ratios. With $WARMUP (seconds) set, the same
# load runs that long first, uncounted (first-run costs: allocator pages, lazy set-up, accepts);
# bench-inference.sh sets it (default 2), the other scripts only when WARMUP is in their env.
measure() { # name pid url [lua]
  local name=$1 pid=$2 url=$3 script=${4:-} before after out reqs rps p50 p99 cpu
  if [[ ${WARMUP:-0} != 0 ]]; then
    taskset -c 0 wrk -t1 -c"$CONNS" -d"${WARMUP}s" ${script:+-s "$script"} "$url" >/dev/null
  fi
  before=$(ticks "$pid")
  out=$(taskset -c 0 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency ${script:+-s "$script"} "$url")
  after=$(ticks "$pid")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  if grep -q "Non-2xx" <<<"$out"; then echo "$name: non-2xx answers" >&2; grep "Non-2xx" <<<"$out" >&2; fi
  cpu=$(python3 -c "print(round(($after - $before) / $HZ * 1e6 / max(1, $reqs), 2))")
  printf '| %s | %s | %s | %s | %s |\n' "$name" "$rps" "$p50" "$p99" "$cpu"
  if [[ -n ${W:-} ]]; then echo "$rps $p99 $cpu" >"$W/$name"; fi
}

# Open-loop latency: requests sent on a fixed schedule (RATE a second over CONNS connections,
# corrected for coordinated omission) by oha on CPU 0, so the tail is the server's, not the
# queue a closed loop builds. Prints a row: rate asked, req/s got, p50, p99, p99.9, non-2xx.
# Needs oha (`cargo install oha`); without it, says so and prints nothing.
rate_latency() { # name url rate [json-body [header...]]
  local name=$1 url=$2 rate=$3 body=${4:-} oha args=()
  oha=$(command -v oha || echo "${OHA:-/work/tools/bin/oha}")
  if [[ ! -x $oha ]]; then echo "(oha not installed: open-loop latency of $name not measured)" >&2; return 0; fi
  if [[ -n $body ]]; then args+=(-m POST -H "content-type: application/json" -d "$body"); fi
  for h in "${@:5}"; do args+=(-H "$h"); done
  taskset -c 0 "$oha" -z "${DURATION}s" -c "$CONNS" -q "$rate" --latency-correction --no-tui \
    --output-format json "${args[@]}" "$url" >"${W:-/tmp}/oha-$name.json"
  python3 - "$name" "$rate" "${W:-/tmp}/oha-$name.json" <<'PY'
import json, sys
name, rate, path = sys.argv[1:]
r = json.load(open(path))
p = r["latencyPercentiles"]
ok = sum(v for k, v in r.get("statusCodeDistribution", {}).items() if k.startswith("2"))
# Requests still in flight when the run's time is up are aborted by oha: not failures.
errors = sum(v for k, v in r.get("errorDistribution", {}).items() if "deadline" not in k)
total = sum(r.get("statusCodeDistribution", {}).values()) + errors
ms = lambda v: f"{v * 1000:.2f} ms" if v is not None else "-"
print(f"| {name} | {rate} | {r['summary']['requestsPerSec']:.0f} | {ms(p.get('p50'))} | {ms(p.get('p99'))} | {ms(p.get('p99.9'))} | {total - ok} |")
PY
}
