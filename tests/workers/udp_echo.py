"""Test worker: a UDP server on 127.0.0.1:$PORT answering every datagram with
"<pid> <payload>" (payloads up to 65,000 bytes come back whole).

A graceful UDP worker: on SIGTERM it stops taking new datagrams (they bounce, and the balancer
sends them elsewhere), answers the ones already queued, closes its socket and exits, so no
datagram is lost.
Optional env: READY_DELAY_MS (wait before binding, a slow start).
"""
import os
import signal
import socket
import time

port = int(os.environ["PORT"])
prefix = f"{os.getpid()} ".encode()
stopping = False


def on_term(_signum, _frame):
    global stopping
    stopping = True


signal.signal(signal.SIGTERM, on_term)
time.sleep(int(os.environ.get("READY_DELAY_MS", "0")) / 1000)

sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
sock.bind(("127.0.0.1", port))
sock.settimeout(0.05)

while not stopping:
    try:
        data, peer = sock.recvfrom(65536)
    except socket.timeout:
        continue
    sock.sendto(prefix + data, peer)

# Stop receiving before draining: a UDP socket connected to a peer only takes that peer's
# datagrams, so from here on a client's datagram bounces (ICMP port unreachable) and the
# balancer resends it to another worker, instead of landing in the queue between the last read
# and close() and being lost. What was queued before is still read below.
sock.connect(sock.getsockname())
sock.setblocking(False)
while True:
    try:
        data, peer = sock.recvfrom(65536)
    except BlockingIOError:
        break
    sock.sendto(prefix + data, peer)
sock.close()
