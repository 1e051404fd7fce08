"""Reads a Prometheus exposition on stdin and prints the shed answers' latency as outrider
decided it (outrider_slo_admission_wait_seconds{outcome="shed"}) for one route, as bucket
upper bounds: the overload benchmark's server-side figure, free of the load generator's own lag.

usage: curl -s http://127.0.0.1:ADMIN/metrics | python3 scripts/shed-latency.py ROUTE
"""
import re
import sys

route = sys.argv[1]
buckets = {}
pattern = re.compile(r'^outrider_slo_admission_wait_seconds_bucket\{(.*)\} (\S+)$')
for line in sys.stdin:
    m = pattern.match(line.strip())
    if not m or 'outcome="shed"' not in m.group(1) or f'route="{route}"' not in m.group(1):
        continue
    le = re.search(r'le="([^"]+)"', m.group(1)).group(1)
    buckets[float(le)] = float(m.group(2))
total = buckets.get(float("inf"), 0)
if not total:
    print("server-side: no shed decisions")
    sys.exit(0)
ordered = sorted(buckets.items())


def quantile(q):
    return next(le for le, n in ordered if n >= q * total) * 1000


print(f"server-side: {int(total)} shed decisions, p50 <= {quantile(0.5):g} ms, "
      f"p99 <= {quantile(0.99):g} ms")
