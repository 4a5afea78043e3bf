"""Test worker for the reuseport policy in Python: accepts on fd 3, greets with its pid and
the LISTEN_* variables, then echoes."""
import os
import signal
import socket
import threading

listener = socket.socket(fileno=3)
greeting = (
    f"{os.getpid()} LISTEN_FDS={os.environ.get('LISTEN_FDS')} "
    f"LISTEN_PID={os.environ.get('LISTEN_PID')} LISTEN_FDNAMES={os.environ.get('LISTEN_FDNAMES')}\n"
).encode()


def serve(conn):
    with conn:
        conn.sendall(greeting)
        while data := conn.recv(65536):
            conn.sendall(data)


signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
