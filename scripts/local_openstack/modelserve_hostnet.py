"""What the local cloud's compute driver and its network agent both do on this host (test harness):
device names, commands, and a port's veth on its network's bridge.

Names are Neutron's Linux bridge agent's: one bridge per network `brq<network id[:11]>`, the host
side of each port `tap<port id[:11]>`. Router ports live in a `qrouter-<router id>` namespace as
`qr-<port id[:11]>` (tenant side) and `qg-<port id[:11]>` (external side). All stay under Linux's
15-character limit.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def bridge(network_id: str) -> str:
    return "brq" + network_id[:11]


def tap(port_id: str) -> str:
    return "tap" + port_id[:11]


def guest_side(port_id: str) -> str:
    """The peer of a server's tap until it is renamed eth0 in the guest."""
    return "nsp" + port_id[:11]


def router_side(port_id: str, owner: str) -> str:
    return ("qg-" if owner == "network:router_gateway" else "qr-") + port_id[:11]


def router_namespace(router_id: str) -> str:
    return "qrouter-" + router_id


def run(*argv: str, check: bool = True, input_text: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, input=input_text, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def link_exists(name: str, netns: str | None = None) -> bool:
    if netns is None:
        return Path("/sys/class/net", name).exists()
    return run("ip", "-n", netns, "link", "show", name, check=False).returncode == 0


def ensure_bridge(name: str) -> None:
    if not link_exists(name):
        run("ip", "link", "add", name, "type", "bridge")
    run("ip", "link", "set", name, "up")


def plug_port(port_id: str, network_id: str, mtu: int, peer: str, peer_netns: str) -> None:
    """A port's veth pair: `tap<port>` up on the network's bridge, `peer` in peer_netns (a
    namespace name or a process's PID). A tap left from an earlier plug is replaced."""
    host_side = tap(port_id)
    ensure_bridge(bridge(network_id))
    if link_exists(host_side):
        run("ip", "link", "del", host_side)
    run(
        "ip", "link", "add", host_side, "mtu", str(mtu), "type", "veth",
        "peer", "name", peer, "netns", peer_netns, "mtu", str(mtu),
    )  # fmt: skip
    run("ip", "link", "set", host_side, "master", bridge(network_id), "up")
