"""Who a client is, for the per-client limits: its address as the server's socket sees it (never a header such as
X-Forwarded-For, which the client writes), IPv6 addresses grouped by their /64 (one host or one customer's network
gets a whole /64 and can pick any address in it), IPv4-mapped IPv6 addresses as the IPv4 address.

Two limits use it (docs/serve.md, "Limits"):

- connections: at ``--max-connections``, a new connection is not refused while some client holds an idle
  connection and at least as many connections as the newcomer's client: the server closes the idle connection of
  the client that holds the most instead (``ClientConnections.victim``), so one client's idle sockets cannot lock
  others out, and a lone reverse proxy (one address) is never refused while it has an idle connection;
- requests in progress: one client may hold at most ``client_request_limit`` (serve.limits) of the
  ``--max-concurrent-requests`` slots (429 beyond), so another client always finds a slot (serve.middleware).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Hashable

CLIENT_KEY = "serve.client"  # where serve.protocol puts the client's key in each request's ASGI scope
UNKNOWN = "unknown"  # a connection with no IP peer address (a Unix socket): all such connections are one client


@functools.lru_cache(maxsize=4096)
def client_key(host: str | None) -> str:
    """The key of the client at ``host`` (an IP address as text): the IPv4 address, or an IPv6 address's /64."""
    if not host:
        return UNKNOWN
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # without an IPv6 zone ("fe80::1%eth0")
    except ValueError:
        return host  # not an IP address (a test client's name): itself
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return f"{ipaddress.IPv6Network((ip, 64), strict=False).network_address}/64"
    return str(ip)


def client_of(scope) -> str:
    """The client key of an ASGI request: the one serve.protocol put in the scope (from the socket's peer address),
    else from the scope's ``client`` (apps served without serve.protocol: the test client)."""
    key = scope.get(CLIENT_KEY)
    if key is not None:
        return key
    client = scope.get("client")
    return client_key(client[0] if client else None)


class ClientConnections:
    """The open connections of one server, by client, each client's in the order they were opened."""

    def __init__(self) -> None:
        self.by_client: dict[str, dict[Hashable, None]] = {}

    def add(self, conn: Hashable, client: str) -> None:
        self.by_client.setdefault(client, {})[conn] = None

    def discard(self, conn: Hashable, client: str) -> None:
        conns = self.by_client.get(client)
        if conns is not None:
            conns.pop(conn, None)
            if not conns:
                del self.by_client[client]

    def count(self, client: str) -> int:
        return len(self.by_client.get(client, ()))

    def victim(self, newcomer: Hashable, client: str, evictable: Callable[[Hashable], bool]) -> Hashable | None:
        """The connection to close so that ``newcomer`` (of ``client``, already added) may stay: the oldest
        ``evictable`` one of the client holding the most connections, among clients holding at least as many as
        ``client`` (a tie goes to ``client`` itself: it makes room among its own); None when there is none."""
        own = self.count(client)
        ranked = sorted(self.by_client.items(), key=lambda kv: (len(kv[1]), kv[0] == client), reverse=True)
        for _, conns in ranked:
            if len(conns) < own:
                return None
            for conn in conns:
                if conn is not newcomer and evictable(conn):
                    return conn
        return None
