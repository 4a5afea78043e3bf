# Test worker: an HTTP/1.1 keep-alive server on 127.0.0.1:$PORT behind a PROXY v1 header.
# Each connection must start with "PROXY TCP4 <src> <dst> <sport> <dport>\r\n"; every response
# on it has the body "<src>:<sport>", the client that header named.
import os
import socket
import threading

def serve(conn):
    f = conn.makefile("rb")
    parts = f.readline().decode(errors="replace").split()
    client = f"{parts[2]}:{parts[4]}" if len(parts) >= 6 and parts[0] == "PROXY" else "no-header"
    while True:
        if not f.readline():
            break
        while f.readline() not in (b"\r\n", b"\n", b""):
            pass
        body = client.encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    conn.close()

server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(os.environ["PORT"])))
server.listen(64)
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
