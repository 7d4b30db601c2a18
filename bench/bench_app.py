#!/usr/bin/env python3
"""Benchmark the serving stack end to end, optimised vs naive, in one run (figures printed, never asserted).

Starts its own private RabbitMQ node, Celery workers and gunicorn (all on 127.0.0.1), drives them
with wrk, prints a side-by-side table, and stops everything it started. The optimised stack runs
once per task queue type (default: the quorum queue and the classic queue of before), all on the
same node and up at once, driven in alternating rounds, and the quorum / classic ratios are
printed. Bounded: < 6 minutes.

    .venv/bin/python bench/bench_app.py [--duration 10] [--concurrency 32] [--batch-rows 500]
                                        [--queue-types quorum,classic] [--ab-rounds 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT / "app" / "seed-release"
ROW = [6, 148, 72, 35, 0, 33.6, 0.627, 50]

# The private stack and the naive worker are the app's test support, not part of the package.
sys.path.insert(0, str(ROOT / "app" / "tests"))
try:
    from modelserve import release
except ImportError:  # running without `pip install -e app`
    sys.path.insert(0, str(ROOT / "app" / "src"))
    from modelserve import release
import ms_devstack as devstack  # noqa: E402


def lua_script(path: Path, body: dict, headers: dict[str, str] | None = None) -> Path:
    path.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        + "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in (headers or {}).items())
        + "wrk.body = [==["
        + json.dumps(body, separators=(",", ":"))
        + "]==]\n",  # the JSON holds "]]"
        encoding="utf-8",
    )
    return path


def oip_binary_script(path: Path, rows: list[list[float]]) -> Path:
    """wrk posting one Open Inference Protocol request: FP32 rows as binary, binary outputs asked."""
    raw = struct.pack(f"<{len(rows) * 8}f", *(v for row in rows for v in row))
    tensor = {
        "name": "input",
        "datatype": "FP32",
        "shape": [len(rows), 8],
        "parameters": {"binary_data_size": len(raw)},
    }
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    body = path.with_suffix(".bin")
    body.write_bytes(header + raw)
    path.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/octet-stream"\n'
        f'wrk.headers["Inference-Header-Content-Length"] = "{len(header)}"\n'
        f'local f = io.open("{body}", "rb")\nwrk.body = f:read("*a")\nf:close()\n',
        encoding="utf-8",
    )
    return path


def cpu_seconds(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU time (user + system) so far of each component's processes and their children; "wrk" is
    this process's waited-for children (the wrk runs)."""
    out = {"wrk": sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])}
    for name, roots in pids.items():
        total = 0.0
        for pid in roots:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                for proc in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        times = proc.cpu_times()
                        total += times.user + times.system
        out[name] = total
    return out


def in_turn(stacks: dict, round_index: int) -> list:
    """The stacks' items in round ``round_index``: forward, then reversed, so none is always first."""
    items = list(stacks.items())
    return items if round_index % 2 == 0 else items[::-1]


