#!/usr/bin/env python3
"""A small TCP load: CONCURRENCY client processes (not threads: no GIL between them) open
fresh connections to HOST:PORT for SECONDS, each reading the one-line greeting
(tests/workers/pid_server.js) then closing. Prints requests/s, failures and latency
percentiles (ms) as one line."""
import multiprocessing
import socket
import sys
import time


def client(args):
    host, port, stop = args
    latencies = []
    failed = 0
    while time.time() < stop:
        start = time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                if not s.recv(64).endswith(b"\n"):
                    raise OSError("no greeting")
            latencies.append(time.monotonic() - start)
        except OSError:
            failed += 1
    return latencies, failed


if __name__ == "__main__":
    host, port = sys.argv[1].rsplit(":", 1)
    seconds = float(sys.argv[2])
    concurrency = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    stop = time.time() + seconds
    with multiprocessing.Pool(concurrency) as pool:
        results = pool.map(client, [(host, int(port), stop)] * concurrency)
    latencies = sorted(l for r in results for l in r[0])
    failures = sum(r[1] for r in results)
    n = len(latencies)

    def pct(p):
        return latencies[min(n - 1, int(n * p))] * 1e3 if n else float("nan")

    print(f"{n / seconds:.0f} req/s, {failures} failed, p50 {pct(0.5):.2f} ms, "
          f"p99 {pct(0.99):.2f} ms, max {pct(1.0):.2f} ms ({n} requests)")
