"""Test worker: a TCP server on 127.0.0.1:$PORT (greets with its pid) that starts one child
process; the child holds 64 MiB of written memory and keeps a CPU busy about half the time, so
a process-tree sampler sees far more than the main pid alone. The child exits when its parent
is gone."""
import os
import socket
import subprocess
import sys
import time

CHILD = r"""
import os, sys, time
parent = int(sys.argv[1])
hoard = b"x" * (64 * 1024 * 1024)
while os.getppid() == parent:
    end = time.monotonic() + 0.05
    while time.monotonic() < end:
        pass
    time.sleep(0.05)
"""

subprocess.Popen([sys.executable, "-c", CHILD, str(os.getpid())])
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(os.environ["PORT"])))
listener.listen(64)
while True:
    conn, _ = listener.accept()
    try:
        conn.sendall(f"{os.getpid()}\n".encode())
    finally:
        conn.close()
