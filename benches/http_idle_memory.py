#!/usr/bin/env python3
import os, socket, subprocess, sys, time, tempfile
# Master RSS growth per idle http:// keep-alive connection, after REQUESTS requests on each
# (default 1; from 3, a connection has moved to an io_uring ring where the kernel has them)
# (by hand; not part of CI):  benches/http_idle_memory.py path/to/balancer 3000 [REQUESTS]
# Needs node and the peers harness copied to /tmp/peers (its app.js is the worker).
bin, n = sys.argv[1], int(sys.argv[2])
requests = int(sys.argv[3]) if len(sys.argv) > 3 else 1
home = tempfile.mkdtemp()
port = 8690 + (os.getpid() % 200)
open(f"{home}/balancer.toml", "w").write(f'''[[app]]
name = "lb"
command = ["node", "/tmp/peers/app.js"]
instances = 2
listen = ["http://127.0.0.1:{port}"]
''')
env = dict(os.environ, BALANCER_HOME=home)
p = subprocess.Popen([bin, "run", f"{home}/balancer.toml"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
def rss():
    for line in open(f"/proc/{p.pid}/status"):
        if line.startswith("VmRSS"): return int(line.split()[1])
try:
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close(); break
        except OSError: time.sleep(0.1)
    time.sleep(2)
    def one(s):
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = b""
        while b"\r\n\r\n" not in buf: buf += s.recv(4096)
        head, rest = buf.split(b"\r\n\r\n", 1)
        cl = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0]
        while len(rest) < cl: rest += s.recv(4096)
    warm = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
    for s in warm:
        for _ in range(requests): one(s)
    for s in warm: s.close()
    time.sleep(1)
    before = rss()
    conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    for s in conns:
        for _ in range(requests): one(s)
    time.sleep(1)
    after = rss()
    print(f"{os.path.basename(bin)}: {n} idle keep-alive connections after {requests} requests each: RSS {before} -> {after} KiB, {(after-before)/n:.2f} KiB per connection")
    for s in conns: s.close()
finally:
    p.terminate(); p.wait()
