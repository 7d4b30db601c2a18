"""TLS for anything leaving the device: plain URLs only to loopback, verified TLS contexts."""

from __future__ import annotations

import ipaddress
import ssl
import urllib.parse

from modelserve_edge.config import ConfigError

PLAIN_SCHEMES = {"mqtt": "mqtts", "http": "https"}


def is_loopback(host: str | None) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); a name is not resolved."""
    if not host:
        return False
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_tls_unless_local(name: str, url: str) -> urllib.parse.SplitResult:
    """The parsed URL; ConfigError for a plain (mqtt://, http://) URL to a host that is not loopback:
    data leaving the device goes over TLS."""
    parts = urllib.parse.urlsplit(url)
    secure = PLAIN_SCHEMES.get(parts.scheme)
    if secure and not is_loopback(parts.hostname):
        raise ConfigError(
            f"{name}: {parts.scheme}:// to {parts.hostname or '(no host)'}, which is not loopback: "
            f"use {secure}:// (TLS) for anything leaving the device"
        )
    return parts


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Certificate and host name verified, against ``ca_file`` or the system CAs."""
    return ssl.create_default_context(cafile=ca_file or None)
