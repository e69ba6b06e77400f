"""A memcached client in a few lines of the text protocol: `mc.py set KEY VALUE` prints the value read back,
`mc.py stats` the server's statistics."""

import socket
import sys


def talk(request: bytes, end: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", 11211), timeout=5) as conn:
        conn.sendall(request)
        reply = b""
        while not reply.endswith(end):
            chunk = conn.recv(4096)
            if not chunk:
                break
            reply += chunk
        return reply


if sys.argv[1] == "set":
    key, value = sys.argv[2], sys.argv[3].encode()
    assert talk(b"set %s 0 60 %d\r\n%s\r\n" % (key.encode(), len(value), value), b"\r\n") == b"STORED\r\n"
    reply = talk(b"get %s\r\n" % key.encode(), b"END\r\n")
    print(reply.split(b"\r\n")[1].decode())
else:
    print(talk(b"stats\r\n", b"END\r\n").decode())
