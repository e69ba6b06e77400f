"""Where an image build may connect: the internet, its mirrors, its proxy and its name servers, nothing else.

A build keeps the host's network (apt downloads the packages), so a package's maintainer script could reach what
the host reaches as any local user: a cloud's metadata service (169.254.169.254: an instance role's credentials on
a CI runner), a web admin interface or database on the host's loopback or the local network. Landlock keeps it to
a few ports (HTTP, HTTPS, the mirrors'), not to a few addresses.

So the build's cgroup gets BPF programs (``BPF_PROG_TYPE_CGROUP_SOCK_ADDR``, on TCP connect and UDP send, IPv4 and
IPv6; attached by the sandbox's wrapper to its own cgroup before the build starts) that refuse, with EPERM, every
address that is not the internet's: loopback, private (RFC 1918, unique local), carrier-grade NAT, link-local,
multicast, "this network", and IPv4 in IPv6; except the exact address and port of each mirror and proxy the build
is given (resolved now) and of each name server in the host's ``/etc/resolv.conf`` (port 53). A mirror on the local
network or a caching proxy on the host (apt-cacher-ng on localhost:3142) is reached; nothing else there is.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import sys
import urllib.parse
from collections.abc import Iterable, Sequence

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# linux/bpf.h
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET6_CONNECT = 10, 11
BPF_CGROUP_UDP4_SENDMSG, BPF_CGROUP_UDP6_SENDMSG = 14, 15
# struct bpf_sock_addr: user_ip4 at 4, user_ip6[4] at 8, user_port at 24 (each read as 32 bits, network byte order)
_USER_IP4, _USER_IP6, _USER_PORT = 4, 8, 24

# What a build never reaches unless it is a mirror's, a proxy's or a name server's own address.
REFUSED_V4 = tuple(ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16",
    "224.0.0.0/3"))  # multicast and the reserved rest, up to the broadcast address
REFUSED_V6 = tuple(ipaddress.IPv6Network(n) for n in (
    "::/127", "::ffff:0:0/96", "fc00::/7", "fe80::/10", "ff00::/8"))  # unspecified and loopback; IPv4 in IPv6


def allowed_endpoints(urls: Iterable[str], resolv_conf: str) -> list[tuple[Address, int]]:
    """The addresses and ports a build is let reach even where they are refused otherwise: each URL's host (its
    addresses now) at its port, and each ``nameserver`` of ``resolv_conf`` (the host's) at 53."""
    found: list[tuple[Address, int]] = []
    for url in urls:
        with contextlib.suppress(ValueError, OSError):
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                continue
            port = parts.port or (443 if parts.scheme == "https" else 80)
            for info in socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM):
                found.append((ipaddress.ip_address(str(info[4][0]).split("%")[0]), port))
    for line in resolv_conf.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            with contextlib.suppress(ValueError):
                found.append((ipaddress.ip_address(words[1].split("%")[0]), 53))
    return list(dict.fromkeys(found))


def programs(allowed: Sequence[tuple[Address, int]]) -> list[tuple[bytes, tuple[int, ...]]]:
    """The programs to load and the attach types of each: one for IPv4, one for IPv6."""
    v4 = [(a, p) for a, p in allowed if a.version == 4]
    v6 = [(a, p) for a, p in allowed if a.version == 6]
    return [(_program(v4, REFUSED_V4, [_USER_IP4]), (BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_UDP4_SENDMSG)),
            (_program(v6, REFUSED_V6, [_USER_IP6 + 4 * i for i in range(4)]),
             (BPF_CGROUP_INET6_CONNECT, BPF_CGROUP_UDP6_SENDMSG))]


def _words(packed: bytes) -> list[int]:
    """An address's bytes (network order) as the program reads them: 32-bit words loaded in the host's order."""
    return [int.from_bytes(packed[i:i + 4], sys.byteorder) for i in range(0, len(packed), 4)]


def _port(port: int) -> int:
    """A port as the program reads it: the kernel loads the 16 bits of network order into the register."""
    return int.from_bytes(struct.pack("!H", port), sys.byteorder)


class _Assembler:
    """Just enough eBPF to compare a few 32-bit fields of the context with constants."""

    def __init__(self) -> None:
        self.code: list[tuple[int, int, int, int | str, int]] = []  # opcode, dst, src, offset or label, imm
        self.labels: dict[str, int] = {}
        self._next = 0

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def fresh(self) -> str:
        self._next += 1
        return f"l{self._next}"

    def load(self, register: int, offset: int) -> None:  # rD = *(u32 *)(r1 + offset)
        self.code.append((0x61, register, 1, offset, 0))

    def load_masked(self, register: int, offset: int, mask: int) -> None:
        self.load(register, offset)
        if mask != 0xFFFFFFFF:
            self.code.append((0x54, register, 0, 0, mask))  # wD &= mask (32-bit AND with an immediate)

    def jump_if(self, equal: bool, register: int, value: int, target: str) -> None:  # JMP32 JEQ/JNE immediate
        self.code.append((0x16 if equal else 0x56, register, 0, target, value))

    def jump(self, target: str) -> None:
        self.code.append((0x05, 0, 0, target, 0))

    def give(self, value: int) -> None:  # r0 = value; exit
        self.code.append((0xB7, 0, 0, 0, value))
        self.code.append((0x95, 0, 0, 0, 0))

    def assemble(self) -> bytes:
        out = b""
        for index, (opcode, dst, src, offset, imm) in enumerate(self.code):
            if isinstance(offset, str):
                offset = self.labels[offset] - index - 1
            out += struct.pack("<BBhI", opcode, (src << 4) | dst, offset, imm & 0xFFFFFFFF)
        return out


def _program(allowed: Sequence[tuple[Address, int]], refused: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
             offsets: Sequence[int]) -> bytes:
    """Allow an allowed (address, port); refuse an address in ``refused``; allow the rest."""
    asm = _Assembler()
    for address, port in allowed:
        other = asm.fresh()
        for offset, word in zip(offsets, _words(address.packed)):
            asm.load(2, offset)
            asm.jump_if(False, 2, word, other)
        asm.load(2, _USER_PORT)
        asm.jump_if(True, 2, _port(port), "allow")
        asm.label(other)
    for network in refused:
        other = asm.fresh()
        masks = _words(network.netmask.packed)
        for offset, word, mask in zip(offsets, _words(network.network_address.packed), masks):
            if mask:
                asm.load_masked(2, offset, mask)
                asm.jump_if(False, 2, word, other)
        asm.jump("refuse")
        asm.label(other)
    asm.label("allow")
    asm.give(1)
    asm.label("refuse")
    asm.give(0)
    return asm.assemble()
