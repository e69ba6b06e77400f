"""A tiny name-lookup API: the kind of code every service that "connects to db.internal" runs at some point.

    GET /resolve?name=api.example.test    addresses, via getaddrinfo(3)          (UDP to the resolver)
    GET /reverse?address=10.0.0.10        the name of an address, via getnameinfo(3)
    GET /interfaces                       this machine's interfaces and addresses, via getifaddrs(3)
                                          (a netlink socket: AF_NETLINK)

Names are resolved by the system's resolver (glibc, /etc/resolv.conf), like any program on the machine does.
"""

import argparse
import ctypes
import http.server
import os
import socket
import sys
import urllib.parse


def resolve(name: str) -> list[str]:
    return sorted({str(info[4][0]) for info in socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)})


def reverse(address: str) -> str:
    host, _port = socket.getnameinfo((address, 0), socket.NI_NAMEREQD)
    return host


class _IfAddrs(ctypes.Structure):
    pass


_IfAddrs._fields_ = [("next", ctypes.POINTER(_IfAddrs)), ("name", ctypes.c_char_p), ("flags", ctypes.c_uint),
                     ("addr", ctypes.c_void_p), ("netmask", ctypes.c_void_p), ("ifu", ctypes.c_void_p),
                     ("data", ctypes.c_void_p)]
# Where the address sits in a sockaddr_in / sockaddr_in6, and its size.
_ADDRESS_AT: dict[int, tuple[int, int]] = {socket.AF_INET: (4, 4), socket.AF_INET6: (8, 16)}
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def interfaces() -> list[str]:
    """getifaddrs(3), as C daemons call it (Python's socket module has no binding for it)."""
    head = ctypes.POINTER(_IfAddrs)()
    if _libc.getifaddrs(ctypes.byref(head)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"getifaddrs: {os.strerror(code)}")
    found = []
    try:
        entry = head
        while entry:
            item = entry.contents
            if item.addr:
                family = ctypes.c_ushort.from_address(item.addr).value
                if family in _ADDRESS_AT:
                    offset, size = _ADDRESS_AT[family]
                    packed = ctypes.string_at(item.addr + offset, size)
                    found.append(f"{item.name.decode()} {socket.inet_ntop(family, packed)}")
            entry = item.next
    finally:
        _libc.freeifaddrs(head)
    return found


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        try:
            if url.path == "/resolve":
                lines = resolve(query["name"])
            elif url.path == "/reverse":
                lines = [reverse(query["address"])]
            elif url.path == "/interfaces":
                lines = interfaces()
            else:
                self._reply(404, "not found")
                return
        except (OSError, KeyError) as exc:
            # What the operator sees: a 502 and one line in the journal.
            sys.stderr.write(f"{url.path} failed: {exc!r}\n")
            self._reply(502, f"lookup failed: {exc}")
            return
        self._reply(200, "\n".join(lines))

    def _reply(self, status: int, text: str) -> None:
        body = (text + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
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
    print(f"lookup API on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