def merge_runs(rounds: list[dict], rows: int) -> dict:
    """Rounds of one kind: mean req/s, median p50, worst p99, summed counts."""
    p50s = sorted(r["p50"] for r in rounds)
    merged = {
        "rps": sum(r["rps"] for r in rounds) / len(rounds),
        "p50": p50s[len(p50s) // 2],
        "p99": max(r["p99"] for r in rounds),
        "requests": sum(r["requests"] for r in rounds),
        "non2xx": sum(r["non2xx"] for r in rounds),
        "socket_errors": "; ".join(r["socket_errors"] for r in rounds if r["socket_errors"]),
        "rounds_rps": [r["rps"] for r in rounds],
        "cpu": {k: sum(r["cpu"][k] for r in rounds) for k in rounds[0].get("cpu", {})},
    }
    merged["predictions_per_s"] = merged["rps"] * rows
    return merged


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        return float("nan")
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(url: str, script: Path, concurrency: int, duration: int, threads: int = 2) -> dict:
    out = subprocess.run(
        [
            "wrk", f"-t{min(threads, concurrency)}", f"-c{concurrency}", f"-d{duration}s", "--timeout", "30s",
            "--latency", "-s", str(script), url,
        ],
        capture_output=True, text=True, timeout=duration + 60, check=True,
    ).stdout  # fmt: skip
    result = {"raw": out}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    result["rps"] = float(m.group(1)) if m else float("nan")
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        result[f"p{pct}"] = _ms(m.group(1)) if m else float("nan")
    m = re.search(r"(\d+) requests in", out)
    result["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: (.*)", out)
    result["socket_errors"] = m.group(1).strip() if m else ""
    return result


def start_stack(
    base: Path, broker_urls: dict, model_dir: Path, queue: str, workers: int, naive: bool = False, **env: str
):
    """Web and workers, each with its own broker user (the rabbitmq role's permissions)."""
    port = devstack.free_port()
    e = devstack.stack_env(
        broker_urls["web"], model_dir, f"127.0.0.1:{port}", MODELSERVE_TASK_QUEUE=queue, **env
    )
    worker_env = {**e, "MODELSERVE_BROKER_URL": broker_urls["worker"]}
    start_worker = devstack.start_naive_worker if naive else devstack.start_worker
    procs = [start_worker(worker_env, base / f"{queue}-worker{i}.log") for i in range(workers)]
    web = devstack.start_web(e, base / f"{queue}-web.log")
    url = f"http://127.0.0.1:{port}"
    devstack.wait_http(url + "/readyz", 60)
    return url, web, procs


FRONTDOOR = ROOT / "roles" / "frontdoor"


def render_frontdoor(base: Path, backend: str, https_port: int, key: str) -> Path:
    """haproxy.cfg and its maps rendered from roles/frontdoor's own templates and defaults (so the
    bench measures the configuration hosts run), with the bench's paths, ports, backend and key.

    Changed from what a host runs, none of it on the request path: rate limits raised so the bench
    is never answered 429 (the defaults, 1000 requests per key and 2000 per source address per
    10 s, would stop a 1,000 req/s bench within a second), no plain-HTTP redirect listener, and the
    process lines of `global` (daemon, chroot, user, group, the stats socket under /run) dropped:
    the bench runs HAProxy in the foreground as a plain process. The log goes to a socket in the
    temporary directory that the bench reads (a host's goes to /dev/log, read by journald)."""
    import hashlib

    import jinja2
    import yaml

    def regex_replace(value: str, pattern: str, repl: str = "") -> str:
        return re.sub(pattern, repl.replace("\\\\", "\\"), str(value))

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True)
    env.filters["regex_replace"] = regex_replace
    env.filters["hash"] = lambda value, algorithm="sha1": hashlib.new(
        algorithm, str(value).encode()
    ).hexdigest()
    role_vars = yaml.safe_load((FRONTDOOR / "defaults" / "main.yml").read_text(encoding="utf-8"))
    role_vars.update(yaml.safe_load((FRONTDOOR / "vars" / "main.yml").read_text(encoding="utf-8")))
    host, port = backend.rsplit(":", 1)
    role_vars.update(
        ansible_managed="rendered by bench/bench_app.py from roles/frontdoor/templates",
        inventory_hostname="bench",
        frontdoor_https_port=https_port,
        frontdoor_http_redirect=False,
        frontdoor_backends=[{"name": "web1", "address": host, "port": int(port)}],
        frontdoor_api_keys={"bench": key},
        frontdoor_api_key_rate_limit=1_000_000_000,
        frontdoor_source_rate_limit=1_000_000_000,
        __frontdoor_cert=str(base / "frontdoor.pem"),
        __frontdoor_keys_map=str(base / "api-keys.map"),
        __frontdoor_limits_map=str(base / "api-key-limits.map"),
    )
    for name in ("__frontdoor_bufsize", "__frontdoor_period_s"):  # the derived values the template reads
        role_vars[name] = env.from_string(role_vars[name]).render(role_vars).strip()
    for template, dest in (
        ("api-keys.map.j2", "api-keys.map"),
        ("api-key-limits.map.j2", "api-key-limits.map"),
        ("haproxy.cfg.j2", "haproxy.cfg"),
    ):
        text = env.from_string((FRONTDOOR / "templates" / template).read_text(encoding="utf-8")).render(
            role_vars
        )
        (base / dest).write_text(text, encoding="utf-8")
    cfg = base / "haproxy.cfg"
    text = re.sub(
        r"(?m)^    (daemon|chroot .*|user .*|group .*|stats socket .*|stats timeout .*)\n",
        "",
        cfg.read_text(),
    )
    text = text.replace("log /dev/log local0", f"log {base / 'log.sock'} local0")
    cfg.write_text(text, encoding="utf-8")
    return cfg


