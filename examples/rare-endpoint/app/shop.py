"""A small inventory API. Two endpoints, used very differently:

    GET /items           the stock list: every page of the shop calls it, all day long
    GET /admin/export    a CSV export for accounting, once a month. Exports can be large, so it writes the file
                         to its cache directory and sends it from there, instead of building it in memory.

The cache directory comes from $CACHE_DIRECTORY, which systemd sets when the unit has CacheDirectory=; without it
the service falls back to /var/cache/shop, the path a hand-written configuration would name.
"""

import argparse
import csv
import datetime
import http.server
import json
import os
import sys
from pathlib import Path

ITEMS = Path(__file__).with_name("items.json")
CACHE = Path(os.environ.get("CACHE_DIRECTORY", "/var/cache/shop"))


def load_items() -> list[dict[str, object]]:
    items: list[dict[str, object]] = json.loads(ITEMS.read_text())
    return items


def export() -> Path:
    """Write a fresh CSV export into the cache directory and return its path."""
    path = CACHE / "exports" / f"items-{datetime.date.today():%Y-%m-%d}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=["sku", "name", "stock"])
        writer.writeheader()
        writer.writerows(load_items())
    return path


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        try:
            if self.path == "/items":
                self._reply(200, "application/json", json.dumps(load_items(), indent=1))
            elif self.path == "/admin/export":
                self._reply(200, "text/csv", export().read_text())
            else:
                self._reply(404, "text/plain", "not found\n")
        except OSError as exc:
            # What the admin sees is a bare 500; the reason is only in the journal.
            sys.stderr.write(f"{self.path} failed: {exc}\n")
            self._reply(500, "text/plain", "internal error\n")

    def _reply(self, status: int, content_type: str, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(format % args + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"shop API on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
