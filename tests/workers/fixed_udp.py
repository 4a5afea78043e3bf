"""Test worker that knows nothing of balancer: a UDP server bound to a hard-coded port
(0.0.0.0:APP_PORT; never $PORT) answering every datagram with "<pid> <payload>"."""
import os
import socket

sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", int(os.environ["APP_PORT"])))
prefix = f"{os.getpid()} ".encode()
while True:
    data, peer = sock.recvfrom(65536)
    sock.sendto(prefix + data, peer)
