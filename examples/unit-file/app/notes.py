"""A tiny notes service: GET /NAME reads a note, PUT /NAME stores one under $STATE_DIRECTORY."""

import http.server
import os
import sys
from pathlib import Path

STATE = Path(os.environ.get("STATE_DIRECTORY", "/var/lib/notes"))
GREETING = os.environ.get("NOTES_GREETING", "notes")


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        name = self.path.strip("/") or "index"
        path = STATE / name
        body = path.read_bytes() if path.is_file() else f"{GREETING}: no note {name}\n".encode()
        self.send_response(200 if path.is_file() else 404)
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:
        data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        (STATE / (self.path.strip("/") or "index")).write_bytes(data)
        self.send_response(201)
        self.end_headers()


http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
