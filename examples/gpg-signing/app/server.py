"""A tiny signing service: POST a payload to /sign and get an armored detached GPG signature back.

It keeps its own keyring in $STATE_DIRECTORY (systemd's StateDirectory=), creates a key on first start, and
shells out to gpg for every signature - like gitea signing commits, which is how nixpkgs lost signing when
`SystemCallFilter=~@memlock` killed gpg-agent.
"""

import argparse
import http.server
import os
import subprocess
import sys

STATE = os.environ.get("STATE_DIRECTORY", "/var/lib/signer")
GNUPGHOME = os.path.join(STATE, "gnupg")
GPG = ["gpg", "--batch", "--homedir", GNUPGHOME, "--pinentry-mode", "loopback", "--passphrase", ""]


def ensure_key() -> None:
    os.makedirs(GNUPGHOME, mode=0o700, exist_ok=True)
    listed = subprocess.run([*GPG, "--list-secret-keys"], capture_output=True, text=True, check=False)
    if "sec" not in listed.stdout:
        subprocess.run([*GPG, "--quick-gen-key", "Signer <signer@example.org>", "ed25519", "sign", "never"],
                       check=True, capture_output=True)


class Handler(http.server.BaseHTTPRequestHandler):
    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._reply(200, b"ok\n")
        elif self.path == "/pubkey":
            ensure_key()
            exported = subprocess.run([*GPG, "--armor", "--export"], capture_output=True, check=False)
            self._reply(200 if exported.returncode == 0 else 500, exported.stdout or exported.stderr)
        else:
            self._reply(404, b"not found\n")

    def do_POST(self) -> None:
        if self.path != "/sign":
            self._reply(404, b"not found\n")
            return
        try:
            ensure_key()  # lazily, like a signing feature first used long after start-up
        except subprocess.CalledProcessError as exc:
            sys.stderr.write(f"creating the signing key failed: {exc}\n")
            self._reply(500, b"signing failed\n")
            return
        payload = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        signed = subprocess.run([*GPG, "--armor", "--detach-sign"], input=payload, capture_output=True, check=False)
        if signed.returncode != 0:
            # What gitea did: a 500 whose cause is only in the service's log.
            sys.stderr.write(f"gpg failed with status {signed.returncode}: {signed.stderr.decode()}\n")
            self._reply(500, b"signing failed\n")
            return
        self._reply(200, signed.stdout)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(format % args + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"signing on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
