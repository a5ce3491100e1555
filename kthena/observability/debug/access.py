"""
Who may read the debug endpoints: a client from an address in
C{observability.debug.allow} (loopback by default; an empty list means any address and
needs a token) and, when C{observability.debug.token} is set, with C{Authorization:
Bearer <token>}. The peer address is the TCP peer: C{X-Forwarded-For} is not trusted.
"""

from __future__ import annotations

import hmac
import ipaddress

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.web.iweb import IRequest

from kthena.config.observability import DebugConfig, Network


def _peer_ip(address: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if isinstance(address, UNIXAddress):
        # A local socket (systemd activation): the peer is on this host.
        return ipaddress.IPv4Address("127.0.0.1")
    if not isinstance(address, IPv4Address | IPv6Address):
        return None
    try:
        ip = ipaddress.ip_address(address.host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class DebugAccess:
    """Who may read the debug endpoints (see the module docstring)."""

    def __init__(self, config: DebugConfig) -> None:
        self.allow: tuple[Network, ...] = config.allow
        self._token = None if config.token is None else config.token.encode("ascii")

    @property
    def token_set(self) -> bool:
        return self._token is not None

    def refusal(self, request: IRequest) -> str | None:
        """Why C{request} is refused, or C{None} when it may be answered."""
        if self.allow:
            peer = request.getClientAddress()
            ip = _peer_ip(peer)
            if ip is None or not any(ip in network for network in self.allow):
                shown = ip if ip is not None else type(peer).__name__
                return (
                    f"the debug endpoints answer only clients in observability.debug.allow; "
                    f"{shown} is not one"
                )
        if self._token is not None:
            header = request.getHeader(b"authorization") or b""
            scheme, _, given = header.strip().partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self._token):
                return "the debug endpoints need Authorization: Bearer <observability.debug.token>"
        return None
