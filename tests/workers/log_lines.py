# Test worker: writes LINES numbered lines to stdout ("<instance> <seq> <padding>"), as fast
# as it can in blocks that end mid-line (so the relay must hold partial lines), then
# "done <instance>" and sleeps until stopped. With STDERR_EVERY=n, every n-th line goes to
# stderr instead, with a short pause, so both streams interleave in time.
import os
import sys
import time

instance = os.environ.get("BALANCER_INSTANCE", "0")
lines = int(os.environ.get("LINES", "50000"))
every = int(os.environ.get("STDERR_EVERY", "0"))
pad = "p" * 24
out = sys.stdout.buffer
block = []
for seq in range(lines):
    line = f"{instance} {seq} {pad}\n".encode()
    if every and seq % every == 0:
        out.write(b"".join(block))
        out.flush()
        block = []
        sys.stderr.write(f"err {instance} {seq}\n")
        sys.stderr.flush()
        time.sleep(0.01)
        continue
    block.append(line)
    if len(block) == 333:
        data = b"".join(block)
        # Two writes that cut a line in half.
        out.write(data[:-7])
        out.flush()
        out.write(data[-7:])
        block = []
out.write(b"".join(block))
out.write(f"done {instance}\n".encode())
out.flush()
while True:
    time.sleep(3600)
