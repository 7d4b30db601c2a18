"""Azure IoT Edge route strings, parsed once and used by both transports.

The standalone (MQTT) runtime reads the same routes the Azure deployment manifest gives edgeHub
(``$edgeHub.properties.desired.routes``), so the two deployments cannot drift apart. Supported:

* ``FROM /messages/* [WHERE [NOT] IS_DEFINED($connectionModuleId)] INTO <sink>``
* ``FROM /messages/modules/<module>/* INTO <sink>``
* ``FROM /messages/modules/<module>/outputs/<output|*> INTO <sink>``

with ``<sink>`` either ``BrokeredEndpoint("/modules/<module>/inputs/<input>")`` or ``$upstream``.
Other WHERE clauses are refused at load time rather than silently ignored.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

UPSTREAM = "$upstream"
UPSTREAM_INPUT = "messages"
DEVICES = "devices"  # topic level for leaf devices; not a valid module name

_ROUTE = re.compile(
    r"^\s*FROM\s+(?P<source>\S+)(?:\s+WHERE\s+(?P<where>.+?))?\s+INTO\s+(?P<sink>.+?)\s*$", re.IGNORECASE
)
_SINK = re.compile(r'^BrokeredEndpoint\(\s*"/modules/(?P<module>[^/"]+)/inputs/(?P<input>[^/"]+)"\s*\)$')
_MODULE_SOURCE = re.compile(r"^/messages/modules/(?P<module>[^/*]+)/(?:\*|outputs/(?P<output>[^/]+))$")
_WHERE_DEVICES = re.compile(r"^NOT\s+IS_DEFINED\(\s*\$connectionModuleId\s*\)$", re.IGNORECASE)
_WHERE_MODULES = re.compile(r"^IS_DEFINED\(\s*\$connectionModuleId\s*\)$", re.IGNORECASE)
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class Source:
    """Where a message comes from: a leaf device, or a module's output."""

    kind: str  # "device" | "module"
    name: str  # device id or module name
    output: str = ""


@dataclass(frozen=True)
class Route:
    name: str
    from_devices: bool
    from_modules: bool
    module: str  # "*" = any module
    output: str  # "*" = any output
    sink_module: str  # module name or "$upstream"
    sink_input: str

    def matches(self, source: Source) -> bool:
        if source.kind == "device":
            return self.from_devices
        if not self.from_modules:
            return False
        return self.module in ("*", source.name) and self.output in ("*", source.output)

    def topic_filters(self, prefix: str) -> list[str]:
        filters = []
        if self.from_devices:
            filters.append(f"{prefix}/{DEVICES}/+/messages")
        if self.from_modules:
            module = "+" if self.module == "*" else self.module
            output = "+" if self.output == "*" else self.output
            filters.append(f"{prefix}/{module}/output/{output}")
        return filters


def parse_route(name: str, text: str) -> Route:
    m = _ROUTE.match(text)
    if not m:
        raise ValueError(f"route {name!r}: expected 'FROM <source> [WHERE ...] INTO <sink>', got {text!r}")
    source, where, sink = m.group("source"), m.group("where"), m.group("sink")
    from_devices = from_modules = True
    module = output = "*"
    if source == "/messages/*":
        if where is not None:
            if _WHERE_DEVICES.match(where.strip()):
                from_modules = False
            elif _WHERE_MODULES.match(where.strip()):
                from_devices = False
            else:
                raise ValueError(f"route {name!r}: unsupported WHERE clause {where!r}")
    else:
        sm = _MODULE_SOURCE.match(source)
        if not sm:
            raise ValueError(f"route {name!r}: unsupported source {source!r}")
        if where is not None:
            raise ValueError(f"route {name!r}: WHERE is only supported on /messages/*")
        from_devices = False
        module, output = sm.group("module"), sm.group("output") or "*"
    sink = sink.strip()
    if sink == UPSTREAM:
        sink_module, sink_input = UPSTREAM, UPSTREAM_INPUT
    else:
        km = _SINK.match(sink)
        if not km:
            raise ValueError(f"route {name!r}: unsupported sink {sink!r}")
        sink_module, sink_input = km.group("module"), km.group("input")
    for part in (module, output, sink_module, sink_input):
        if part not in ("*", UPSTREAM) and (not _NAME.match(part) or part == DEVICES):
            raise ValueError(f"route {name!r}: invalid name {part!r}")
    return Route(name, from_devices, from_modules, module, output, sink_module, sink_input)


class RouteTable:
    def __init__(self, routes: dict[str, str]):
        self.raw = dict(routes)
        self.routes = [parse_route(name, text) for name, text in sorted(routes.items())]

    def inputs_for(self, module: str, source: Source) -> list[str]:
        """Inputs of ``module`` a message from ``source`` is delivered to (each at most once)."""
        seen: list[str] = []
        for route in self.routes:
            if route.sink_module == module and route.matches(source) and route.sink_input not in seen:
                seen.append(route.sink_input)
        return seen

    def topic_filters(self, module: str, prefix: str) -> list[str]:
        """Distinct MQTT filters ``module`` subscribes to; filters covered by a wider one are dropped
        (overlapping subscriptions may be delivered twice by the broker)."""
        filters: list[str] = []
        for route in self.routes:
            if route.sink_module == module:
                filters.extend(f for f in route.topic_filters(prefix) if f not in filters)
        return [f for f in filters if not any(o != f and filter_covers(o, f) for o in filters)]

    def outputs_of(self, module: str) -> set[str]:
        return {r.output for r in self.routes if r.from_modules and r.module == module}


def filter_covers(wide: str, narrow: str) -> bool:
    """True if every topic matched by the filter ``narrow`` is matched by ``wide`` (``+`` only)."""
    w, n = wide.split("/"), narrow.split("/")
    return len(w) == len(n) and all(a == "+" or a == b for a, b in zip(w, n, strict=True))


def load_routes(path: str | Path | None = None) -> RouteTable:
    """Routes from ``path`` ({"routes": {...}} or a whole deployment manifest) or the packaged default."""
    if path is None:
        doc = json.loads(resources.files("modelserve_edge").joinpath("routes.json").read_text())
    else:
        doc = json.loads(Path(path).read_text())
    if "modulesContent" in doc:
        doc = doc["modulesContent"]["$edgeHub"]["properties.desired"]
    routes = doc.get("routes")
    if not isinstance(routes, dict) or not routes:
        raise ValueError(f"{path or 'routes.json'}: no 'routes' object")
    # Manifest schema 1.1+ allows {"route": "...", "priority": n}; only the route string matters here.
    return RouteTable({k: v["route"] if isinstance(v, dict) else v for k, v in routes.items()})
