"""Tiny FaaS server harness shared by the Python functions (copied to /app in each image).

Imports /app/handler.py -- and with it every heavy import and self-check of the function --
BEFORE it starts listening, so a 200 from /health means the function is ready.
    GET /health -> 200 "ok"
    GET /run    -> 200 handler.run()  (one line, no trailing newline; 500 if it raises)
    anything else -> 404
HTTP/1.0 (one request per connection), single-threaded, no per-request logging; exits 0 on SIGTERM.
"""
import os
import signal
import sys
import traceback
from http.server import BaseHTTPRequestHandler, HTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import handler  # noqa: E402  (must happen before listening)


class Server(HTTPServer):
    request_queue_size = 128


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server_version = "fnserver/1"

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            status, body = 200, b"ok"
        elif path == "/run":
            try:
                status, body = 200, handler.run().encode()
            except Exception as e:  # report, don't die
                traceback.print_exc()
                status, body = 500, ("error: %s" % e).encode()
        else:
            status, body = 404, b"not found"
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


def main():
    # as PID 1 in a container, signals without a handler are ignored: exit cleanly on SIGTERM
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    port = int(os.environ.get("PORT", "8080"))
    server = Server(("0.0.0.0", port), Handler)
    print("listening on 0.0.0.0:%d (%s)" % (port, getattr(handler, "NAME", "function")), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
