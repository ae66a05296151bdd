"""A rendezvous socket that listens on one address: torch's ``TCPStore`` server binds the
wildcard (every interface) unless it is handed a socket bound already. The learner group's
store and the collective weight transport's take theirs from here."""

from __future__ import annotations

import socket


def listening_fd(addr: str, port: int = 0) -> tuple[int, int]:
    """(fd, port) of a TCP socket bound to ``addr`` alone and listening; ``port`` 0: any free
    one. The caller hands the fd to ``TCPStore(master_listen_fd=...)``, which owns it then."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((addr, port))
    listener.listen()
    port = listener.getsockname()[1]
    return listener.detach(), port


def address_towards(addr: str) -> str | None:
    """This host's own address that traffic to ``addr`` leaves from, or None without a route."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((addr, 9))  # a UDP connect sends nothing: it only picks the route
            return s.getsockname()[0]
    except OSError:
        return None


def interface_towards(addr: str) -> str | None:
    """The name of this host's network interface that traffic to ``addr`` leaves by ("lo" for
    a loopback address), or None if no route or no such interface is found."""
    import psutil

    local = address_towards(addr)
    for name, addrs in psutil.net_if_addrs().items():
        if local is not None and any(a.address.split("%")[0] == local for a in addrs):
            return name
    return None
