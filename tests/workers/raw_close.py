# Test worker: answers every request on 127.0.0.1:$PORT with a close-delimited response
# (HTTP/1.1 200, no Content-Length, not chunked; the body ends when the connection does),
# then closes the connection. The body is "close-delimited\n" and 150000 bytes of
# (i * 7 + 3) % 251; the tests compute the same. Requests are read up to the end of their head.
import os
import socket
import threading

BODY = b"close-delimited\n" + bytes((i * 7 + 3) % 251 for i in range(150000))


def serve(conn):
    try:
        head = b""
        while b"\r\n\r\n" not in head:
            data = conn.recv(65536)
            if not data:
                return
            head += data
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + BODY)
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        conn.close()


server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(os.environ["PORT"])))
server.listen(64)
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
