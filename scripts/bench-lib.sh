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
# "req/s p99 cpu_us" in $W/<name> for the script's ratios.
measure() { # name pid url [lua]
  local name=$1 pid=$2 url=$3 script=${4:-} before after out reqs rps p50 p99 cpu
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
