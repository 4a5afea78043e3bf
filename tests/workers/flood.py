# Test worker: floods stdout with lines as fast as the pipe takes them, forever (or, with
# FLOOD_BYTES=n, about n bytes, then "flood done" and sleeps).
import os
import sys
import time

limit = int(os.environ.get("FLOOD_BYTES", "0"))
block = (b"flood " + b"x" * 93 + b"\n") * 2000
out = sys.stdout.buffer
written = 0
while not limit or written < limit:
    out.write(block)
    written += len(block)
out.write(b"flood done\n")
out.flush()
while True:
    time.sleep(3600)