class LogSink:
    """The proxy's syslog socket: counts the lines (one per request) and keeps the last one."""

    def __init__(self, path: Path) -> None:
        import socket
        import threading

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.lines, self.last = 0, ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            self.lines += 1
            self.last = data.decode(errors="replace")


def start_frontdoor(base: Path, backend: str, key: str) -> tuple[str, subprocess.Popen, LogSink]:
    """A real HAProxy (Debian's package) in the foreground, TLS with a throwaway CA's certificate."""
    tls = devstack.make_tls(base / "tls")  # ECC P-256, the way roles/pki makes certificates
    shutil.copy(tls["server"], base / "frontdoor.pem")
    shutil.copy(tls["server_key"], base / "frontdoor.pem.key")  # loaded beside the certificate, as on hosts
    port = devstack.free_port()
    cfg = render_frontdoor(base, backend, port, key)
    sink = LogSink(base / "log.sock")
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    subprocess.run([haproxy, "-c", "-q", "-f", str(cfg)], check=True)
    proc = subprocess.Popen(
        [haproxy, "-db", "-f", str(cfg)],
        stdout=(base / "haproxy.out").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, as devstack.stop_process expects
    )
    url = f"https://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            r = requests.post(
                url + "/api/v1/predict", json={"row": ROW}, headers={"X-API-Key": key},
                verify=tls["ca"], timeout=10,
            )  # fmt: skip
            if r.status_code == 200:
                break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"HAProxy did not answer a prediction; see {base / 'haproxy.out'}")
        time.sleep(0.3)
    # Without the key: the proxy answers 401 itself (the check is on the measured path).
    status = requests.post(
        url + "/api/v1/predict", json={"row": ROW}, verify=tls["ca"], timeout=10
    ).status_code
    if status != 401:
        raise RuntimeError(f"HAProxy let a request without a key through ({status})")
    return url, proc, sink


def front_door(args, base: Path, rabbit, model_dir: Path, common: dict[str, str], procs: list) -> dict:
    """Direct gunicorn beside HAProxy (TLS, API key, limits, buffering) in front of the same gunicorn,
    alternating rounds (the order flips every round): single rows, then batches."""
    import secrets

    url, web, workers = start_stack(
        base,
        rabbit.url,
        model_dir,
        "bench.frontdoor",
        args.workers,
        MODELSERVE_WORKER_POOL="threads",
        **common,
    )
    procs += [web, *workers]
    key = secrets.token_urlsafe(32)
    proxied, haproxy, sink = start_frontdoor(base, url.removeprefix("http://"), key)
    procs.append(haproxy)
    scripts = {
        "single": {
            "direct": lua_script(base / "fd-single.lua", {"row": ROW}),
            "proxied": lua_script(base / "fd-single-key.lua", {"row": ROW}, {"X-API-Key": key}),
        },
        "batch": {
            "direct": lua_script(base / "fd-batch.lua", {"rows": [ROW] * args.batch_rows}),
            "proxied": lua_script(
                base / "fd-batch-key.lua", {"rows": [ROW] * args.batch_rows}, {"X-API-Key": key}
            ),
        },
    }
    targets = {"direct": url, "proxied": proxied}
    run_wrk(url + "/api/v1/predict", scripts["single"]["direct"], args.concurrency, 2)  # warm-up
    run_wrk(proxied + "/api/v1/predict", scripts["single"]["proxied"], args.concurrency, 2)
    pids = {
        "web": [web.pid],
        "worker": [p.pid for p in workers],
        "broker": [rabbit.proc.pid],
        "haproxy": [haproxy.pid],
    }
    runs: dict[str, list[dict]] = {}
    logged = sink.lines
    for kind, concurrency in (("single", args.concurrency), ("batch", args.batch_concurrency)):
        for i in range(args.ab_rounds):
            for mode in ("direct", "proxied") if i % 2 == 0 else ("proxied", "direct"):
                name = f"{kind} {mode}"
                print(f"front door: {name}, {concurrency} clients, round {i + 1} ...", flush=True)
                before = cpu_seconds(pids)
                r = run_wrk(
                    targets[mode] + "/api/v1/predict", scripts[kind][mode], concurrency, args.duration
                )
                after = cpu_seconds(pids)
                r["cpu"] = {k: after[k] - before[k] for k in after}
                runs.setdefault(name, []).append(r)
    results = {
        name: merge_runs(rounds, 1 if name.startswith("single") else args.batch_rows)
        for name, rounds in runs.items()
    }
    results["_log"] = {"lines": sink.lines - logged, "last": sink.last}
    return results


