"""Summarises one overload run (scripts/bench.sh overload) from oha's JSON report: admitted (2xx)
latency percentiles, goodput, shed ratio (503/429) and the shed answers' latency, as one JSON line.
oha sent the requests open-loop (on schedule whether or not earlier ones finished, latency counted
from when each was due), so queueing anywhere shows up in the figures.

usage: overload-report.py OHA_JSON SECONDS RATE
"""
import json
import sys

report = json.load(open(sys.argv[1]))
seconds, rate = float(sys.argv[2]), float(sys.argv[3])
statuses = {int(k): v for k, v in report.get("statusCodeDistribution", {}).items()}
# Connection errors (oha's "aborted due to deadline" is a request cut off by the end of the run).
errors = sum(v for k, v in report.get("errorDistribution", {}).items() if "deadline" not in k)
ok = sum(v for k, v in statuses.items() if 200 <= k < 300)
shed = statuses.get(503, 0) + statuses.get(429, 0)
answered = sum(statuses.values())
# oha starts no more requests than it has connections: under a pile-up some scheduled requests
# never start. Those, and the few still in flight at the end, count as failed.
scheduled = max(round(rate * seconds), answered + errors)


def ms(table, p):
    value = report.get(table, {}).get(p)
    return None if value is None else round(value * 1000, 2)


print(json.dumps({
    "scheduled": scheduled,
    "answered": answered,
    "goodput_rps": round(ok / seconds, 1),
    "admitted_p50_ms": ms("latencyPercentilesSuccessful", "p50"),
    "admitted_p95_ms": ms("latencyPercentilesSuccessful", "p95"),
    "admitted_p99_ms": ms("latencyPercentilesSuccessful", "p99"),
    "shed_ratio": round(shed / max(scheduled, 1), 3),
    # oha times all non-2xx answers together; "other_status" says whether any were not sheds.
    "shed_p50_ms": ms("latencyPercentilesNotSuccessful", "p50"),
    "shed_p99_ms": ms("latencyPercentilesNotSuccessful", "p99"),
    "other_status": answered - ok - shed,
    "failed": scheduled - answered,
}))
