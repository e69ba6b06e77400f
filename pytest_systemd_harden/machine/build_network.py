"""Where an image build may connect: the internet, its mirrors, its proxy and its name servers, nothing else.

A build keeps the host's network (apt downloads the packages), so a package's maintainer script could reach what
the host reaches as any local user: a cloud's metadata service (169.254.169.254: an instance role's credentials on
a CI runner), a web admin interface or database on the host's loopback or the local network. Landlock keeps it to
a few ports (HTTP, HTTPS, the mirrors'), not to a few addresses.

So the build's cgroup gets BPF programs (``BPF_PROG_TYPE_CGROUP_SOCK_ADDR``, on TCP connect and UDP send, IPv4 and
IPv6; attached by the sandbox's wrapper to its own cgroup before the build starts) that refuse, with EPERM, every
address that is not the internet's: loopback, private (RFC 1918, unique local), carrier-grade NAT, link-local,
multicast, "this network", the host's own addresses (a service listening on all of them answers on a public one
too) and the networks it routes to other than by its default route (:func:`host_networks`: the local network, a
VPN's); IPv4 in IPv6 (mapped, NAT64) is judged as the IPv4 address; except the exact address and port of each
mirror and proxy the build is given (resolved now) and of each name server in the host's ``/etc/resolv.conf``
(port 53). A mirror on the local network or a caching proxy on the host (apt-cacher-ng on localhost:3142) is
reached; nothing else there is, unless a proxy given forwards there (a proxy must refuse those destinations
itself).

The sockets no hook sees are not made (:func:`socket_filter`). Not covered (said in docs/backends.md): IPv4
source-route options (the hooks see the final address; Linux hosts drop such packets).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
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

# What a build never reaches unless it is a mirror's, a proxy's or a name server's own address (besides the host's own
# addresses and the networks it routes to: host_networks).
REFUSED_V4 = tuple(ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24",
    "192.168.0.0/16", "198.18.0.0/15", "168.63.129.16/32",  # Azure's host agent (WireServer), a metadata service too
    "224.0.0.0/3"))  # multicast and the reserved rest, up to the broadcast address
# IPv4 in IPv6 that a connection reaches as the IPv4 address: judged as that address (allowed to the internet).
EMBEDDING_V4 = tuple(ipaddress.IPv6Network(n) for n in ("::ffff:0:0/96", "64:ff9b::/96"))
REFUSED_V6 = tuple(ipaddress.IPv6Network(n) for n in (
    "::/96",  # unspecified, loopback, and the old IPv4-compatible addresses
    "64:ff9b:1::/48",  # NAT64 for local use
    "2002::/16",  # 6to4, with any IPv4 address inside
    "fc00::/7", "fe80::/10", "ff00::/8"))

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def host_networks() -> list[Network]:
    """The host's own addresses (a service listening on all of them answers on its public one too) and the networks
    it routes to other than by its default route (the local network, a VPN's), from its procfs; prefixes shorter
    than /8 (IPv4) and /16 (IPv6) are taken as default routes (a VPN's 0.0.0.0/1 and 128.0.0.0/1)."""
    found: list[Network] = []
    trie = _lines("/proc/net/fib_trie")
    for previous, line in itertools.pairwise(trie):
        if "/32 host LOCAL" in line:
            with contextlib.suppress(ValueError, IndexError):
                found.append(ipaddress.IPv4Network(previous.split()[-1]))
    for line in _lines("/proc/net/route")[1:]:
        fields = line.split()
        with contextlib.suppress(ValueError, IndexError):
            # printed as the host reads the address: a 32-bit number in its own byte order
            destination, mask = (ipaddress.IPv4Address(int(f, 16).to_bytes(4, sys.byteorder)) for f in fields[1:8:6])
            network = ipaddress.IPv4Network(f"{destination}/{mask}", strict=False)
            if network.prefixlen >= 8:
                found.append(network)
    for line in _lines("/proc/net/if_inet6"):
        with contextlib.suppress(ValueError, IndexError):
            found.append(ipaddress.IPv6Network(ipaddress.IPv6Address(bytes.fromhex(line.split()[0]))))
    for line in _lines("/proc/net/ipv6_route"):
        fields = line.split()
        with contextlib.suppress(ValueError, IndexError):
            route = ipaddress.IPv6Network(f"{ipaddress.IPv6Address(bytes.fromhex(fields[0]))}/{int(fields[1], 16)}",
                                          strict=False)
            if route.prefixlen >= 16:
                found.append(route)
    return list(dict.fromkeys(found))


def _lines(path: str) -> list[str]:
    try:
        with open(path, encoding="ascii", errors="replace") as text:
            return text.read().splitlines()
    except OSError:
        return []


def allowed_endpoints(urls: Iterable[str], resolv_conf: str | None = None) -> list[tuple[Address, int]]:
    """The addresses and ports a build is let reach even where they are refused otherwise: each URL's host (its
    addresses now) at its port, and each ``nameserver`` of ``resolv_conf`` (default: the host's
    ``/etc/resolv.conf``, read now, as :func:`host_networks` reads the host's routes) at 53."""
    found: list[tuple[Address, int]] = []
    for url in urls:
        with contextlib.suppress(ValueError, OSError):
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                continue
            port = parts.port or (443 if parts.scheme == "https" else 80)
            for info in socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM):
                found.append((ipaddress.ip_address(str(info[4][0]).split("%")[0]), port))
    for line in _lines("/etc/resolv.conf") if resolv_conf is None else resolv_conf.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            with contextlib.suppress(ValueError):
                found.append((ipaddress.ip_address(words[1].split("%")[0]), 53))
    return list(dict.fromkeys(found))


def programs(allowed: Sequence[tuple[Address, int]], refused: Sequence[Network] = ()
             ) -> list[tuple[bytes, tuple[int, ...]]]:
    """The programs to load and the attach types of each: on connect and on send, for IPv4 and IPv6. ``refused``
    adds to the built-in ranges (:func:`host_networks`)."""
    v4 = [(a, p) for a, p in allowed if isinstance(a, ipaddress.IPv4Address)]
    v6 = [(a, p) for a, p in allowed if isinstance(a, ipaddress.IPv6Address)]
    refused4 = [*REFUSED_V4, *(n for n in refused if isinstance(n, ipaddress.IPv4Network))]
    refused6 = [*REFUSED_V6, *(n for n in refused if isinstance(n, ipaddress.IPv6Network))]
    made: list[tuple[bytes, tuple[int, ...]]] = []
    for sending, four, six in ((False, BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET6_CONNECT),
                               (True, BPF_CGROUP_UDP4_SENDMSG, BPF_CGROUP_UDP6_SENDMSG)):
        made.append((_program(sending, v4, refused4), (four,)))
        made.append((_program(sending, v4, refused4, v6, refused6), (six,)))
    return made


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

    def load(self, register: int, offset: int, mask: int = 0xFFFFFFFF) -> None:  # wD = *(u32 *)(r1 + off) & mask
        self.code.append((0x61, register, 1, offset, 0))
        if mask != 0xFFFFFFFF:
            self.code.append((0x54, register, 0, 0, mask))  # 32-bit AND with an immediate

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
            # struct bpf_insn in the host's order: dst_reg is the low nibble on a little-endian machine
            registers = (src << 4) | dst if sys.byteorder == "little" else (dst << 4) | src
            out += struct.pack("=BBhI", opcode, registers, offset, imm & 0xFFFFFFFF)
        return out


def _matches(asm: _Assembler, offsets: Sequence[int], network: Network, otherwise: str) -> None:
    """Fall through if the address at ``offsets`` is in ``network``, else go to ``otherwise``."""
    for offset, word, mask in zip(offsets, _words(network.network_address.packed), _words(network.netmask.packed)):
        if mask:
            asm.load(2, offset, mask)
            asm.jump_if(False, 2, word, otherwise)


def _rules(asm: _Assembler, offsets: Sequence[int], allowed: Sequence[tuple[Address, int]],
           refused: Sequence[Network]) -> None:
    """Allow an allowed (address, port); refuse an address in ``refused``; else fall through."""
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
        _matches(asm, offsets, network, other)
        asm.jump("refuse")
        asm.label(other)


def _program(sending: bool, allowed4: Sequence[tuple[Address, int]], refused4: Sequence[Network],
             allowed6: Sequence[tuple[Address, int]] | None = None, refused6: Sequence[Network] = ()) -> bytes:
    """An IPv4 program, or with ``allowed6`` an IPv6 one (its IPv4-in-IPv6 addresses judged as IPv4). On a send
    (``sending``), port 0 is allowed: that is a connected socket's send with control data, whose destination the
    kernel does not give (its connect was judged)."""
    asm = _Assembler()
    if sending:
        asm.load(2, _USER_PORT)
        asm.jump_if(True, 2, 0, "allow")
    if allowed6 is None:
        _rules(asm, [_USER_IP4], allowed4, refused4)
    else:
        words = [_USER_IP6 + 4 * i for i in range(4)]
        _rules(asm, words, allowed6, [])
        for network in EMBEDDING_V4:
            other = asm.fresh()
            _matches(asm, words, network, other)
            asm.jump("embedded")
            asm.label(other)
        _rules(asm, words, [], refused6)
        asm.jump("allow")
        asm.label("embedded")
        _rules(asm, [words[3]], allowed4, refused4)
    asm.label("allow")
    asm.give(1)
    asm.label("refuse")
    asm.give(0)
    return asm.assemble()


# --- the sockets a build may make (seccomp) -------------------------------------------------------------------------
# Some sockets send where the hooks above never look: SCTP (its connect and send run no cgroup hook; the module loads
# on the first socket()), ICMP echo ("ping") sockets' sends, AF_VSOCK to the hypervisor; and io_uring makes sockets
# past seccomp. A build makes the sockets apt and the packages' scripts use: unix, netlink, and TCP, UDP and MPTCP
# over IPv4 and IPv6 (UDP-Lite's connect runs no hook either); any other socket() or socketpair() is refused as a
# kernel without that family (EAFNOSUPPORT) or protocol (EPROTONOSUPPORT) refuses it, so a program that probes for
# one falls back; io_uring_setup with ENOSYS (no io_uring). 32-bit x86 code whose C library makes sockets through
# socketcall() gets none (its arguments are behind a pointer seccomp cannot read).

_SECCOMP_ALLOW, _SECCOMP_ERRNO = 0x7FFF0000, 0x00050000
_ENOSYS, _EPROTONOSUPPORT, _EAFNOSUPPORT = 38, 93, 97
# (audit arch, socket, socketpair, socketcall or None, io_uring_setup) of the host's own and its compat ABI
_ABIS = {
    "x86_64": ((0xC000003E, 41, 53, None, 425), (0x40000003, 359, 360, 102, 425)),
    "aarch64": ((0xC00000B7, 198, 199, None, 425), (0x40000028, 281, 288, None, 425)),
}
_X32 = 0x40000000  # x86-64's x32 calls: no Debian package uses them
_FAMILIES = (1, 16)  # AF_UNIX, AF_NETLINK
_INTERNET = (2, 10)  # AF_INET, AF_INET6
_TYPES = (1, 2)  # SOCK_STREAM, SOCK_DGRAM (SOCK_SEQPACKET with protocol 0 is SCTP)
_PROTOCOLS = (0, 6, 17, 262)  # the type's default (TCP, UDP), TCP, UDP, MPTCP


def socket_filter(machine: str) -> bytes:
    """The seccomp program (classic BPF, struct sock_filter in the host's order) for a host of architecture
    ``machine`` (platform.machine()); b"" where it is not known (the hooks above still judge every address)."""
    abis = _ABIS.get(machine)
    if abis is None:
        return b""
    code: list[tuple[int, int | str, int | str, int]] = []  # code, jump if true, jump if false, k
    labels: dict[str, int] = {}

    def load(offset: int) -> None:
        code.append((0x20, 0, 0, offset))  # BPF_LD | BPF_W | BPF_ABS

    def arg(index: int) -> None:  # the low 32 bits of a 64-bit argument
        load(16 + 8 * index + (0 if sys.byteorder == "little" else 4))

    def when(value: int, target: str, *, at_least: bool = False) -> None:  # BPF_JMP | BPF_JEQ/JGE | BPF_K
        code.append((0x35 if at_least else 0x15, target, 0, value))

    def give(value: int) -> None:
        code.append((0x06, 0, 0, value))  # BPF_RET | BPF_K

    load(4)  # arch
    for index, _abi in enumerate(abis):
        when(_abi[0], f"abi{index}")
    give(_SECCOMP_ALLOW)
    for index, (_arch, socket_nr, socketpair_nr, socketcall, io_uring) in enumerate(abis):
        labels[f"abi{index}"] = len(code)
        load(0)  # nr
        if machine == "x86_64" and index == 0:
            when(_X32, "enosys", at_least=True)
        when(io_uring, "enosys")
        when(socket_nr, "socket")
        when(socketpair_nr, "socket")  # the same arguments (AF_TIPC makes pairs)
        if socketcall is not None:
            when(socketcall, f"socketcall{index}")
        give(_SECCOMP_ALLOW)
        if socketcall is not None:
            labels[f"socketcall{index}"] = len(code)
            arg(0)
            when(1, "no family")  # SYS_SOCKET, SYS_SOCKETPAIR: arguments behind a pointer seccomp cannot read
            when(8, "no family")
            give(_SECCOMP_ALLOW)
    labels["socket"] = len(code)
    arg(0)
    for family in _FAMILIES:
        when(family, "allow")
    for family in _INTERNET:
        when(family, "internet")
    labels["no family"] = len(code)
    give(_SECCOMP_ERRNO | _EAFNOSUPPORT)
    labels["internet"] = len(code)
    arg(1)
    code.append((0x54, 0, 0, 0xF))  # BPF_ALU | BPF_AND | BPF_K: the type without SOCK_NONBLOCK, SOCK_CLOEXEC
    for kind in _TYPES:
        when(kind, "protocol")
    give(_SECCOMP_ERRNO | _EPROTONOSUPPORT)
    labels["protocol"] = len(code)
    arg(2)
    for protocol in _PROTOCOLS:
        when(protocol, "allow")
    give(_SECCOMP_ERRNO | _EPROTONOSUPPORT)
    labels["allow"] = len(code)
    give(_SECCOMP_ALLOW)
    labels["enosys"] = len(code)
    give(_SECCOMP_ERRNO | _ENOSYS)
    out = b""
    for index, (opcode, if_true, if_false, k) in enumerate(code):
        jumps = [labels[j] - index - 1 if isinstance(j, str) else j for j in (if_true, if_false)]
        out += struct.pack("=HBBI", opcode, *jumps, k)
    return out
