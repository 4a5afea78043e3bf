"""Test worker for the balancing tests: a TCP server on every listener port it is given
($PORT, $PORT_1, ...), all on 127.0.0.1. Each connection is greeted with one line,

    <pid> <client> active=<n> accepted=<m>

then echoed until the client closes. `client` is the connection's peer address, or, with
EXPECT_PROXY=1, the source address of the PROXY protocol header (v1 or v2) the master must send
first, parsed here by hand. `active` is how many connections this worker holds at that moment
(this one included) and `accepted` how many it ever greeted: connections that reached it.
A connection whose header is missing or malformed is closed and not counted (health probes
connect and close without a byte).
"""
import ipaddress
import os
import signal
import socket
import struct
import sys
import threading

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
expect_proxy = os.environ.get("EXPECT_PROXY") == "1"
lock = threading.Lock()
active = 0
accepted = 0


def read_exact(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError("closed inside the PROXY header")
        data += chunk
    return data


def read_proxy_header(conn):
    """The source address of the PROXY header at the start of `conn`, as "ip:port"."""
    first = read_exact(conn, 12)
    if first == V2_SIGNATURE:
        ver_cmd, family, length = struct.unpack("!BBH", read_exact(conn, 4))
        body = read_exact(conn, length)
        if ver_cmd >> 4 != 2:
            raise ValueError("not version 2")
        if family == 0x11:
            src, _dst, sport, _dport = struct.unpack("!4s4sHH", body[:12])
            return f"{ipaddress.IPv4Address(src)}:{sport}"
        if family == 0x21:
            src, _dst, sport, _dport = struct.unpack("!16s16sHH", body[:36])
            return f"[{ipaddress.IPv6Address(src)}]:{sport}"
        raise ValueError(f"family {family:#x}")
    if not first.startswith(b"PROXY "):
        raise ValueError("no PROXY header")
    line = first
    while not line.endswith(b"\r\n"):
        if len(line) > 107:
            raise ValueError("v1 header too long")
        line += read_exact(conn, 1)
    parts = line.decode("ascii").split()
    if parts[1] == "TCP4":
        return f"{parts[2]}:{parts[4]}"
    if parts[1] == "TCP6":
        return f"[{parts[2]}]:{parts[4]}"
    raise ValueError(f"v1 protocol {parts[1]}")


def serve(conn, peer):
    global active, accepted
    try:
        client = read_proxy_header(conn) if expect_proxy else f"{peer[0]}:{peer[1]}"
    except (EOFError, ValueError, OSError, IndexError):
        conn.close()
        return
    with lock:
        active += 1
        accepted += 1
        greeting = f"{os.getpid()} {client} active={active} accepted={accepted}\n"
    try:
        conn.sendall(greeting.encode())
        while True:
            data = conn.recv(65536)
            if not data:
                break
            conn.sendall(data)
    except OSError:
        pass
    finally:
        with lock:
            active -= 1
        conn.close()


def listen(port):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(128)
    while True:
        conn, peer = server.accept()
        threading.Thread(target=serve, args=(conn, peer), daemon=True).start()


signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
ports = [int(v) for k, v in os.environ.items() if k == "PORT" or k.startswith("PORT_")]
for port in ports:
    threading.Thread(target=listen, args=(port,), daemon=True).start()
signal.pause()
