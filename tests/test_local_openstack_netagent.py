"""The local cloud's network agent (scripts/local_openstack/netagent.py) turns Neutron's security
groups into the iptables rules Neutron's firewall driver would make. Here: the rendering, from a
Neutron snapshot; molecule/openstack_vm checks the rules on the wire between real servers."""

import importlib.util
import sys
from types import SimpleNamespace as NS

import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location(
    "netagent", ROOT / "scripts" / "local_openstack" / "netagent.py"
)
netagent = importlib.util.module_from_spec(spec)
sys.modules["netagent"] = netagent
spec.loader.exec_module(netagent)

WEB, DB = "11111111-aaaa", "22222222-bbbb"


def rule(direction, group=None, prefix=None, proto="tcp", port=None, ethertype="IPv4"):
    return {
        "direction": direction,
        "ethertype": ethertype,
        "protocol": proto,
        "port_range_min": port,
        "port_range_max": port,
        "remote_ip_prefix": prefix,
        "remote_group_id": group,
    }


def port(pid, ip, groups, *, security=True, host="local-compute", owner="compute:nova", pairs=()):
    return NS(
        id=pid,
        mac_address="fa:16:3e:00:00:" + ip.split(".")[-1].zfill(2)[-2:],
        fixed_ips=[{"ip_address": ip, "subnet_id": "s"}],
        security_group_ids=groups,
        device_owner=owner,
        binding_host_id=host,
        is_port_security_enabled=security,
        allowed_address_pairs=list(pairs),
    )


@pytest.fixture
def snap():
    egress_any = rule("egress", proto=None)
    return {
        "networks": {"ext": NS(id="ext-network-id", is_router_external=True)},
        "subnets": {},
        "groups": {
            WEB: NS(security_group_rules=[rule("ingress", prefix="0.0.0.0/0", port=8080), egress_any]),
            DB: NS(
                security_group_rules=[
                    rule("ingress", group=WEB, port=5432),
                    rule("ingress", group=WEB, port=5432, ethertype="IPv6"),
                    egress_any,
                ]
            ),
        },
        "ports": [
            port("aaaaaaaaaa-web1", "10.0.0.11", [WEB]),
            port("bbbbbbbbbb-web2", "10.0.0.12", [WEB], pairs=[{"ip_address": "10.0.0.100"}]),
            port("cccccccccc-db01", "10.0.0.21", [DB]),
            port("dddddddddd-open", "10.0.0.31", [], security=False),
            port("eeeeeeeeee-none", "10.0.0.41", [WEB], host=""),  # not bound: no tap here
            port("ffffffffff-rtr1", "10.0.0.1", [], owner="network:router_interface"),
        ],
    }


def chain(rules, name):
    return [r for r in rules if r.startswith(f"-A {name} ")]


def test_remote_group_rules_admit_exactly_its_members(snap):
    _, rules = netagent.filter_rules(snap)
    ingress = chain(rules, "msos-icccccccccc")
    assert ingress[:2] == [
        "-A msos-icccccccccc -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        "-A msos-icccccccccc -m conntrack --ctstate INVALID -j DROP",
    ]
    # The members' fixed IPs (also the unbound port's: it is in the group), IPv6 rules skipped.
    assert ingress[2:-1] == [
        f"-A msos-icccccccccc -p tcp --dport 5432:5432 -s {ip}/32 -j RETURN"
        for ip in ("10.0.0.11", "10.0.0.12", "10.0.0.41")
    ]
    assert ingress[-1] == "-A msos-icccccccccc -j DROP"


def test_egress_is_anti_spoofed_then_filtered(snap):
    _, rules = netagent.filter_rules(snap)
    assert chain(rules, "msos-sbbbbbbbbbb") == [
        "-A msos-sbbbbbbbbbb -s 10.0.0.12 -m mac --mac-source fa:16:3e:00:00:12 -j RETURN",
        "-A msos-sbbbbbbbbbb -s 10.0.0.100 -m mac --mac-source fa:16:3e:00:00:12 -j RETURN",
        "-A msos-sbbbbbbbbbb -j DROP",
    ]
    egress = chain(rules, "msos-obbbbbbbbbb")
    assert egress[0] == "-A msos-obbbbbbbbbb -j msos-sbbbbbbbbbb"
    assert "-A msos-obbbbbbbbbb -j RETURN" in egress and egress[-1] == "-A msos-obbbbbbbbbb -j DROP"


def test_only_this_hosts_server_ports_are_filtered_and_unknown_taps_dropped(snap):
    chains, rules = netagent.filter_rules(snap)
    assert sorted(c for c in chains if c.startswith("msos-i")) == [
        "msos-iaaaaaaaaaa",
        "msos-ibbbbbbbbbb",
        "msos-icccccccccc",
    ]
    fwd = chain(rules, "msos-fwd")
    # Port security off: the port's traffic passes unfiltered, as in Neutron.
    assert "-A msos-fwd -m physdev --physdev-out tapdddddddddd- --physdev-is-bridged -j ACCEPT" in fwd
    assert not any("eeeeeeeeee" in r or "ffffffffff" in r for r in rules)
    assert fwd.index("-A msos-fwd -m physdev --physdev-in tap+ --physdev-is-bridged -j DROP") > max(
        i for i, r in enumerate(fwd) if "tapaaaaaaaaaa" in r or "tapcccccccccc" in r
    )
    assert chain(rules, "msos-sg")[-1] == "-A msos-sg -j ACCEPT"


def test_a_rule_without_protocol_or_remote_matches_everything(snap):
    assert netagent.rule_match(rule("egress", proto=None), {}) == [""]
    assert netagent.rule_match(rule("ingress", proto="icmp", port=8), {}) == ["-p icmp --icmp-type 8/8"]
    # A remote group with no members admits nobody (not everybody).
    assert netagent.rule_match(rule("ingress", group="empty", port=22), {}) == []


def test_ipv6_is_default_deny_too(snap):
    snap["groups"][WEB].security_group_rules.append(
        rule("ingress", prefix="::/0", port=8080, ethertype="IPv6")
    )
    _, rules = netagent.filter_rules(snap, family=6)
    ingress_web = chain(rules, "msos-iaaaaaaaaaa")
    assert "-A msos-iaaaaaaaaaa -p tcp --dport 8080:8080 -s ::/0 -j RETURN" in ingress_web
    assert "-A msos-iaaaaaaaaaa -p ipv6-icmp -j RETURN" in ingress_web  # neighbour discovery
    assert ingress_web[-1] == "-A msos-iaaaaaaaaaa -j DROP"
    # The database admits the web group over IPv4 only: no IPv6 member, no IPv6 rule.
    assert chain(rules, "msos-icccccccccc")[-1] == "-A msos-icccccccccc -j DROP"
    assert not any("5432" in r for r in chain(rules, "msos-icccccccccc"))
    assert "-A msos-saaaaaaaaaa -s fe80::/64 -m mac --mac-source fa:16:3e:00:00:11 -j RETURN" in rules
