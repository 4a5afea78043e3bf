# Test worker: listens on 127.0.0.1:$PORT, accepts every connection and never answers nor
# closes one (a wedged app that still accepts).
import os
import socket

server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(os.environ["PORT"])))
server.listen(1024)
held = []
while True:
    conn, _ = server.accept()
    held.append(conn)
