"""Open-loop load for the overload benchmark (scripts/bench.sh overload).

Sends GET requests at a fixed rate (new requests start on schedule whether or not earlier ones
have finished, as real traffic does) over a pool of keep-alive connections, for a fixed time,
and prints one JSON line: admitted (2xx) latency percentiles, goodput, shed ratio (503/429) and
the shed answers' latency. Stops by itself; only talks to the given loopback port.

usage: overload.py PORT PATH RATE SECONDS [CONNECTIONS]
"""
import asyncio
import json
import sys
import time


async def one(pool, host, port, path, results):
    started = time.perf_counter()
    try:
        reader, writer = pool.pop() if pool else await asyncio.open_connection(host, port)
    except OSError:
        results.append((0, time.perf_counter() - started))
        return
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        status_line = await reader.readline()
        status = int(status_line.split()[1])
        length, close = 0, False
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value.strip())
            elif name.lower() == "connection" and "close" in value.lower():
                close = True
        await reader.readexactly(length)
        results.append((status, time.perf_counter() - started))
        if close:
            writer.close()
        else:
            pool.append((reader, writer))
    except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
        results.append((0, time.perf_counter() - started))
        writer.close()


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))] * 1000


async def main():
    port, path, rate, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    host = "127.0.0.1"
    pool, results, tasks = [], [], set()
    interval = 1.0 / rate
    start = time.perf_counter()
    sent = 0
    while time.perf_counter() - start < seconds:
        due = start + sent * interval
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(pool, host, port, path, results))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        sent += 1
    # Bounded drain: whatever has not answered 10 s after the last send counts as failed.
    if tasks:
        await asyncio.wait(tasks, timeout=10)
    elapsed = time.perf_counter() - start
    ok = [t for s, t in results if 200 <= s < 300]
    shed = [t for s, t in results if s in (503, 429)]
    print(json.dumps({
        "sent": sent,
        "answered": len(results),
        "goodput_rps": round(len(ok) / seconds, 1),
        "offered_rps": round(sent / seconds, 1),
        "admitted_p50_ms": percentile(ok, 50),
        "admitted_p95_ms": percentile(ok, 95),
        "admitted_p99_ms": percentile(ok, 99),
        "shed_ratio": round(len(shed) / max(sent, 1), 3),
        "shed_p99_ms": percentile(shed, 99),
        "failed": sent - len(ok) - len(shed),
        "elapsed_s": round(elapsed, 1),
    }))


asyncio.run(main())
