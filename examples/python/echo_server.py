"""A TCP line-echo worker for balancer (not HTTP): listens on 127.0.0.1:$PORT.

Each line received is sent back prefixed with "echo: ". When the client half-closes its side,
the server answers "bye from <pid>" and closes: the half-close must reach it through the proxy.
On SIGTERM it stops accepting and exits once its connections are done.
"""

import os
import signal
import socket
import socketserver
import sys


class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(b"echo: " + line)
            self.wfile.flush()
        # EOF from the client: its write side is closed, ours still works.
        self.wfile.write(f"bye from {os.getpid()}\n".encode())
        self.wfile.flush()


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = False
    block_on_close = True


def main():
    port = int(os.environ.get("PORT", "9000"))
    server = Server(("127.0.0.1", port), Echo)

    def stop(signum, frame):
        # shutdown() must run off the serving thread.
        import threading

        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    print(f"python echo worker {os.environ.get('BALANCER_INSTANCE', '0')} "
          f"(pid {os.getpid()}) on 127.0.0.1:{port}", flush=True)
    server.serve_forever()
    server.server_close()
    sys.exit(0)


if __name__ == "__main__":
    main()
