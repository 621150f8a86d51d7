"""Load tests only ever target this machine: a host that is not loopback is refused."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


class NotLoopback(ValueError):
    pass


def host_of(url: str) -> str:
    """The host of ``url`` (``http://h:p/x``, ``grpc://h:p``, ``h:p``, ``[::1]:p`` or ``h``)."""
    text = (url or "").strip()
    if "://" not in text:
        text = "//" + text
    host = urlsplit(text).hostname
    if not host:
        raise NotLoopback(f"cannot read a host from {url!r}")
    return host


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:  # a name: every address it resolves to must be loopback
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addrs = {info[4][0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def check_loopback(url: str) -> str:
    """Return the host of ``url``; raise :class:`NotLoopback` unless it is this machine (127.0.0.0/8, ::1)."""
    host = host_of(url)
    if not is_loopback(host):
        raise NotLoopback(f"refusing to send load to {host!r} ({url}): load tests target loopback only "
                          "(127.0.0.1, ::1, localhost)")
    return host
