"""Summarises one overload run (scripts/bench.sh overload) from oha's JSON report: admitted (2xx)
latency percentiles, goodput, shed ratio (503/429) and the shed answers' latency, as one JSON line.
oha sent the requests open-loop (on schedule whether or not earlier ones finished, latency counted
from when each was due), so queueing anywhere shows up in the figures.

With OHA_DB (oha's --db-url: one row per answered request, timed from when it was due), also
the same figures for the steady state: requests due from STEADY_FROM seconds into the run
(default 1), after oha has opened its connections (512 in the first ~0.25 s, each one's first
request paying for the accept).

usage: overload-report.py OHA_JSON SECONDS RATE [OHA_DB [STEADY_FROM]]
"""
import json
import sqlite3
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


def steady(db_path, steady_from):
    """Admitted p95/p99 and shed p50/p99 (ms) over the requests due after `steady_from` s."""
    rows = sqlite3.connect(db_path).execute(
        "SELECT end - COALESCE(start_latency_correction, start), status FROM oha"
        " WHERE COALESCE(start_latency_correction, start) >= ?",
        (steady_from,),
    ).fetchall()
    if not rows:
        sys.exit(f"{db_path}: no requests due after {steady_from} s")

    def pct(values, p):
        values = sorted(values)
        return None if not values else round(values[min(len(values) - 1, int(p * len(values)))] * 1000, 2)

    ok = [d for d, status in rows if 200 <= status < 300]
    shed = [d for d, status in rows if status in (429, 503)]
    return {
        "from_s": steady_from,
        "admitted_p95_ms": pct(ok, 0.95),
        "admitted_p99_ms": pct(ok, 0.99),
        "shed_p50_ms": pct(shed, 0.5),
        "shed_p99_ms": pct(shed, 0.99),
        "shed_p99_9_ms": pct(shed, 0.999),
    }


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
    **({"steady": steady(sys.argv[4], float(sys.argv[5]) if len(sys.argv) > 5 else 1.0)}
       if len(sys.argv) > 4 else {}),
}))
