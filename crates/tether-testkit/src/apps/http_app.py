# A tiny HTTP/1.1 app for test "pods": answers every request with "<name> <port> <method> <path>".
# Usage: python3 http_app.py NAME PORT [PORT...]
import sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

name = sys.argv[1]

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = f"{name} {self.server.server_address[1]} {self.command} {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PUT = do_DELETE = _answer
    def log_message(self, *args):
        pass

servers = [ThreadingHTTPServer(("0.0.0.0", int(p)), Handler) for p in sys.argv[2:]]
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
servers[0].serve_forever()
