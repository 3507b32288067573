#!/usr/bin/env bash
# CI entry point: bring the dev cluster up (reusing the build cache when
# present), run the cluster tests (pytest marker `cluster`), bring it down.
#   CRUCIBLE_CLUSTER_KEEP=1  leave the cluster running afterwards
#   CRUCIBLE_CLUSTER_FRESH=0 keep the existing cluster state (default: down --purge first)
#   extra arguments are passed to pytest
set -uo pipefail
HERE=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
cd "$REPO"
t0=$(date +%s%3N)
# A fresh cluster state for every run (the build cache is kept): nothing left
# over from earlier runs or other users. CRUCIBLE_CLUSTER_FRESH=0 skips this.
if [ "${CRUCIBLE_CLUSTER_FRESH:-1}" = 1 ]; then
  "$HERE/cluster" down --purge || true
fi
if ! "$HERE/cluster" up; then
  echo "cluster up failed; logs:" >&2
  for f in "${CRUCIBLE_CLUSTER_STATE:-/var/lib/crucible-cluster}"/logs/*.log; do
    echo "===== $f" >&2; tail -40 "$f" >&2
  done
  "$HERE/cluster" down || true
  exit 1
fi
echo "cluster up after $(( ($(date +%s%3N) - t0) / 1000 ))s" >&2
export CRUCIBLE_CLUSTER_REQUIRED=1 CRUCIBLE_CLUSTER_ALLOW_RESTART=1
# --confcutdir: the cluster tests need none of the project's other fixtures.
# PytestConfigWarning: pyproject's pytest-asyncio/-timeout options are unknown
# when those plugins are not installed (filterwarnings=error would abort).
python3 -m pytest -m cluster -v -p no:cacheprovider --confcutdir="$REPO/tests/cluster" \
  -W ignore::pytest.PytestConfigWarning "$REPO/tests/cluster" "$@"
rc=$?
if [ "${CRUCIBLE_CLUSTER_KEEP:-0}" != 1 ]; then
  "$HERE/cluster" down || rc=1
fi
exit $rc
