"""Runs inside a QEMU machine, installed in the VM image as /usr/local/libexec/harden-guest. Two jobs:

``harden-guest bridge`` relays the guest's system bus to the host over a virtio-serial port. The host's
:class:`~pytest_systemd_harden.machine.systemd.SystemdClient` connects to the port's socket on the host side; each time
it does, this opens a fresh connection to the guest's system bus and relays bytes both ways until the host goes away.
socat cannot do this: a virtio-serial port reads EOF while no host is connected, so socat would exit (and be restarted)
over and over until one is.

``harden-guest bind-files`` runs early in the boot, before any service starts: it mounts the read-only disk the
host made of the machine section's ``files:`` and bind-mounts each entry, read-only, where the spec asked, which is
what ``systemd-nspawn --bind-ro=`` does for a container.

Stdlib only, run with the image's own ``python3 -I -S``.
"""

import json
import os
import select
import socket
import subprocess
import sys
import time

PORT = "/dev/virtio-ports/org.pytest_systemd_harden.bus"
BUS = "/run/dbus/system_bus_socket"
FILES_LABEL = "harden-files"
FILES_MOUNT = "/run/harden-files"


def wait_for_host(port: int) -> None:
    """Return once the host has sent something; POLLHUP means nobody is connected on the host side yet."""
    poller = select.poll()
    poller.register(port, select.POLLIN)
    while True:
        if any(events & select.POLLIN for _fd, events in poller.poll()):
            return
        time.sleep(0.05)


def relay(port: int, bus: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    poller = select.poll()
    poller.register(port, select.POLLIN)
    poller.register(bus.fileno(), select.POLLIN)
    while True:
        for fd, _events in poller.poll():
            if fd == port:
                data = os.read(port, 65536)
                if not data:
                    return  # the host disconnected
                bus.sendall(data)
            else:
                data = bus.recv(65536)
                if not data:
                    return  # the bus dropped us
                view = memoryview(data)
                while view:
                    select.select([], [port], [])
                    view = view[os.write(port, view):]


def bridge() -> None:
    port = os.open(PORT, os.O_RDWR | os.O_NONBLOCK)
    os.set_blocking(port, True)
    while True:
        wait_for_host(port)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bus:
            bus.connect(BUS)
            relay(port, bus)


def bind_files() -> None:
    """Mount the files disk and bind its entries (listed in its binds.json: [[entry, destination], ...])."""
    os.makedirs(FILES_MOUNT, exist_ok=True)
    deadline = time.monotonic() + 60
    while subprocess.run(["mount", "-o", "ro", f"LABEL={FILES_LABEL}", FILES_MOUNT], check=False).returncode:
        if time.monotonic() > deadline:  # the disk was given (harden.files is on the command line): it must come
            sys.exit(f"no disk labelled {FILES_LABEL} appeared within 60 s")
        time.sleep(0.2)
    with open(os.path.join(FILES_MOUNT, "binds.json")) as manifest:
        binds = json.load(manifest)
    for entry, destination in binds:
        source = os.path.join(FILES_MOUNT, entry)
        os.makedirs(os.path.dirname(destination) or "/", exist_ok=True)
        if os.path.isdir(source):
            os.makedirs(destination, exist_ok=True)
        elif not os.path.exists(destination):
            open(destination, "a").close()
        subprocess.run(["mount", "--bind", source, destination], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", destination], check=True)


if __name__ == "__main__":
    {"bridge": bridge, "bind-files": bind_files}[sys.argv[1]]()
