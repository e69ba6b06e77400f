"""greeter: says hello on 127.0.0.1:8070 and counts the visits it has had (since 1.1, in a file)."""

import http.server
import os
from pathlib import Path

VERSION = Path("/usr/share/greeter/VERSION").read_text().strip()
# 1.1 keeps its count across restarts. The file lives where the unit's StateDirectory= puts it, or, without one,
# under /var/lib/greeter all the same: the unit shipped with 1.1 forgot to say so.
COUNT = Path(os.environ.get("STATE_DIRECTORY", "/var/lib/greeter")) / "visits"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/version":
            body = VERSION
        else:
            visits = int(COUNT.read_text()) + 1 if COUNT.exists() else 1
            if VERSION != "1.0":
                COUNT.parent.mkdir(parents=True, exist_ok=True)
                COUNT.write_text(str(visits))
            body = f"hello, visitor {visits}"
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body.encode() + b"\n")


http.server.ThreadingHTTPServer(("127.0.0.1", 8070), Handler).serve_forever()
