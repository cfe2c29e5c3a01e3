#!/usr/bin/env bash
# The test command of pgmesh (the README's and CI's): one build, every test, then the
# short forms of the benchmarks. Options (environment):
#   PGMESH_CHAOS=1    long chaos variants of the fault tests
#   PGMESH_BENCH=0    skip the short benchmark runs
#   PGMESH_LINT=0     skip cargo fmt --check and clippy
#   PGMESH_TEST_DATABASE_URL  database for the unit tests that need one [a scratch cluster]
#   PGMESH_REQUIRE_NETNS=1  the partition test fails, not skips, without network
#                     namespaces [1 when this machine can create one]
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*" >&2; }

if [ "${PGMESH_LINT:-1}" = 1 ]; then
  log "cargo fmt --check"
  cargo fmt --all -- --check
  log "cargo clippy --all-targets -- -D warnings"
  cargo clippy --workspace --all-targets -q -- -D warnings
fi

log "build (one build shared by every test)"
cargo build --workspace --all-targets -q

out=$(mktemp)
# A scratch PostgreSQL for the unit tests that need a real database (they read
# PGMESH_TEST_DATABASE_URL and would otherwise skip themselves).
source bench/lib.sh
PGBIN_DIR="$(pg_bindir)"
scratch="$(mktemp -d)"
is_root && chown postgres "$scratch"
cleanup() {
  pg_cluster_stop "$PGBIN_DIR" "$scratch/data"
  rm -rf "$out" "$scratch"
}
trap cleanup EXIT
if [ -z "${PGMESH_TEST_DATABASE_URL:-}" ]; then
  log "scratch PostgreSQL for the unit tests that need a database"
  port="$(free_ports 1)"
  pg_cluster_create "$PGBIN_DIR" "$scratch/data" "$port" "wal_level = logical"
  pg_cluster_start "$PGBIN_DIR" "$scratch/data" "$scratch/pg.log"
  export PGMESH_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
fi
# The partition test needs network namespaces: where this machine can make one,
# it must run rather than skip.
if [ -z "${PGMESH_REQUIRE_NETNS:-}" ] && is_root && command -v ip >/dev/null 2>&1; then
  probe="pgmesh-probe-$$"
  if ip netns add "$probe" 2>/dev/null && ip netns exec "$probe" true 2>/dev/null; then
    ip netns del "$probe"
    export PGMESH_REQUIRE_NETNS=1
  else
    ip netns del "$probe" 2>/dev/null || true
    log "no network namespaces on this machine: the partition test will skip"
  fi
fi
log "cargo test --workspace"
set +e
cargo test --workspace -q 2>&1 | tee "$out"
status=${PIPESTATUS[0]}
set -e

passed=$(grep -Eo '[0-9]+ passed' "$out" | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$out" | awk '{s+=$1} END {print s+0}')

if [ "$status" = 0 ] && [ "${PGMESH_BENCH:-1}" = 1 ]; then
  log "benchmarks, short form (figures only, no thresholds)"
  cargo build --release -p pgmesh-proxy -q
  export PGMESH_BIN="$PWD/target/release/pgmesh" BENCH_FAST=1 BENCH_OUT="${BENCH_OUT:-target/bench-results}"
  BENCH_SECONDS=2 bench/proxy.sh || status=$?
  BENCH_SECONDS=3 bench/capture.sh || status=$?
  if [ -x bench/replication.sh ]; then BENCH_SECONDS=5 BENCH_BACKLOG=2000 bench/replication.sh || status=$?; fi
fi

echo
echo "tests: $passed passed, $failed failed"
exit "$status"
