"""Test worker that leaves zombies behind: it forks $ZOMBIES children that exit at once and are
never waited for, then serves on 127.0.0.1:$PORT (greeting with its pid). When the worker dies
before reaping them, they are re-parented, still zombies, to the nearest subreaper or PID 1."""
import os
import socket

for _ in range(int(os.environ.get("ZOMBIES", "3"))):
    if os.fork() == 0:
        os._exit(0)

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
