"""Test worker for the reuseport policy over UDP: the inherited fd 3 is a UDP socket; each
datagram is answered with "<pid> <payload>"."""
import os
import signal
import socket

sock = socket.socket(fileno=3)
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
pid = str(os.getpid()).encode()
while True:
    data, peer = sock.recvfrom(65536)
    sock.sendto(pid + b" " + data, peer)
