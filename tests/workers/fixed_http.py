"""Test worker that knows nothing of balancer: Python's http.server on a hard-coded address
(127.0.0.1:APP_PORT; never $PORT), answering every GET with its pid."""
import http.server
import os


class Pid(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.HTTPServer(("127.0.0.1", int(os.environ["APP_PORT"])), Pid).serve_forever()
