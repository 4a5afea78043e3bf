"""A worker that records how it was started, for the PM2 flag tests.

Each start appends one JSON line to `record.jsonl` in its working directory (time, argv,
cwd, interpreter flags, a few environment variables), writes one line to stdout and one to
stderr, then does what its first argument says:
  sleep    sleep until stopped
  stubborn ignore SIGTERM and sleep (to measure kill_timeout)
  crash    exit 3 at once
  listen P bind 127.0.0.1:P itself (PM2's fork mode) and answer "fork <pid>" to each client
On SIGUSR2 it appends {"signal": "USR2", "pid": …} to the same file (for `send-signal`).
"""
import json
import os
import signal
import socket
import sys
import time

mode = sys.argv[1] if len(sys.argv) > 1 else "sleep"

def on_usr2(_signum, _frame):
    with open(os.path.join(os.getcwd(), "record.jsonl"), "a", encoding="utf-8") as out:
        out.write(json.dumps({"signal": "USR2", "pid": os.getpid()}) + "\n")


signal.signal(signal.SIGUSR2, on_usr2)

# Written once the handler is in place: a test that saw this line may signal.
with open(os.path.join(os.getcwd(), "record.jsonl"), "a", encoding="utf-8") as f:
    f.write(json.dumps({
        "t": time.time(),
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "dev_mode": bool(sys.flags.dev_mode),
        "app": os.environ.get("BALANCER_APP"),
        "stage": os.environ.get("STAGE"),
        "port": os.environ.get("PORT"),
    }) + "\n")

print(f"out line from {os.getpid()}", flush=True)
print(f"err line from {os.getpid()}", file=sys.stderr, flush=True)

if mode == "crash":
    sys.exit(3)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode == "listen":
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", int(sys.argv[2])))
    server.listen(16)
    while True:
        conn, _ = server.accept()
        conn.sendall(f"fork {os.getpid()}\n".encode())
        conn.close()
while True:
    time.sleep(1000)