def print_front_door(results: dict, args) -> None:
    log = results.pop("_log")
    print()
    columns = ("req/s", 10), ("p50 ms", 10), ("p99 ms", 10), ("pred/s", 12), ("non-2xx", 9), ("requests", 10)
    print(f"{'front door':<20}" + "".join(f"{c:>{w}}" for c, w in columns))
    for name, r in results.items():
        print(
            f"{name:<20}{r['rps']:>10.1f}{r['p50']:>10.1f}{r['p99']:>10.1f}{r['predictions_per_s']:>12.0f}"
            f"{r['non2xx']:>9}{r['requests']:>10}"
        )
    labels = {
        "single": f"single rows, {args.concurrency} clients",
        "batch": f"{args.batch_rows}-row batches, {args.batch_concurrency} clients",
    }
    for kind, label in labels.items():
        d, p = results[f"{kind} direct"], results[f"{kind} proxied"]
        print(
            f"\nproxied / direct, {label} ({args.ab_rounds} alternating rounds): "
            f"req/s {p['rps'] / d['rps']:.1%} (per round: "
            + ", ".join(f"{a / b:.1%}" for a, b in zip(p["rounds_rps"], d["rounds_rps"], strict=True) if b)
            + f"), p99 {p['p99'] / d['p99']:.2f}x ({p['p99']:.1f} vs {d['p99']:.1f} ms), "
            f"p50 {p['p50']:.1f} vs {d['p50']:.1f} ms"
        )
        per = {
            mode: ", ".join(f"{k} {v * 1000 / max(1, r['requests']):.3f}" for k, v in r["cpu"].items())
            for mode, r in (("direct", d), ("proxied", p))
        }
        print("  CPU ms per request: " + "; ".join(f"{mode}: {text}" for mode, text in per.items()))
    print(
        f"\nwrk keeps its connections alive (one TLS handshake per connection, then requests on it); "
        f"HAProxy logged {log['lines']} requests over the measured rounds; the last: {log['last'][-160:]!r}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument("--concurrency", type=int, default=32, help="wrk connections for single rows")
    parser.add_argument("--batch-rows", type=int, default=500, help="rows per request in the batched run")
    parser.add_argument("--batch-concurrency", type=int, default=8)
    parser.add_argument(
        "--ab-rounds", type=int, default=2, help="alternating rounds over the stacks (single rows, batches)"
    )
    parser.add_argument("--workers", type=int, default=1, help="Celery worker processes (optimised)")
    parser.add_argument("--web-workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument(
        "--queue-types",
        default="quorum,classic",
        help="stacks to run, in order: quorum, classic, with +tls for AMQP over TLS (default quorum,classic;"
        " each is compared with the last)",
    )
    parser.add_argument(
        "--drift-rounds",
        type=int,
        default=2,
        help="alternating single-row rounds with drift detection on and off (issue 16; 0: none)",
    )
    parser.add_argument("--drift-only", action="store_true", help="only the drift on/off rounds")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument(
        "--front-door",
        action="store_true",
        help="only direct gunicorn beside HAProxy of roles/frontdoor (TLS, API key) in front (issue 15)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("bench_app: wrk not found (apt-get install wrk)", file=sys.stderr)
        return 2
    if not devstack.rabbitmq_available():
        print("bench_app: rabbitmq-server not found (apt-get install rabbitmq-server)", file=sys.stderr)
        return 2

    # A stack: a task queue type, with "+tls" for AMQP over TLS (verify_peer, client certificates),
    # as the rabbitmq role serves it; without, plain AMQP on loopback, as before issue 14.
    queue_types = [t.strip() for t in args.queue_types.split(",") if t.strip()]
    if not queue_types or not set(queue_types) <= {"quorum", "classic", "quorum+tls", "classic+tls"}:
        print("bench_app: --queue-types takes quorum, classic, quorum+tls, classic+tls", file=sys.stderr)
        return 2
    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="modelserve-bench-"))
    model_dir = base / "models"
    devstack.install_release(model_dir, SEED)
    release.activate(model_dir, "1.0.0")
    rabbit = devstack.RabbitMQ(base / "rabbitmq")
    procs: list[subprocess.Popen] = []
    results: dict[str, dict] = {}
    try:
        print(f"starting private RabbitMQ on 127.0.0.1:{rabbit.port} ...", flush=True)
        rabbit.start()
        common = {"MODELSERVE_WEB_WORKERS": str(args.web_workers), "MODELSERVE_MAX_BATCH_ROWS": "1000"}
        single = lua_script(base / "single.lua", {"row": ROW})
        batch = lua_script(base / "batch.lua", {"rows": [ROW] * args.batch_rows})
        metrics = ""
        oip = oip_binary_script(base / "oip.lua", [ROW] * args.batch_rows)
        if args.front_door:
            front_door_results = front_door(args, base, rabbit, model_dir, common, procs)
            args.drift_only, args.drift_rounds, args.skip_naive = True, 0, True  # nothing else
        # Every stack of --queue-types up at once on the one broker, then driven in alternating
        # rounds (forward, then reversed): none is measured first on a cold machine (measured one
        # after another, the first stack lost 10-20%), and load from elsewhere weighs on all alike.
        stacks: dict[str, tuple] = {}
        for queue_type in [] if args.drift_only else queue_types:
            tls = queue_type.endswith("+tls")
            url, web, workers = start_stack(
                base,
                rabbit.urls(tls=tls),
                model_dir,
                f"bench.{queue_type.replace('+', '-')}",
                args.workers,
                MODELSERVE_WORKER_POOL="threads",
                MODELSERVE_TASK_QUEUE_TYPE=queue_type.removesuffix("+tls"),
                **(rabbit.tls_env() if tls else {}),
                **common,
            )
            procs += [web, *workers]
            requests.post(url + "/api/v1/predict", json={"row": ROW}, timeout=10).raise_for_status()
            run_wrk(url + "/api/v1/predict", single, args.concurrency, 2)  # warm-up
            stacks[queue_type] = (url, web, workers)
        runs: dict[str, list[dict]] = {}
        for i in range(args.ab_rounds):
            for queue_type, (url, web, workers) in in_turn(stacks, i):
                pids = {"web": [web.pid], "worker": [p.pid for p in workers], "broker": [rabbit.proc.pid]}
                # Single rows, then /api/v1 JSON batches and the same rows through the Open Inference
                # Protocol, binary in and out (no JSON numbers).
                targets = [
                    (f"{queue_type} single-row", url + "/api/v1/predict", single, args.concurrency),
                    (
                        f"{queue_type} batch x{args.batch_rows}",
                        url + "/api/v1/predict",
                        batch,
                        args.batch_concurrency,
                    ),
                    (
                        f"{queue_type} OIP binary x{args.batch_rows}",
                        url + "/v2/models/pima-diabetes/infer",
                        oip,
                        args.batch_concurrency,
                    ),
                ]
                for name, target, script, clients in targets:
                    print(f"{name}, {clients} clients, {args.duration}s, round {i + 1} ...", flush=True)
                    before = cpu_seconds(pids)
                    r = run_wrk(target, script, clients, args.duration)
                    after = cpu_seconds(pids)
                    r["cpu"] = {k: after[k] - before[k] for k in after}
                    runs.setdefault(name, []).append(r)
        for name, rounds in runs.items():
            results[name] = merge_runs(rounds, 1 if name.endswith("single-row") else args.batch_rows)
        for url, web, workers in stacks.values():
            metrics += requests.get(url + "/metrics", timeout=5).text
            for proc in (web, *workers):
                devstack.stop_process(proc, timeout=3, sig=signal.SIGINT if proc is web else signal.SIGQUIT)

        if args.drift_rounds:
            # Two stacks side by side, drift on (the default window) and off (MODELSERVE_DRIFT_WINDOW=0),
            # driven in alternating rounds: load from elsewhere weighs on both alike.
            stacks = {}
            for mode, window in (("drift on", "1000"), ("drift off", "0")):
                url, web, workers = start_stack(
                    base, rabbit.urls(), model_dir, f"bench.{mode.replace(' ', '-')}", args.workers,
                    MODELSERVE_WORKER_POOL="threads", MODELSERVE_DRIFT_WINDOW=window, **common,
                )  # fmt: skip
                procs += [web, *workers]
                requests.post(url + "/api/v1/predict", json={"row": ROW}, timeout=10).raise_for_status()
                run_wrk(url + "/api/v1/predict", single, args.concurrency, 2)  # warm-up
                stacks[mode] = (url, web, workers)
            drift_runs: dict[str, list[dict]] = {f"single-row, {mode}": [] for mode in stacks}
            for i in range(args.drift_rounds):
                for mode, (url, web, workers) in in_turn(stacks, i):
                    print(f"single rows, {mode}, round {i + 1} ...", flush=True)
                    pids = {"web": [web.pid], "worker": [p.pid for p in workers]}
                    before = cpu_seconds(pids)
                    r = run_wrk(url + "/api/v1/predict", single, args.concurrency, args.duration)
                    after = cpu_seconds(pids)
                    r["cpu"] = {k: after[k] - before[k] for k in pids}
                    drift_runs[f"single-row, {mode}"].append(r)
            for name, rounds in drift_runs.items():
                results[name] = merge_runs(rounds, 1)
            on_url = stacks["drift on"][0]
            drift_state = requests.get(on_url + "/api/v1/model", timeout=10).json().get("drift", {})
            for _url, web, workers in stacks.values():
                for proc in (web, *workers):
                    devstack.stop_process(
                        proc, timeout=3, sig=signal.SIGINT if proc is web else signal.SIGQUIT
                    )

        if not args.skip_naive and not args.drift_only:
            # The same web with micro-batching off (one task per request, none held back) in front
            # of a worker that loads model.keras for every task (app/tests/ms_naive.py).
            url, web, workers = start_stack(
                base, rabbit.urls(), model_dir, "bench.naive", 1, naive=True,
                MODELSERVE_BATCH_MAX_ROWS="1", MODELSERVE_BATCH_MAX_INFLIGHT=str(max(2, args.concurrency)),
                MODELSERVE_TASK_TIMEOUT="60", MODELSERVE_WORKER_CONCURRENCY="1", **common,
            )  # fmt: skip
            procs += [web, *workers]
            print("naive: warm-up (TensorFlow import in the worker) ...", flush=True)
            requests.post(url + "/api/v1/predict", json={"row": ROW}, timeout=120).raise_for_status()
            print(f"naive: single rows, {args.concurrency} clients, {args.duration}s ...", flush=True)
            results["naive single-row"] = run_wrk(
                url + "/api/v1/predict", single, args.concurrency, args.duration
            )
            for proc in (web, *workers):
                devstack.stop_process(proc, timeout=3, sig=signal.SIGINT if proc is web else signal.SIGQUIT)
    finally:
        for proc in procs:
            with contextlib.suppress(Exception):  # the broker is stopped whatever happens here
                devstack.stop_process(proc, timeout=3, sig=signal.SIGKILL)
        rabbit.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    if args.front_door:
        print_front_door(front_door_results, args)
        print(f"total bench time {time.monotonic() - started:.0f}s; cores: {len(os.sched_getaffinity(0))}")
        return 0
    batch_sizes = re.findall(
        r'modelserve_batch_rows_(sum|count)\{task="modelserve.predict"\} ([\d.e+]+)', metrics
    )
    rows_sum = sum(float(v) for k, v in batch_sizes if k == "sum")
    tasks = sum(float(v) for k, v in batch_sizes if k == "count")
    print()
    print(
        f"{'mode':<26}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'pred/s':>12}{'non-2xx':>9}{'requests':>10}"
    )
    for name, r in results.items():
        preds = r.get("predictions_per_s", r["rps"])
        print(
            f"{name:<26}{r['rps']:>10.1f}{r['p50']:>10.1f}{r['p99']:>10.1f}{preds:>12.0f}{r['non2xx']:>9}{r['requests']:>10}"
        )
    first = f"{queue_types[0]} single-row"
    if args.drift_rounds:
        on, off = results["single-row, drift on"], results["single-row, drift off"]
        print(
            f"\ndrift on / off (single rows, same run, {args.drift_rounds} alternating rounds): "
            f"{on['rps'] / off['rps']:.1%} of the req/s (p99 {on['p99']:.1f} vs {off['p99']:.1f} ms);"
            " per round: "
            + ", ".join(f"{a / b:.1%}" for a, b in zip(on["rounds_rps"], off["rounds_rps"], strict=True) if b)
            + f"; the drift stack's window at the end: {drift_state.get('rows')} rows,"
            f" {len(drift_state.get('columns') or {})} columns reported"
        )
        print(
            "CPU ms per single-row request (what load from elsewhere disturbs less): "
            + "; ".join(
                f"{mode}: "
                + ", ".join(f"{k} {v * 1000 / max(1, r['requests']):.3f}" for k, v in r["cpu"].items())
                for mode, r in (("drift on", on), ("drift off", off))
            )
        )
    if "naive single-row" in results and results["naive single-row"]["rps"] > 0:
        ratio = results[first]["rps"] / results["naive single-row"]["rps"]
        print(f"\noptimised ({queue_types[0]}) / naive (single rows, same run): {ratio:.0f}x")
    # Every stack beside the last one named (e.g. --queue-types quorum+tls,quorum,classic: today's
    # production path, then without TLS, each against the classic queue in clear of before).
    stacks = [] if args.drift_only else queue_types
    for name in stacks[:-1]:
        base_name = stacks[-1]
        q, c = results[f"{name} single-row"], results[f"{base_name} single-row"]
        qb, cb = results[f"{name} batch x{args.batch_rows}"], results[f"{base_name} batch x{args.batch_rows}"]
        print(
            f"{name} / {base_name} (same run): single-row req/s {q['rps'] / c['rps']:.1%}, "
            f"p99 {q['p99']:.1f} vs {c['p99']:.1f} ms; batched pred/s "
            f"{qb['predictions_per_s'] / max(1e-9, cb['predictions_per_s']):.1%}; single-row per round: "
            + ", ".join(f"{a / b:.1%}" for a, b in zip(q["rounds_rps"], c["rounds_rps"], strict=True) if b)
        )
    for queue_type in [] if args.drift_only else queue_types:
        json_name = f"{queue_type} batch x{args.batch_rows}"
        oip_name = f"{queue_type} OIP binary x{args.batch_rows}"
        json_batch, oip_batch = results[json_name], results[oip_name]
        if not json_batch["rps"]:
            continue
        print(
            f"\n{queue_type}: OIP binary / /api/v1 JSON ({args.batch_rows}-row batches, same rows and run): "
            f"{oip_batch['predictions_per_s']:.0f} / {json_batch['predictions_per_s']:.0f} predictions/s = "
            f"{oip_batch['rps'] / json_batch['rps']:.2f}x; per round: "
            + ", ".join(
                f"{o / j:.2f}x"
                for o, j in zip(oip_batch["rounds_rps"], json_batch["rounds_rps"], strict=True)
                if j
            )
        )
        print(f"CPU ms per {args.batch_rows}-row request, by component (what the 2 cores were spent on):")
        print(f"  {'mode':<32}" + "".join(f"{k:>9}" for k in (*json_batch["cpu"], "total")))
        for name in (json_name, oip_name):
            r = results[name]
            per = [v * 1000 / max(1, r["requests"]) for v in r["cpu"].values()]
            print(f"  {name:<32}" + "".join(f"{v:>9.2f}" for v in (*per, sum(per))))
    if tasks:
        print(
            f"micro-batching: {rows_sum / tasks:.1f} rows per Celery task on average "
            "over the optimised runs (web /metrics)"
        )
    for name, r in results.items():
        if r["socket_errors"]:
            print(f"{name}: socket errors: {r['socket_errors']}")
    print(f"total bench time {time.monotonic() - started:.0f}s; cores: {len(os.sched_getaffinity(0))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
