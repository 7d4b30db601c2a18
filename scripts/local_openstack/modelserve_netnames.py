"""Device names shared by the local cloud's compute driver and its network agent (test harness).

Neutron's Linux bridge agent names: one bridge per network `brq<network id[:11]>`, the host side
of each port `tap<port id[:11]>`. Router ports live in a `qrouter-<router id>` namespace as
`qr-<port id[:11]>` (tenant side) and `qg-<port id[:11]>` (external side). All stay under Linux's
15-character limit.
"""


def bridge(network_id: str) -> str:
    return "brq" + network_id[:11]


def tap(port_id: str) -> str:
    return "tap" + port_id[:11]


def guest_side(port_id: str) -> str:
    """The peer of a server's tap until it is moved into the guest and renamed eth0."""
    return "nsp" + port_id[:11]


def router_side(port_id: str, owner: str) -> str:
    return ("qg-" if owner == "network:router_gateway" else "qr-") + port_id[:11]


def router_namespace(router_id: str) -> str:
    return "qrouter-" + router_id
