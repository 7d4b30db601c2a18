"""Network agent of the local test cloud: what Neutron's L2 agent, firewall driver and L3 agent do,
on this machine's host side, from the Neutron API (test harness, started by scripts/local-openstack).

Every couple of seconds it reads ports, security groups, subnets, routers and floating IPs and
makes the host match them:

- **Security groups** as Neutron's iptables firewall driver enforces them: the servers' taps sit on
  a Linux bridge per network and bridged traffic passes the host's iptables (br_netfilter); per
  port an ingress and an egress chain, stateful (conntrack: established and related pass, invalid
  drops), default deny, rules by CIDR or remote group (its members' fixed IPs), anti-spoofing
  (the port's MAC and fixed IPs plus its allowed address pairs). A change of rules or memberships
  is applied on the next pass, atomically (iptables-restore). The guest cannot see or touch any of
  it: the rules live in the host's namespace, on the host side of the port. IPv4 and IPv6 alike
  (iptables and ip6tables; for IPv6 also the port's link-local range and neighbour discovery),
  so a guest cannot go around its neighbour's rules over link-local IPv6. ARP is not filtered.
- **Routers** as the L3 agent makes them: a `qrouter-<id>` namespace with a `qr-` port on each
  tenant subnet (its gateway address) and a `qg-` port on the external network; source NAT to the
  gateway address; each floating IP on the `qg-` port with DNAT/SNAT to its fixed IP.
- **The external network** is a bridge on which this host holds the subnet's gateway address, so
  the controller reaches floating IPs directly, and servers reach the package mirror through the
  host's own route (masquerade), as they would through a cloud's provider network.

    python netagent.py RUN_DIR            run until killed (clouds.yaml entry local-openstack-admin)
    python netagent.py RUN_DIR --cleanup  remove every namespace, bridge, tap and rule it made
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import modelserve_hostnet as names
from modelserve_hostnet import ensure_bridge, link_exists, run

PREFIX = "msos-"
FORWARD_CHAIN = PREFIX + "fwd"
SG_CHAIN = PREFIX + "sg"
NAT_CHAIN = PREFIX + "nat"
INTERVAL = 2.0


def log(msg: str) -> None:
    print(f"netagent: {msg}", flush=True)


def addresses(dev: str, netns: str | None = None) -> set[str]:
    argv = ["ip", *(["-n", netns] if netns else []), "-j", "addr", "show", "dev", dev]
    proc = run(*argv, check=False)
    if proc.returncode != 0:
        return set()
    return {
        f"{a['local']}/{a['prefixlen']}"
        for i in json.loads(proc.stdout)
        for a in i["addr_info"]
        if a["family"] == "inet"
    }


# --- reading Neutron ----------------------------------------------------------------------------
def snapshot(conn) -> dict:
    net = conn.network
    return {
        "networks": {n.id: n for n in net.networks()},
        "subnets": {s.id: s for s in net.subnets()},
        "ports": list(net.ports()),
        "groups": {g.id: g for g in net.security_groups()},
        "routers": list(net.routers()),
        "fips": list(net.ips()),
    }


def server_ports(snap: dict) -> list:
    return [p for p in snap["ports"] if (p.device_owner or "").startswith("compute:") and p.binding_host_id]


# --- security groups (host iptables, filter table) ----------------------------------------------
def is_family(address: str, family: int) -> bool:
    return (":" in address) == (family == 6)


def rule_match(rule: dict, members: dict[str, list[str]], family: int = 4) -> list[str]:
    """iptables matches of one Neutron rule; one entry per remote address (empty: matches none)."""
    proto = rule.get("protocol")
    parts: list[str] = []
    if proto not in (None, "", "any"):
        icmp = "icmp" if family == 4 else "ipv6-icmp"
        proto = {"6": "tcp", "17": "udp", "1": icmp, "58": icmp, "icmp": icmp}.get(str(proto), str(proto))
        parts += ["-p", proto]
        lo, hi = rule.get("port_range_min"), rule.get("port_range_max")
        if proto in ("tcp", "udp") and lo is not None:
            parts += ["--dport", f"{lo}:{hi if hi is not None else lo}"]
        elif proto == icmp and lo is not None:
            option = "--icmp-type" if family == 4 else "--icmpv6-type"
            parts += [option, f"{lo}/{hi}" if hi is not None else str(lo)]
    flag = "-s" if rule["direction"] == "ingress" else "-d"
    if rule.get("remote_ip_prefix"):
        remotes = [rule["remote_ip_prefix"]]
    elif rule.get("remote_group_id"):
        host_bits = 32 if family == 4 else 128
        remotes = [f"{ip}/{host_bits}" for ip in members.get(rule["remote_group_id"], [])]
    else:
        remotes = [""]
    return [" ".join(parts + ([flag, r] if r else [])) for r in remotes]


def filter_rules(snap: dict, family: int = 4) -> tuple[list[str], list[str]]:
    """The chains and rules of the filter table (iptables-restore lines, or ip6tables-restore for
    family 6) and the chains used."""
    ethertype = f"IPv{family}"
    members: dict[str, list[str]] = {}
    for p in snap["ports"]:
        for g in p.security_group_ids or []:
            members.setdefault(g, []).extend(
                ip["ip_address"] for ip in p.fixed_ips if is_family(ip["ip_address"], family)
            )
    chains = [FORWARD_CHAIN, SG_CHAIN]
    fwd: list[str] = []
    sg: list[str] = []
    per_port: list[str] = []
    for port in sorted(server_ports(snap), key=lambda p: p.id):
        tap, short = names.tap(port.id), port.id[:10]
        out_dev = f"-m physdev --physdev-out {tap} --physdev-is-bridged"
        in_dev = f"-m physdev --physdev-in {tap} --physdev-is-bridged"
        if not port.is_port_security_enabled:
            fwd += [f"-A {FORWARD_CHAIN} {out_dev} -j ACCEPT", f"-A {FORWARD_CHAIN} {in_dev} -j ACCEPT"]
            continue
        fwd += [f"-A {FORWARD_CHAIN} {out_dev} -j {SG_CHAIN}", f"-A {FORWARD_CHAIN} {in_dev} -j {SG_CHAIN}"]
        ingress, egress, spoof = f"{PREFIX}i{short}", f"{PREFIX}o{short}", f"{PREFIX}s{short}"
        chains += [ingress, egress, spoof]
        sg += [f"-A {SG_CHAIN} {out_dev} -j {ingress}", f"-A {SG_CHAIN} {in_dev} -j {egress}"]
        rules = [r for g in port.security_group_ids or [] for r in snap["groups"][g].security_group_rules]
        rules = [r for r in rules if r.get("ethertype", "IPv4") == ethertype]
        stateful = [
            "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
            "-m conntrack --ctstate INVALID -j DROP",
        ]
        # IPv6 needs neighbour discovery both ways, as Neutron allows it.
        stateful += ["-p ipv6-icmp -j RETURN"] if family == 6 else []
        per_port += [f"-A {ingress} {m}" for m in stateful]
        for rule in (r for r in rules if r["direction"] == "ingress"):
            matches = rule_match(rule, members, family)
            per_port += [" ".join(filter(None, [f"-A {ingress}", m, "-j RETURN"])) for m in matches]
        per_port.append(f"-A {ingress} -j DROP")
        # Anti-spoofing: the port's MAC with its fixed IPs or allowed address pairs (and, for IPv6,
        # its link-local address range), nothing else.
        pairs = [
            (port.mac_address, ip["ip_address"])
            for ip in port.fixed_ips
            if is_family(ip["ip_address"], family)
        ]
        pairs += [
            (a.get("mac_address") or port.mac_address, a["ip_address"])
            for a in port.allowed_address_pairs or []
            if is_family(a["ip_address"], family)
        ]
        pairs += [(port.mac_address, "fe80::/64")] if family == 6 else []
        per_port += [f"-A {spoof} -s {ip} -m mac --mac-source {mac} -j RETURN" for mac, ip in pairs]
        per_port.append(f"-A {spoof} -j DROP")
        per_port += [f"-A {egress} -j {spoof}", *(f"-A {egress} {m}" for m in stateful)]
        for rule in (r for r in rules if r["direction"] == "egress"):
            matches = rule_match(rule, members, family)
            per_port += [" ".join(filter(None, [f"-A {egress}", m, "-j RETURN"])) for m in matches]
        per_port.append(f"-A {egress} -j DROP")
    sg.append(f"-A {SG_CHAIN} -j ACCEPT")
    # Anything else bridged from or to a server's tap (a port this agent does not know yet): drop.
    fwd += [
        f"-A {FORWARD_CHAIN} -m physdev --physdev-in tap+ --physdev-is-bridged -j DROP",
        f"-A {FORWARD_CHAIN} -m physdev --physdev-out tap+ --physdev-is-bridged -j DROP",
    ]
    # Routers' external traffic, routed by this host to the rest of the world and back (IPv4).
    for network in external_networks(snap) if family == 4 else []:
        bridge = names.bridge(network.id)
        fwd += [
            f"-A {FORWARD_CHAIN} -i {bridge} ! -o {bridge} -j ACCEPT",
            f"-A {FORWARD_CHAIN} -o {bridge} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        ]
    return chains, fwd + sg + per_port


def tool(family: int) -> str:
    return "iptables" if family == 4 else "ip6tables"


def existing_chains(table: str, family: int) -> set[str]:
    out = run(f"{tool(family)}-save", "-t", table).stdout
    return {line[1:].split()[0] for line in out.splitlines() if line.startswith(":" + PREFIX)}


def apply_table(
    table: str, chains: list[str], rules: list[str], hooks: dict[str, str], family: int = 4
) -> None:
    stale = sorted(existing_chains(table, family) - set(chains))
    lines = [
        f"*{table}",
        *(f":{c} - [0:0]" for c in chains + stale),
        *rules,
        *(f"-X {c}" for c in stale),
        "COMMIT",
    ]
    run(f"{tool(family)}-restore", "--noflush", input_text="\n".join(lines) + "\n")
    for builtin, chain in hooks.items():
        if run(tool(family), "-t", table, "-C", builtin, "-j", chain, check=False).returncode != 0:
            run(tool(family), "-t", table, "-I", builtin, "1", "-j", chain)


# --- external networks and routers --------------------------------------------------------------
def external_networks(snap: dict) -> list:
    return [n for n in snap["networks"].values() if n.is_router_external]


def v4_subnets(snap: dict, network_id: str) -> list:
    return [s for s in snap["subnets"].values() if s.network_id == network_id and s.ip_version == 4]


def ensure_external(snap: dict) -> list[str]:
    """Each external network: a bridge with the gateway address; masquerade out of this host."""
    nat: list[str] = []
    for network in external_networks(snap):
        bridge = names.bridge(network.id)
        ensure_bridge(bridge)
        want = {
            f"{s.gateway_ip}/{s.cidr.split('/')[1]}" for s in v4_subnets(snap, network.id) if s.gateway_ip
        }
        have = addresses(bridge)
        for addr in want - have:
            run("ip", "addr", "add", addr, "dev", bridge)
        for addr in have - want:
            run("ip", "addr", "del", addr, "dev", bridge)
        # Out of this host only, not onto a cloud bridge (bridged packets pass POSTROUTING too).
        nat += [f"-A {NAT_CHAIN} -s {s.cidr} ! -o brq+ -j MASQUERADE" for s in v4_subnets(snap, network.id)]
    return nat


def ensure_router_port(netns: str, port, snap: dict) -> str:
    dev = names.router_side(port.id, port.device_owner)
    if not link_exists(dev, netns):
        names.plug_port(port.id, port.network_id, snap["networks"][port.network_id].mtu or 1500, dev, netns)
        run("ip", "-n", netns, "link", "set", dev, "address", port.mac_address)
    ensure_bridge(names.bridge(port.network_id))
    run("ip", "link", "set", names.tap(port.id), "master", names.bridge(port.network_id), "up")
    run("ip", "-n", netns, "link", "set", dev, "up")
    want = set()
    for ip in port.fixed_ips:
        subnet = snap["subnets"][ip["subnet_id"]]
        if subnet.ip_version == 4:
            want.add(f"{ip['ip_address']}/{subnet.cidr.split('/')[1]}")
    have = {a for a in addresses(dev, netns) if not a.endswith("/32")}
    for addr in want - have:
        run("ip", "-n", netns, "addr", "add", addr, "dev", dev)
    return dev


def ensure_routers(snap: dict) -> set[str]:
    namespaces = set()
    for router in snap["routers"]:
        netns = names.router_namespace(router.id)
        namespaces.add(netns)
        if not Path("/run/netns", netns).exists():
            run("ip", "netns", "add", netns)
            run("ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            run("ip", "-n", netns, "link", "set", "lo", "up")
        ports = [p for p in snap["ports"] if p.device_id == router.id]
        nat = ["*nat", ":PREROUTING ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]", ":POSTROUTING ACCEPT [0:0]"]
        gateway_dev, gateway_ip, inside = "", "", []
        for port in ports:
            dev = ensure_router_port(netns, port, snap)
            v4 = [ip["ip_address"] for ip in port.fixed_ips if ":" not in ip["ip_address"]]
            if port.device_owner == "network:router_gateway":
                gateway_dev, gateway_ip = dev, v4[0] if v4 else ""
                for subnet in v4_subnets(snap, port.network_id):
                    if subnet.gateway_ip:
                        run(
                            "ip",
                            "-n",
                            netns,
                            "route",
                            "replace",
                            "default",
                            "via",
                            subnet.gateway_ip,
                            "dev",
                            dev,
                        )
            else:
                inside += [
                    (dev, snap["subnets"][ip["subnet_id"]].cidr, ip["ip_address"]) for ip in port.fixed_ips
                ]
        fips = [f for f in snap["fips"] if f.router_id == router.id and f.fixed_ip_address]
        if gateway_dev:
            want = {f"{f.floating_ip_address}/32" for f in fips}
            have = {a for a in addresses(gateway_dev, netns) if a.endswith("/32")}
            for addr in want - have:
                run("ip", "-n", netns, "addr", "add", addr, "dev", gateway_dev)
            for addr in have - want:
                run("ip", "-n", netns, "addr", "del", addr, "dev", gateway_dev)
            for f in fips:
                fip, fixed = f.floating_ip_address, f.fixed_ip_address
                nat += [
                    f"-A PREROUTING -d {fip}/32 -j DNAT --to-destination {fixed}",
                    f"-A OUTPUT -d {fip}/32 -j DNAT --to-destination {fixed}",
                    f"-A POSTROUTING -s {fixed}/32 -o {gateway_dev} -j SNAT --to-source {fip}",
                ]
            for dev, cidr, address in inside:
                # A server reaching another's floating IP: answer through the router (hairpin).
                nat.append(
                    f"-A POSTROUTING -o {dev} -s {cidr} -d {cidr} -m conntrack --ctstate DNAT"
                    f" -j SNAT --to-source {address}"
                )
                if gateway_ip:
                    nat.append(f"-A POSTROUTING -s {cidr} -o {gateway_dev} -j SNAT --to-source {gateway_ip}")
        nat.append("COMMIT")
        run("ip", "netns", "exec", netns, "iptables-restore", input_text="\n".join(nat) + "\n")
    return namespaces


def remove_stale(snap: dict | None, namespaces: set[str]) -> None:
    """Namespaces of deleted routers; taps of deleted ports; bridges left with no port."""
    netns_dir = Path("/run/netns")
    for path in netns_dir.glob("qrouter-*") if netns_dir.exists() else []:
        if path.name not in namespaces:
            run("ip", "netns", "del", path.name, check=False)
    known = {names.tap(p.id) for p in snap["ports"]} if snap else set()
    for dev in Path("/sys/class/net").iterdir():
        if dev.name.startswith("tap") and dev.name not in known:
            run("ip", "link", "del", dev.name, check=False)
    external = {names.bridge(n.id) for n in external_networks(snap)} if snap else set()
    for dev in Path("/sys/class/net").iterdir():
        if dev.name.startswith("brq") and dev.name not in external and not any((dev / "brif").iterdir()):
            run("ip", "link", "del", dev.name, check=False)


def sync(conn, last: dict) -> None:
    """Make the host match Neutron when anything Neutron says changed; stale devices go every pass."""
    snap = snapshot(conn)
    state = {
        key: [r.to_dict() for r in (v.values() if isinstance(v, dict) else v)] for key, v in snap.items()
    }
    for group in state["groups"]:  # Neutron lists a group's rules in no fixed order
        group["security_group_rules"] = sorted(group["security_group_rules"], key=lambda r: r["id"])
    digest = hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()
    if digest != last.get("digest"):
        nat = ensure_external(snap)
        last["namespaces"] = ensure_routers(snap)
        chains, rules = filter_rules(snap)
        chains6, rules6 = filter_rules(snap, family=6)
        apply_table("filter", chains, rules, {"FORWARD": FORWARD_CHAIN})
        apply_table("filter", chains6, rules6, {"FORWARD": FORWARD_CHAIN}, family=6)
        apply_table("nat", [NAT_CHAIN], nat, {"POSTROUTING": NAT_CHAIN})
        log(
            f"applied {len(rules)} filter rules for {len(server_ports(snap))} server ports,"
            f" {len(nat)} NAT rules"
        )
        last["digest"] = digest
    remove_stale(snap, last["namespaces"])


def cleanup() -> None:
    remove_stale(None, set())
    for family, table, hook, chain in (
        (4, "filter", "FORWARD", FORWARD_CHAIN),
        (6, "filter", "FORWARD", FORWARD_CHAIN),
        (4, "nat", "POSTROUTING", NAT_CHAIN),
    ):
        for _ in range(10):  # the hook's jumps (one, unless someone added more)
            if run(tool(family), "-t", table, "-D", hook, "-j", chain, check=False).returncode != 0:
                break
        apply_table(table, [], [], {}, family)
    for dev in Path("/sys/class/net").iterdir():
        if dev.name.startswith("brq"):
            run("ip", "link", "del", dev.name, check=False)


def main() -> None:
    run_dir = Path(sys.argv[1])
    if "--cleanup" in sys.argv:
        cleanup()
        return
    import openstack

    os.environ["OS_CLIENT_CONFIG_FILE"] = str(run_dir.parent / "clouds.yaml")
    conn = None
    last: dict = {}
    log("started")
    while True:
        try:
            conn = conn or openstack.connect(cloud="local-openstack-admin")
            sync(conn, last)
            (run_dir / "netagent.alive").write_text(str(time.time()))
        except Exception as exc:
            log(f"sync failed: {exc}")
            conn = None
            last.clear()
        time.sleep(INTERVAL)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
