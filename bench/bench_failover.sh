#!/usr/bin/env bash
# Broker faults under a steady load (issue 14): per fault, the requests sent, answered 200, answered
# 503 (a clear answer a client retries), failed, and the longest gap without a 200, as a table.
# Prints figures; asserts nothing beyond what the test itself does.
#
# It brings up the `rabbitmq` Molecule scenario (three brokers, TLS, the real roles), runs the app's
# web and a Celery worker on this machine against it, and runs the faults of
# molecule/rabbitmq/tests/test_rabbitmq_faults.py once: the clients' node stopped for 20 s, another
# node's Erlang VM killed, the clients' node cut off by its firewall; then the rolling restart of
# test_rolling_restart.py (the broker play, one node at a time, each drained first).
#   bench/bench_failover.sh           converge, faults, rolling restart, destroy (about 20 minutes on 2 cores)
#   bench/bench_failover.sh --keep    leave the brokers up (a second run skips the converge)
set -euo pipefail
cd "$(dirname "$0")/.."
keep=false; [ "${1:-}" = --keep ] && keep=true
scripts/bootstrap --test >/dev/null
export PATH="$PWD/.venv/bin:$PATH" ANSIBLE_COLLECTIONS_PATH="$PWD/.cache/collections"
report=$(mktemp --suffix=.jsonl)
log=$(mktemp)

molecule converge -s rabbitmq >"$log" 2>&1 || { cat "$log"; exit 1; }
# Only the fault and rolling-restart tests (by their names: -k also matches directory names), now
# (they otherwise wait for the scenario's side_effect), their prints shown.
rc=0
MODELSERVE_FAULTS_NOW=1 MODELSERVE_FAILOVER_REPORT="$report" PYTEST_ADDOPTS="-k 'test_faults_under_steady_load or test_a_config_change_rolls' -s" \
  molecule verify -s rabbitmq >>"$log" 2>&1 || rc=$?
$keep || molecule destroy -s rabbitmq >/dev/null 2>&1 || true

python3 - "$report" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
# detect s: for the partition, when the last node's partition detector disconnected the other side.
print(f"{'fault':<44} {'sent':>6} {'200':>6} {'503':>5} {'failed':>6} {'gap s':>7} {'detect s':>8} {'whole s':>8}")
for r in rows:
    failed = sum(r["failed"].values())
    seen = list(r.get("disconnected_after_s", {}).values())
    detect = "-" if not seen else "never" if None in seen else max(seen)
    print(f"{r['fault']:<44} {r['sent']:>6} {r['ok']:>6} {r['retryable_503']:>5} {failed:>6}"
          f" {r['gap_s']:>7} {detect:>8} {r['s_until_whole']:>8}")
PY
echo "log: $log"
exit $rc
