# Test worker: floods stdout with 100-byte lines as fast as the pipe takes them, forever.
# Optional env: FLOOD_BYTES=n stops after about n bytes ("flood done", then sleeps);
# FLOOD_MBPS=r paces the flood to about r MB/s (a heavy but ordinary logger).
import os
import sys
import time

limit = int(os.environ.get("FLOOD_BYTES", "0"))
rate = float(os.environ.get("FLOOD_MBPS", "0")) * 1e6
block = (b"flood " + b"x" * 93 + b"\n") * 2000
out = sys.stdout.buffer
written = 0
start = time.monotonic()
while not limit or written < limit:
    out.write(block)
    written += len(block)
    if rate:
        ahead = written / rate - (time.monotonic() - start)
        if ahead > 0:
            out.flush()
            time.sleep(ahead)
out.write(b"flood done\n")
out.flush()
while True:
    time.sleep(3600)
