"""Redirect every plain-HTTP request to HTTPS: the classic small service that must listen on port 80.

Ports below 1024 are privileged: binding one needs CAP_NET_BIND_SERVICE. The service is not root; systemd gives
it that one capability (AmbientCapabilities=) and nothing else.
"""

import argparse
import http.server
import sys


def make_handler(target: str) -> type[http.server.BaseHTTPRequestHandler]:
    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(301)
            self.send_header("Location", target + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, format: str, *args: object) -> None:
            sys.stderr.write(format % args + "\n")

    return Redirect


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--to", required=True, help="where to send clients, e.g. https://shop.example.org")
    args = parser.parse_args()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(args.to.rstrip("/")))
    print(f"redirecting 127.0.0.1:{args.port} to {args.to}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
