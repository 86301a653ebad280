#!/usr/bin/env bash
# Run the LSA experiments one at a time, logging to runs/lsa/logs/ (priority order E1, E3, E2, then the cheap
# evaluation-only E5 and E2-on-passkey, then E4). Pass --full to run the documented full-size versions.
# Finished training stages are skipped, so an interrupted run_all.sh can simply be started again.
set -u
cd "$(dirname "$0")/../.."
mkdir -p runs/lsa/logs
run() {
  local name=$1; shift
  local start=$(date +%s)
  .venv/bin/python "scripts/lsa_experiments/$name.py" "$@" > "runs/lsa/logs/$name${LOGSUFFIX:-}.log" 2>&1
  echo "$name $* rc=$? wall=$(( $(date +%s) - start ))s" | tee -a runs/lsa/logs/run_all.txt
}
run e1_passkey_parity "$@"
run e3_trailing_loss "$@"
run e2_budget_split "$@"
LOGSUFFIX=_passkey run e2_budget_split --task passkey "$@"
run e5_yarn "$@"
run e4_cross_layer "$@"
