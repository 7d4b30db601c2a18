#!/usr/bin/env python3
"""Push-to-serving latency of model delivery by `git push`, on the running `local` cluster.

For each of --pushes releases the development host (ms-dev) makes a new version of the model it
last trained (re-versioned, not retrained, so the figure is the delivery path alone: pre-receive
validation, fan-out to every worker, atomic switch), commits it and pushes it to production. From
the controller, a steady load of single-row predictions runs on http://127.0.0.1:8080 the whole
time. Printed per push and summarised:

  push s      how long `git push` took (the hooks run inside it: validate, fan out, switch, wait)
  first new   push start -> first prediction answered by the new version
  all new     push start -> the last prediction answered by the old version (after it: only new)
  failed      requests that did not get a 200 while that push was in flight

Figures are printed, never asserted. Needs `scripts/local-cluster up` first. Each run leaves
production serving a higher version; `playbooks/rollback.yml` steps back one at a time.

  .venv/bin/python bench/bench_push.py [--pushes 5] [--clients 4]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

ROW = [6, 148, 72, 35, 0, 33.6, 0.627, 50]
# Re-version the release in the working repository, as a data scientist would after retraining.
# A fresh development host has no release yet: it trains one first (not timed).
BUMP = """if [ ! -f release/metadata.json ]; then
  sed -i 's/^MODEL_VERSION=.*/MODEL_VERSION={version}/' params.env && ./train.sh >/dev/null
fi
python3 - <<'EOF'
import json, pathlib
meta_path = pathlib.Path('release/metadata.json')
meta = json.loads(meta_path.read_text())
meta['version'] = {version!r}
meta_path.write_text(json.dumps(meta, indent=2))
EOF
git add -A && git commit -q -m 'Model {version} (bench)'"""


def dev(container: str, workdir: str, user: str, cmd: str) -> subprocess.CompletedProcess:
    inner = f"cd {shlex.quote(workdir)} && {cmd}"
    return subprocess.run(
        ["docker", "exec", container, "su", "-", user, "-c", inner],
        capture_output=True,
        text=True,
        check=False,
    )


def get_json(url: str, body: dict | None = None, timeout: float = 5.0) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, {}
    except (OSError, ValueError):
        return 0, {}


def bump(version: str) -> str:
    major, minor, patch = (int(p) for p in version.split("."))
    return f"{major}.{minor}.{patch + 1}"


class Load:
    """Steady single-row predictions from a few client threads; every answer is recorded."""

    def __init__(self, url: str, clients: int) -> None:
        self.url = f"{url}/api/v1/predict"
        self.answers: list[tuple[float, int, str]] = []  # (monotonic time, status, model_version)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]

    def run(self) -> None:
        while not self.stop.is_set():
            status, body = get_json(self.url, {"rows": [ROW]}, timeout=10)
            with self.lock:
                self.answers.append((time.monotonic(), status, body.get("model_version", "")))
            time.sleep(0.01)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def window(self, t0: float, t1: float) -> list[tuple[float, int, str]]:
        with self.lock:
            return [a for a in self.answers if t0 <= a[0] <= t1]


def _figure(pattern: str, text: str) -> float:
    """A duration the hook printed in the push's output (nan if it did not)."""
    match = re.search(pattern, text)
    return float(match.group(1)) if match else float("nan")


def count_workers() -> int:
    names = subprocess.run(
        ["docker", "ps", "--filter", "label=modelserve.environment=local", "--format", "{{.Names}}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    return sum(1 for name in names if "worker" in name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pushes", type=int, default=5)
    ap.add_argument("--clients", type=int, default=4, help="load threads sending predictions")
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--dev-host", default="ms-dev")
    ap.add_argument("--dev-user", default="mlops")
    ap.add_argument("--workdir", default="/home/mlops/models")
    ap.add_argument("--timeout", type=float, default=60.0, help="give up on a push after this")
    args = ap.parse_args()

    status, info = get_json(f"{args.url}/api/v1/model")
    if status != 200:
        print(f"bench_push: {args.url} does not answer (run scripts/local-cluster up first)", file=sys.stderr)
        return 1
    served = info["version"]
    print(
        f"served before: {served}; {count_workers()} workers; {args.pushes} pushes; "
        f"{args.clients} load clients on {args.url}"
    )

    rows = []
    with Load(args.url, args.clients) as load:
        time.sleep(1.0)
        for _ in range(args.pushes):
            version = bump(served)
            made = dev(args.dev_host, args.workdir, args.dev_user, BUMP.format(version=version))
            if made.returncode != 0:
                print(f"bench_push: could not commit {version}: {made.stderr}", file=sys.stderr)
                return 1
            t0 = time.monotonic()
            pushed = dev(args.dev_host, args.workdir, args.dev_user, "git push production HEAD:main 2>&1")
            t_push = time.monotonic()
            if pushed.returncode != 0:
                print(f"bench_push: push of {version} refused:\n{pushed.stdout}", file=sys.stderr)
                return 1
            while get_json(f"{args.url}/api/v1/model")[1].get("version") != version:
                if time.monotonic() - t0 > args.timeout:
                    print(f"bench_push: {version} not served after {args.timeout} s", file=sys.stderr)
                    return 1
                time.sleep(0.02)
            time.sleep(1.5)  # let the old version's last in-flight answers arrive
            t_end = time.monotonic()
            answers = load.window(t0, t_end)
            new = [t for t, s, v in answers if s == 200 and v == version]
            old = [t for t, s, v in answers if s == 200 and v != version]
            rows.append(
                {
                    "version": version,
                    "push": t_push - t0,
                    "first_new": (min(new) - t0) if new else float("nan"),
                    "all_new": (max(old) - t0) if old else 0.0,
                    "gate": _figure(r"; ([0-9.]+) s\), deploying", pushed.stdout),
                    "fan_out": _figure(r"each confirmed it serves it after ([0-9.]+) s", pushed.stdout),
                    "requests": len(answers),
                    "failed": sum(1 for _, s, _ in answers if s != 200),
                }
            )
            served = version

    print()
    head = (
        ("push", 4), ("version", 9), ("push s", 7), ("gate s", 6), ("fan-out s", 9),
        ("first new s", 11), ("all new s", 9), ("requests", 8),
    )  # fmt: skip
    print(" ".join(f"{name:>{width}}" for name, width in head), f"{'failed':>6}")
    for i, r in enumerate(rows, 1):
        print(
            f"{i:>4} {r['version']:>9} {r['push']:>7.2f} {r['gate']:>6.1f} {r['fan_out']:>9.1f}"
            f" {r['first_new']:>11.2f} {r['all_new']:>9.2f} {r['requests']:>8} {r['failed']:>6}"
        )
    print()
    print(f"median push -> first new-version answer: {statistics.median(r['first_new'] for r in rows):.2f} s")
    print(f"median push -> only new-version answers: {statistics.median(r['all_new'] for r in rows):.2f} s")
    print(f"median git push duration (hooks incl.):  {statistics.median(r['push'] for r in rows):.2f} s")
    failed, requests = sum(r["failed"] for r in rows), sum(r["requests"] for r in rows)
    print(f"failed requests during the switches:     {failed} of {requests}")
    print("target (issue 13): every worker on the new release <= 2 s median with 3 workers, zero failures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
