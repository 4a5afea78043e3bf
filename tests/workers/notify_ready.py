"""Test worker for `ready = "notify"`: listens on 127.0.0.1:$PORT at once (so a port check alone
would pass), greets each connection with its pid, and sends READY=1 to $NOTIFY_SOCKET itself,
with the standard library only, once the file named by $READY_GATE exists."""
import os
import socket
import threading
import time

listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(os.environ["PORT"])))
listener.listen(64)


def notify_when_gate_opens():
    gate = os.environ["READY_GATE"]
    while not os.path.exists(gate):
        time.sleep(0.05)
    address = os.environ["NOTIFY_SOCKET"]
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"STATUS=warmed up\nREADY=1", address)
    print("sent READY=1", flush=True)


threading.Thread(target=notify_when_gate_opens, daemon=True).start()
while True:
    conn, _ = listener.accept()
    try:
        conn.sendall(f"{os.getpid()}\n".encode())
    finally:
        conn.close()
