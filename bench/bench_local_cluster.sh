#!/usr/bin/env bash
# Time the `local` cluster: bare containers -> serving predictions, then a second, no-change run.
# Prints figures; asserts nothing. Targets (issue): first converge <= 180 s, re-run <= 30 s, changed=0.
# The runs use ansible.cfg's strategy (mitogen_linear); a third, no-change run with plain linear
# (ANSIBLE_STRATEGY=linear) shows what Mitogen saves, side by side.
#   bench/bench_local_cluster.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap >/dev/null
export PATH="$PWD/.venv/bin:$PATH"
inv=inventories/local
log=$(mktemp -d)

ansible-playbook -i "$inv" playbooks/local_cluster.yml -e local_cluster_state=absent >/dev/null
t0=$(date +%s.%N)
ansible-playbook -i "$inv" playbooks/local_cluster.yml >"$log/containers.log"
t1=$(date +%s.%N)
ansible-playbook -i "$inv" site.yml >"$log/first.log"
t2=$(date +%s.%N)
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST http://127.0.0.1:8080/api/v1/predict \
  -H 'Content-Type: application/json' -d '{"rows": [[6, 148, 72, 35, 0, 33.6, 0.627, 50]]}')
t3=$(date +%s.%N)
ansible-playbook -i "$inv" site.yml >"$log/second.log"
t4=$(date +%s.%N)
ANSIBLE_STRATEGY=linear ansible-playbook -i "$inv" site.yml >"$log/third-linear.log"
t5=$(date +%s.%N)
changed=$(scripts/recap-changed "$log/second.log")
changed_linear=$(scripts/recap-changed "$log/third-linear.log")

printf '%-44s %8s\n' "measure" "value"
printf '%-44s %7.1fs\n' "containers started (systemd up)" "$(awk "BEGIN{print $t1 - $t0}")"
printf '%-44s %7.1fs\n' "first site.yml (bare -> serving)" "$(awk "BEGIN{print $t2 - $t1}")"
printf '%-44s %8s\n' "first prediction HTTP status" "$code"
printf '%-44s %7.1fs\n' "second site.yml (no change)" "$(awk "BEGIN{print $t4 - $t3}")"
printf '%-44s %8s\n' "second run: changed tasks (sum over hosts)" "$changed"
printf '%-44s %7.1fs\n' "third site.yml (no change), plain linear" "$(awk "BEGIN{print $t5 - $t4}")"
printf '%-44s %8s\n' "third run: changed tasks (sum over hosts)" "$changed_linear"
printf '%-44s %7.2fx\n' "no-change run, linear / mitogen_linear" "$(awk "BEGIN{print ($t5 - $t4) / ($t4 - $t3)}")"
echo "logs: $log"
