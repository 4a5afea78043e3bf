#!/usr/bin/env python3
"""A small TCP load: CONCURRENCY threads open fresh connections to HOST:PORT for SECONDS,
each reading the one-line greeting (tests/workers/pid_server.js) then closing. Prints
requests/s, failures and latency percentiles (ms) as one line."""
import socket
import sys
import threading
import time

host, port = sys.argv[1].rsplit(":", 1)
seconds = float(sys.argv[2])
concurrency = int(sys.argv[3]) if len(sys.argv) > 3 else 4
stop = time.monotonic() + seconds
latencies = []
failures = [0]
lock = threading.Lock()


def client():
    mine = []
    failed = 0
    while time.monotonic() < stop:
        start = time.monotonic()
        try:
            with socket.create_connection((host, int(port)), timeout=5) as s:
                if not s.recv(64).endswith(b"\n"):
                    raise OSError("no greeting")
            mine.append(time.monotonic() - start)
        except OSError:
            failed += 1
    with lock:
        latencies.extend(mine)
        failures[0] += failed


threads = [threading.Thread(target=client) for _ in range(concurrency)]
for t in threads:
    t.start()
for t in threads:
    t.join()
latencies.sort()
n = len(latencies)


def pct(p):
    return latencies[min(n - 1, int(n * p))] * 1e3 if n else float("nan")


print(f"{n / seconds:.0f} req/s, {failures[0]} failed, p50 {pct(0.5):.2f} ms, "
      f"p99 {pct(0.99):.2f} ms, max {pct(1.0):.2f} ms ({n} requests)")
