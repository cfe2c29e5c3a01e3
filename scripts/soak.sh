#!/usr/bin/env bash
# Runs one e2e test again and again, to catch a failure that shows in a few percent of
# runs. It copies the debug test binary and `pgmesh` first, so editing or rebuilding
# the sources while it runs does not change what is tested.
#
#   scripts/soak.sh TEST_PATH [RUNS]
#   e.g. scripts/soak.sh mesh_chaos::the_mesh_converges_and_loses_nothing_through_a_run_of_faults 200
#
# Options (environment):
#   SOAK_LOOPS=2    loops running at once
#   SOAK_LOAD=1     busy CPU hogs running beside them (slows the nodes down)
#   SOAK_OUT=DIR    where each failed run's output is kept [a new temporary directory]
#   SOAK_TIMEOUT=S  a run still going after S seconds is killed and counts as failed [600]
# Prints one line per run; exits 1 if any run failed.
set -euo pipefail
cd "$(dirname "$0")/.."

test_name="${1:?usage: scripts/soak.sh TEST_NAME [RUNS]}"
runs="${2:-100}"
loops="${SOAK_LOOPS:-2}"
hogs="${SOAK_LOAD:-1}"
out="${SOAK_OUT:-$(mktemp -d)}"
mkdir -p "$out"

cargo build -p pgmesh-proxy -q
exe=$(cargo test -p pgmesh-tests --test e2e --no-run --message-format=json -q 2>/dev/null |
  sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
[ -x "$exe" ] || { echo "soak: no e2e test binary" >&2; exit 2; }
cp "$exe" "$out/e2e"
cp target/debug/pgmesh "$out/pgmesh"
echo "soak: $runs runs of $test_name in $loops loops, $hogs CPU hogs; output in $out" >&2

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
for _ in $(seq 1 "$hogs"); do
  (while :; do :; done) &
  pids+=($!)
done

next="$out/next"
echo 1 >"$next"
claim() { # prints the next run number, or nothing when all are claimed
  (
    flock 9
    n=$(cat "$next")
    [ "$n" -le "$runs" ] || exit 0
    echo $((n + 1)) >"$next"
    echo "$n"
  ) 9>"$out/lock"
}
loop() {
  while n=$(claim) && [ -n "$n" ]; do
    log="$out/run-$n.log"
    start=$(date +%s)
    PGMESH_BIN="$out/pgmesh" timeout "${SOAK_TIMEOUT:-600}" "$out/e2e" --exact "$test_name" >"$log" 2>&1 || true
    if grep -q "test result: ok. 1 passed" "$log"; then
      echo "run $n: ok ($(($(date +%s) - start)) s)"
      rm -f "$log"
      continue
    fi
    echo "run $n: FAILED ($(($(date +%s) - start)) s), output in $log"
  done
}
workers=()
for _ in $(seq 1 "$loops"); do
  loop &
  workers+=($!)
done
wait "${workers[@]}"
failed=$(find "$out" -name "run-*.log" | wc -l)
echo "soak: $runs runs, $failed failed" >&2
[ "$failed" = 0 ]
