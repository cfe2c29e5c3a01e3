#!/usr/bin/env bash
# bench/capture.sh: what capture costs. pgbench TPC-B direct vs. through pgmesh with
# capture vs. direct with a native logical replication subscriber, and capture lag.
#
# A benchmark, not a test: it prints figures next to the targets of issue 3 and never
# fails on them. It creates two fresh PostgreSQL clusters and pgmesh in a temp dir and
# removes everything on exit, whether it succeeds, fails or is interrupted.
# Run with --help for the options.

set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bench/capture.sh [--help]

pgbench TPC-B (-c 8 -j 2, -M simple) against a fresh cluster A (wal_level=logical),
three ways, each measuring only itself:
  direct   pgbench -> A; no pgmesh, no replication slot, no subscriber
  pgmesh   pgbench -> pgmesh run (stamping + capture into mesh.changelog) -> A;
           `pgmesh init` creates slot pgmesh_bench before the run, it is dropped after
  native   pgbench -> A, with a native logical replication subscription from a
           second local cluster B (CREATE SUBSCRIPTION ... WITH (copy_data = false)),
           created before the run and dropped (with its slot) after it
After each pgmesh/native run it waits until capture / the subscriber has caught up
with A (the "drain" column) before the next run starts. With BENCH_REPEAT > 1 the
three configurations are interleaved, in a rotating order, and TPS is the mean.

Then capture lag: pgbench through pgmesh rate-limited (-R) to half the pgmesh TPS,
for the same duration; once capture has caught up, p50/p99/max of
(logged_at - commit_ts) over the mesh.changelog rows committed during that run.

Prints a table and the issue's targets on stdout and writes them to
$BENCH_OUT/capture-<timestamp>.{csv,md}. Progress goes to stderr. A pgbench failure
(non-zero exit, or any failed transaction) aborts the run.

Environment:
  BENCH_SECONDS   seconds per pgbench run (-T)                        [30]
  BENCH_SCALE     pgbench -i scale factor (on A and on B)             [10]
  BENCH_FAST      1: fsync=off (CI form)                              [0: fsync on]
                  synchronous_commit stays on either way: with it off, walsenders
                  only see a commit once the WAL writer flushes it (wal_writer_delay),
                  which would show up as capture lag that is not pgmesh's.
  BENCH_REPEAT    rounds of the three configurations                  [1]
  BENCH_LAG_RATE  -R for the capture-lag run            [half the mean pgmesh TPS]
  BENCH_OUT       directory for the result files                      [bench-results]
  BENCH_PG_CONF   extra postgresql.conf lines for every cluster, separated by ";"
  PGMESH_BIN      pgmesh binary to use; skips `cargo build --release -p pgmesh-proxy`
  PGMESH_PG_BIN   PostgreSQL bin dir  [dir of initdb on PATH, else /usr/lib/postgresql/*/bin]

When run as root, initdb and pg_ctl run as the `postgres` OS user.

Examples:
  bench/capture.sh                                  # full run, ~4 x 30 s + setup
  BENCH_SECONDS=5 BENCH_FAST=1 bench/capture.sh     # short CI form
  BENCH_REPEAT=3 bench/capture.sh                   # 3 interleaved rounds
EOF
}

case "${1:-}" in
    -h | --help)
        usage
        exit 0
        ;;
    "") ;;
    *)
        usage >&2
        exit 2
        ;;
esac

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"

SECS="${BENCH_SECONDS:-30}"
SCALE="${BENCH_SCALE:-10}"
FAST="${BENCH_FAST:-0}"
REPEAT="${BENCH_REPEAT:-1}"
LAG_RATE="${BENCH_LAG_RATE:-}"
OUT="${BENCH_OUT:-bench-results}"
[[ "$SECS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_SECONDS must be a positive integer, got '$SECS'"
[[ "$SCALE" =~ ^[1-9][0-9]*$ ]] || die "BENCH_SCALE must be a positive integer, got '$SCALE'"
[[ "$REPEAT" =~ ^[1-9][0-9]*$ ]] || die "BENCH_REPEAT must be a positive integer, got '$REPEAT'"
[[ -z "$LAG_RATE" || "$LAG_RATE" =~ ^[1-9][0-9]*$ ]] ||
    die "BENCH_LAG_RATE must be a positive integer, got '$LAG_RATE'"

CLIENTS=8
JOBS=2
REGION=bench
MESH_SLOT="pgmesh_$REGION"
MESH_APP="pgmesh-capture-$REGION"
SUB=native_sub # subscription on B, and so the slot and application_name on A
# Waiting for capture or the subscriber to catch up after a run gives up after this.
DRAIN_TIMEOUT=$((SECS * 4 > 120 ? SECS * 4 : 120))

# ---------------------------------------------------------------------------
# Cleanup. Everything started below is recorded here so the EXIT trap can stop it.

TMPD=""
PGMESH_PID=""
PGBENCH_PID=""
A_STARTED=0
B_STARTED=0
PGBIN=""

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    stop_pid "$PGBENCH_PID" 5
    stop_pid "$PGMESH_PID" 5
    # B first: its subscription (if any) connects to A. Slots die with the clusters.
    ((B_STARTED)) && pg_cluster_stop "$PGBIN" "$TMPD/b"
    ((A_STARTED)) && pg_cluster_stop "$PGBIN" "$TMPD/a"
    if [[ -n "$TMPD" && -d "$TMPD" ]]; then
        rm -rf "$TMPD"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------
# Binaries.

if [[ -n "${PGMESH_BIN:-}" ]]; then
    [[ -x "$PGMESH_BIN" ]] || die "PGMESH_BIN=$PGMESH_BIN is not an executable"
else
    log "building: cargo build --release -p pgmesh-proxy"
    (cd "$ROOT" && cargo build --release -p pgmesh-proxy) >&2 || die "cargo build failed"
    target_dir="${CARGO_TARGET_DIR:-target}"
    [[ "$target_dir" == /* ]] || target_dir="$ROOT/$target_dir"
    PGMESH_BIN="$target_dir/release/pgmesh"
    [[ -x "$PGMESH_BIN" ]] || die "build succeeded but $PGMESH_BIN is missing"
fi
"$PGMESH_BIN" init --help >/dev/null 2>&1 || die "$PGMESH_BIN has no 'init' command (stale build?)"

PGBIN="$(pg_bindir)"
PGBENCH="$(pick_client pgbench)"
PSQL="$(pick_client psql)"

if is_root; then
    id postgres >/dev/null 2>&1 || die "running as root needs a 'postgres' OS user to run PostgreSQL"
fi

PG_VERSION="$("$PGBIN/postgres" --version)"
PGMESH_VERSION="$("$PGMESH_BIN" --version 2>/dev/null || echo unknown)"
log "PostgreSQL: $PG_VERSION ($PGBIN)"
log "pgmesh:     $PGMESH_VERSION ($PGMESH_BIN)"

# ---------------------------------------------------------------------------
# Two fresh clusters. /tmp rather than $TMPDIR: the postgres OS user must reach it.

TMPD="$(mktemp -d /tmp/pgmesh-bench.XXXXXX)"
mapfile -t ports < <(free_ports 3)
((${#ports[@]} == 3)) || die "could not find free ports"
A_PORT="${ports[0]}"
B_PORT="${ports[1]}"
MESH_PORT="${ports[2]}"
A_URL="postgres://postgres@127.0.0.1:$A_PORT/postgres"
is_root && chown postgres: "$TMPD"

COMMON_CONF=("max_connections = 200" "shared_buffers = 256MB")
if [[ "$FAST" == 1 ]]; then
    COMMON_CONF+=("fsync = off")
    FSYNC_DESC="fsync=off, synchronous_commit=on (BENCH_FAST=1)"
else
    FSYNC_DESC="fsync=on, synchronous_commit=on"
fi

log "initdb A (publisher) and B (subscriber) in $TMPD"
pg_cluster_create "$PGBIN" "$TMPD/a" "$A_PORT" "${COMMON_CONF[@]}" \
    "wal_level = logical" "max_wal_senders = 10" "max_replication_slots = 10"
pg_cluster_create "$PGBIN" "$TMPD/b" "$B_PORT" "${COMMON_CONF[@]}"

log "starting A on 127.0.0.1:$A_PORT and B on 127.0.0.1:$B_PORT ($FSYNC_DESC)"
A_STARTED=1
pg_cluster_start "$PGBIN" "$TMPD/a" "$TMPD/a.log"
B_STARTED=1
pg_cluster_start "$PGBIN" "$TMPD/b" "$TMPD/b.log"

# psql_at PORT SQL: one query as postgres through 127.0.0.1:PORT; unaligned, tuples only.
psql_at() {
    "$PSQL" -X -A -t -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$1" -U postgres -d postgres -c "$2"
}

# sql_true PORT SQL: succeeds when SQL returns true.
sql_true() {
    [[ "$(psql_at "$1" "$2" 2>/dev/null)" == t ]]
}

# Same tables and keys on both sides, so the subscriber's updates find their rows.
for side in A B; do
    port="$A_PORT"
    [[ "$side" == B ]] && port="$B_PORT"
    log "pgbench -i -s $SCALE on $side"
    "$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "$port" -U postgres postgres \
        >"$TMPD/pgbench-init-$side.log" 2>&1 || {
        cat "$TMPD/pgbench-init-$side.log" >&2
        die "pgbench -i on $side failed"
    }
done
psql_at "$A_PORT" "CREATE PUBLICATION native FOR TABLE pgbench_accounts, pgbench_branches,
    pgbench_tellers, pgbench_history" >/dev/null

# ---------------------------------------------------------------------------
# Starting and stopping each configuration's extra parts.

# show_pgmesh_log: the tail of pgmesh's log on stderr.
show_pgmesh_log() {
    log "last lines of $TMPD/pgmesh.log:"
    tail -n 40 "$TMPD/pgmesh.log" >&2 || true
}

# mesh_start: pgmesh init (catalog, publication, slot), then pgmesh run with capture;
# returns once the proxy answers and capture is streaming from the slot.
mesh_start() {
    local n
    "$PGMESH_BIN" init --upstream "$A_URL" --region "$REGION" >>"$TMPD/pgmesh-init.log" 2>&1 || {
        cat "$TMPD/pgmesh-init.log" >&2
        die "pgmesh init failed"
    }
    n="$(psql_at "$A_PORT" "SELECT count(*) FROM pg_publication_tables
        WHERE pubname = 'pgmesh' AND schemaname = 'public' AND tablename LIKE 'pgbench\_%'")"
    [[ "$n" == 4 ]] || die "publication pgmesh holds $n of the 4 pgbench tables"
    "$PGMESH_BIN" run --listen "127.0.0.1:$MESH_PORT" --upstream "$A_URL" --region "$REGION" \
        --shutdown-grace-secs 2 >>"$TMPD/pgmesh.log" 2>&1 &
    PGMESH_PID=$!
    wait_ready 30 pgmesh "$PGMESH_PID" "$TMPD/pgmesh.log" psql_at "$MESH_PORT" "select 1"
    wait_ready 30 "pgmesh capture" "$PGMESH_PID" "$TMPD/pgmesh.log" sql_true "$A_PORT" \
        "SELECT EXISTS (SELECT 1 FROM pg_stat_replication
                        WHERE application_name = '$MESH_APP' AND state = 'streaming')"
}

# drop_slot_on_a SLOT: drops SLOT on A once no walsender holds it (if it exists).
drop_slot_on_a() {
    wait_until 30 "slot $1 to be released" sql_true "$A_PORT" \
        "SELECT NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = '$1' AND active)"
    psql_at "$A_PORT" "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
        WHERE slot_name = '$1'" >/dev/null
}

# mesh_stop: stops pgmesh and drops its slot, so nothing of it outlives its run.
mesh_stop() {
    stop_pid "$PGMESH_PID" 10
    PGMESH_PID=""
    drop_slot_on_a "$MESH_SLOT"
}

# native_start: the subscription on B (creating slot native_sub on A); returns once
# its walsender on A is streaming.
native_start() {
    PGOPTIONS="-c client_min_messages=warning" psql_at "$B_PORT" "CREATE SUBSCRIPTION $SUB
        CONNECTION 'host=127.0.0.1 port=$A_PORT dbname=postgres user=postgres'
        PUBLICATION native WITH (copy_data = false)" >/dev/null
    wait_until 30 "the native subscriber to stream" sql_true "$A_PORT" \
        "SELECT EXISTS (SELECT 1 FROM pg_stat_replication
                        WHERE application_name = '$SUB' AND state = 'streaming')"
}

# native_stop: drops the subscription (which drops its slot on A; if that fails,
# detaches the slot and drops it on A directly).
native_stop() {
    if ! psql_at "$B_PORT" "DROP SUBSCRIPTION $SUB" >/dev/null 2>"$TMPD/drop-sub.err"; then
        cat "$TMPD/drop-sub.err" >&2
        log "DROP SUBSCRIPTION failed; detaching its slot and dropping it on A"
        psql_at "$B_PORT" "ALTER SUBSCRIPTION $SUB DISABLE" >/dev/null
        psql_at "$B_PORT" "ALTER SUBSCRIPTION $SUB SET (slot_name = NONE)" >/dev/null
        psql_at "$B_PORT" "DROP SUBSCRIPTION $SUB" >/dev/null
    fi
    drop_slot_on_a "$SUB"
}

# assert_alone CONFIG: dies unless exactly CONFIG's parts are present: the slots and
# walsenders on A, the subscriptions on B, and whether pgmesh runs.
assert_alone() {
    local want_slots="" want_subs=0 want_mesh=0 slots senders subs mesh=0
    case "$1" in
        pgmesh)
            want_slots="$MESH_SLOT"
            want_mesh=1
            ;;
        native)
            want_slots="$SUB"
            want_subs=1
            ;;
    esac
    slots="$(psql_at "$A_PORT" "SELECT coalesce(string_agg(slot_name, ',' ORDER BY slot_name), '')
        FROM pg_replication_slots")"
    senders="$(psql_at "$A_PORT" "SELECT coalesce(string_agg(application_name, ','
        ORDER BY application_name), '') FROM pg_stat_replication")"
    subs="$(psql_at "$B_PORT" "SELECT count(*) FROM pg_subscription")"
    [[ -n "$PGMESH_PID" ]] && kill -0 "$PGMESH_PID" 2>/dev/null && mesh=1
    [[ "$slots" == "$want_slots" ]] || die "$1 run: slots on A are '$slots', want '$want_slots'"
    local want_senders="$want_slots"
    [[ "$1" == pgmesh ]] && want_senders="$MESH_APP"
    [[ "$senders" == "$want_senders" ]] || die "$1 run: walsenders on A are '$senders', want '$want_senders'"
    [[ "$subs" == "$want_subs" ]] || die "$1 run: $subs subscriptions on B, want $want_subs"
    [[ "$mesh" == "$want_mesh" ]] || die "$1 run: pgmesh running=$mesh, want $want_mesh"
}

# wait_caught_up KIND LSN: waits until capture (KIND pgmesh: the slot's confirmed
# flush) or the native subscriber (KIND native: what its walsender has had
# acknowledged as received and applied) has reached LSN on A. Sets DRAIN to the
# seconds it took, or to "timeout" after DRAIN_TIMEOUT s (with a warning).
DRAIN=""
wait_caught_up() {
    local kind="$1" lsn="$2" q t0 end
    if [[ "$kind" == pgmesh ]]; then
        q="SELECT coalesce(bool_or(confirmed_flush_lsn >= '$lsn'), false)
           FROM pg_replication_slots WHERE slot_name = '$MESH_SLOT'"
    else
        q="SELECT coalesce(bool_or(write_lsn >= '$lsn'), false)
           FROM pg_stat_replication WHERE application_name = '$SUB'"
    fi
    t0="$(now_s)"
    end=$((SECONDS + DRAIN_TIMEOUT))
    until sql_true "$A_PORT" "$q"; do
        if [[ "$kind" == pgmesh ]] && ! kill -0 "$PGMESH_PID" 2>/dev/null; then
            show_pgmesh_log
            die "pgmesh exited while capture was catching up"
        fi
        if ((SECONDS >= end)); then
            log "WARNING: $kind had not caught up with A ($lsn) after ${DRAIN_TIMEOUT}s"
            DRAIN=timeout
            return 0
        fi
        sleep 0.2
    done
    DRAIN="$(secs_since "$t0")"
}

# ---------------------------------------------------------------------------
# One pgbench run.

RUN=0
TOTAL=$((REPEAT * 3 + 1))
LAST_TPS=""
LAST_PROCESSED=""

# run_pgbench LABEL PORT [FLAG...]: TPC-B with -c 8 -j 2 -T SECS plus FLAGs against
# 127.0.0.1:PORT; sets LAST_TPS and LAST_PROCESSED. Dies on any failure.
run_pgbench() {
    local label="$1" port="$2" outf failed
    shift 2
    local flags=(-b tpcb-like -M simple -c "$CLIENTS" -j "$JOBS" -T "$SECS" "$@")
    RUN=$((RUN + 1))
    printf '[%d/%d] %s: pgbench %s ... ' "$RUN" "$TOTAL" "$label" "${flags[*]}" >&2
    outf="$TMPD/run-$RUN.log"
    # In the background and waited for, so a signal to this script is handled at once.
    "$PGBENCH" "${flags[@]}" -h 127.0.0.1 -p "$port" -U postgres postgres >"$outf" 2>&1 &
    PGBENCH_PID=$!
    if ! wait "$PGBENCH_PID"; then
        PGBENCH_PID=""
        printf 'FAILED\n' >&2
        cat "$outf" >&2
        [[ -n "$PGMESH_PID" ]] && ! kill -0 "$PGMESH_PID" 2>/dev/null && show_pgmesh_log
        die "pgbench failed: $label"
    fi
    PGBENCH_PID=""
    failed="$(pgbench_failed_txns "$outf")"
    if [[ -n "$failed" && "$failed" != 0 ]]; then
        printf 'FAILED\n' >&2
        cat "$outf" >&2
        die "pgbench reported $failed failed transactions: $label"
    fi
    LAST_TPS="$(pgbench_tps "$outf")"
    LAST_PROCESSED="$(pgbench_processed "$outf")"
    if [[ -z "$LAST_TPS" ]]; then
        printf '?\n' >&2
        cat "$outf" >&2
        die "no tps line in pgbench output: $label"
    fi
    printf '%.1f tps\n' "$LAST_TPS" >&2
}

# Start every run from a clean slate of dirty buffers, whoever ran before.
checkpoint_both() {
    psql_at "$A_PORT" "checkpoint" >/dev/null
    psql_at "$B_PORT" "checkpoint" >/dev/null
}

# ---------------------------------------------------------------------------
# The throughput runs.

CONFIGS=(direct pgmesh native)
declare -A NAME=(
    [direct]="direct, no capture"
    [pgmesh]="through pgmesh, capture on"
    [native]="direct + native logical subscriber"
)
declare -A TPS_LIST=() DRAIN_LIST=()
RUN_ROWS=() # config|round|tps|drain

log "running $TOTAL pgbench runs of ${SECS}s each (about $(((TOTAL * (SECS + 10)) / 60 + 1)) min)"

# changelog_seq: the highest seq in mesh.changelog so far (0 when empty).
changelog_seq() {
    psql_at "$A_PORT" "SELECT coalesce(max(seq), 0) FROM mesh.changelog"
}

# measure CONFIG ROUND: one throughput run of CONFIG, with its parts set up before
# and torn down (after catching up) once it is over.
measure() {
    local cfg="$1" round="$2" port="$A_PORT" lsn seq0="" events="" errors
    case "$cfg" in
        pgmesh)
            mesh_start
            port="$MESH_PORT"
            ;;
        native) native_start ;;
    esac
    assert_alone "$cfg"
    [[ "$cfg" == pgmesh ]] && seq0="$(changelog_seq)"
    checkpoint_both
    run_pgbench "$cfg (round $round)" "$port"
    lsn="$(psql_at "$A_PORT" "SELECT pg_current_wal_lsn()")"
    DRAIN=""
    case "$cfg" in
        pgmesh)
            wait_caught_up pgmesh "$lsn"
            events="$(psql_at "$A_PORT" "SELECT count(*) FROM mesh.changelog WHERE seq > $seq0")"
            mesh_stop
            ;;
        native)
            wait_caught_up native "$lsn"
            native_stop
            # pgbench truncated pgbench_history as the run began; that was replicated.
            events="$(psql_at "$B_PORT" "SELECT count(*) FROM pgbench_history")"
            errors="$(psql_at "$B_PORT" "SELECT coalesce(sum(apply_error_count), 0)
                FROM pg_stat_subscription_stats")"
            [[ "$errors" == 0 ]] ||
                log "WARNING: the native subscriber logged $errors apply errors (see $TMPD/b.log)"
            ;;
    esac
    if [[ -n "$DRAIN" ]]; then
        log "      $cfg caught up with A in ${DRAIN}s; $events transactions arrived (pgbench committed $LAST_PROCESSED)"
    fi
    TPS_LIST[$cfg]="${TPS_LIST[$cfg]:-} $LAST_TPS"
    DRAIN_LIST[$cfg]="${DRAIN_LIST[$cfg]:-} ${DRAIN:--}"
    RUN_ROWS+=("$cfg|$round|$LAST_TPS|${DRAIN:-}|$events")
}

for ((r = 0; r < REPEAT; r++)); do
    for ((i = 0; i < ${#CONFIGS[@]}; i++)); do
        measure "${CONFIGS[$(((i + r) % ${#CONFIGS[@]}))]}" "$((r + 1))"
    done
done

# mean LIST: mean of the space-separated numbers, 1 decimal.
mean() {
    awk -v l="$1" 'BEGIN { n = split(l, a, " "); s = 0; for (i = 1; i <= n; i++) s += a[i];
        if (n) printf "%.1f\n", s / n; else print "n/a" }'
}
# drain_summary LIST: the mean drain in seconds, or "timeout" if any run timed out.
drain_summary() {
    case "$1" in
        *timeout*) echo timeout ;;
        *[0-9]*) mean "$1" ;;
        *) echo - ;;
    esac
}
# span LIST: "min-max" of the numbers, for more than one round.
span() {
    awk -v l="$1" 'BEGIN { n = split(l, a, " "); lo = a[1]; hi = a[1];
        for (i = 2; i <= n; i++) { if (a[i] < lo) lo = a[i]; if (a[i] > hi) hi = a[i] }
        printf "%.1f-%.1f\n", lo, hi }'
}

declare -A MEAN=()
for cfg in "${CONFIGS[@]}"; do
    MEAN[$cfg]="$(mean "${TPS_LIST[$cfg]}")"
done

# ---------------------------------------------------------------------------
# Capture lag at half the pgmesh load.

if [[ -z "$LAG_RATE" ]]; then
    LAG_RATE="$(awk -v t="${MEAN[pgmesh]}" 'BEGIN { r = int(t / 2 + 0.5); print (r < 1) ? 1 : r }')"
    RATE_DESC="half the pgmesh TPS"
else
    RATE_DESC="BENCH_LAG_RATE"
fi
mesh_start
assert_alone pgmesh
checkpoint_both
T0="$(psql_at "$A_PORT" "SELECT clock_timestamp()")"
run_pgbench "capture lag at $LAG_RATE tps" "$MESH_PORT" -R "$LAG_RATE"
T1="$(psql_at "$A_PORT" "SELECT clock_timestamp()")"
LAG_TPS="$LAST_TPS"
LAG_PROCESSED="$LAST_PROCESSED"
lsn="$(psql_at "$A_PORT" "SELECT pg_current_wal_lsn()")"
wait_caught_up pgmesh "$lsn"
LAG_DRAIN="$DRAIN"
log "      capture caught up with A in ${LAG_DRAIN}s"
IFS='|' read -r LAG_ROWS LAG_P50 LAG_P99 LAG_MAX < <(psql_at "$A_PORT" "
    SELECT count(*),
           coalesce(round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 2)::text, 'n/a'),
           coalesce(round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 2)::text, 'n/a'),
           coalesce(round(max(ms)::numeric, 2)::text, 'n/a')
    FROM (SELECT extract(epoch FROM logged_at - commit_ts) * 1000 AS ms
          FROM mesh.changelog
          WHERE commit_ts >= '$T0'::timestamptz AND commit_ts <= '$T1'::timestamptz) s")
mesh_stop
LAG_NOTE=""
if [[ "$LAG_DRAIN" == timeout ]]; then
    LAG_NOTE=" (INCOMPLETE: capture had not caught up after ${DRAIN_TIMEOUT}s)"
fi

# ---------------------------------------------------------------------------
# Results.

NATIVE_TARGET=0.74
LAG_TARGET_MS=20
R_MESH="$(ratio "${MEAN[pgmesh]}" "${MEAN[direct]}")"
R_NATIVE="$(ratio "${MEAN[native]}" "${MEAN[direct]}")"
judge() { # judge EXPR: "met" / "not met" for an awk condition over numbers
    awk "BEGIN { print ($1) ? \"met\" : \"not met\" }"
}
if [[ "$R_MESH" != n/a && "$R_NATIVE" != n/a ]]; then
    VERDICT_RATIO="$(judge "$R_MESH >= $R_NATIVE")"
else
    VERDICT_RATIO="n/a"
fi
if [[ "$LAG_P99" != n/a && -z "$LAG_NOTE" ]]; then
    VERDICT_LAG="$(judge "$LAG_P99 < $LAG_TARGET_MS")"
else
    VERDICT_LAG="n/a"
fi

HEAD=(config TPS "ratio to direct" "drain s")
((REPEAT > 1)) && HEAD+=("TPS range")
ROWS=()
for cfg in "${CONFIGS[@]}"; do
    row="${NAME[$cfg]}|${MEAN[$cfg]}|$(ratio "${MEAN[$cfg]}" "${MEAN[direct]}")|$(drain_summary "${DRAIN_LIST[$cfg]}")"
    ((REPEAT > 1)) && row+="|$(span "${TPS_LIST[$cfg]}")"
    ROWS+=("$row")
done
LAG_LINE="capture lag at $LAG_RATE tps ($RATE_DESC; achieved $(printf '%.1f' "$LAG_TPS") tps): p50 $LAG_P50 ms, p99 $LAG_P99 ms, max $LAG_MAX ms over $LAG_ROWS events (pgbench committed $LAG_PROCESSED)$LAG_NOTE"
TARGET_LINES=(
    "native logical replication kept ${NATIVE_TARGET}x here; target: pgmesh ≥ that ratio in the same run"
    "  this run: native ${R_NATIVE}x, pgmesh ${R_MESH}x -> $VERDICT_RATIO"
    "capture lag p99 target < $LAG_TARGET_MS ms at half load"
    "  this run: p99 $LAG_P99 ms at $LAG_RATE tps -> $VERDICT_LAG"
)

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"
CSV="$OUT/capture-$STAMP.csv"
MD="$OUT/capture-$STAMP.md"

# Plain table on stdout.
TFMT='%-36s  %9s  %15s  %7s'
((REPEAT > 1)) && TFMT+='  %13s'
TFMT+='\n'
# shellcheck disable=SC2059
{
    printf "$TFMT" "${HEAD[@]}"
    for row in "${ROWS[@]}"; do
        IFS='|' read -r -a f <<<"$row"
        printf "$TFMT" "${f[@]}"
    done
    echo
    echo "$LAG_LINE"
    echo
    printf '%s\n' "${TARGET_LINES[@]}"
}

{
    echo "config,round,tps,ratio_to_direct,drain_s,rate_tps,events,lag_p50_ms,lag_p99_ms,lag_max_ms"
    for row in "${RUN_ROWS[@]}"; do
        IFS='|' read -r cfg round tps drain events <<<"$row"
        echo "$cfg,$round,$tps,$(ratio "$tps" "${MEAN[direct]}"),$drain,,$events,,,"
    done
    for cfg in "${CONFIGS[@]}"; do
        echo "$cfg,mean,${MEAN[$cfg]},$(ratio "${MEAN[$cfg]}" "${MEAN[direct]}"),$(drain_summary "${DRAIN_LIST[$cfg]}"),,,,,"
    done
    echo "pgmesh-lag,,$LAG_TPS,,$LAG_DRAIN,$LAG_RATE,$LAG_ROWS,$LAG_P50,$LAG_P99,$LAG_MAX"
} >"$CSV"

GIT_REV="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [[ "$GIT_REV" != unknown ]] && [[ -n "$(git -C "$ROOT" status --porcelain 2>/dev/null)" ]]; then
    GIT_REV="$GIT_REV (dirty tree)"
fi
{
    echo "# pgmesh capture benchmark, $STAMP"
    echo
    echo "- pgmesh: $PGMESH_VERSION, commit $GIT_REV"
    echo "- $PG_VERSION; $FSYNC_DESC; shared_buffers=256MB; wal_level=logical on A in every configuration"
    echo "- pgbench TPC-B (tpcb-like, -M simple), scale $SCALE, -c $CLIENTS -j $JOBS, ${SECS}s per run, $REPEAT round(s), configurations interleaved"
    echo "- native: subscriber cluster B on the same host, subscription WITH (copy_data = false)"
    echo "- drain: seconds after pgbench ended until capture / the subscriber had caught up with A"
    echo "- CSV: one row per run (ratio_to_direct against the mean direct TPS), the means, and the capture-lag run"
    echo "- CSV events: transactions that arrived downstream (pgmesh: mesh.changelog rows, one more than pgbench's count for its TRUNCATE of pgbench_history; native: pgbench_history rows on B)"
    echo "- host: $(nproc 2>/dev/null || echo '?') CPUs, $(uname -sr)"
    echo
    printf '| %s ' "${HEAD[@]}"
    echo "|"
    printf '|%s' "---" "--:" "--:" "--:"
    ((REPEAT > 1)) && printf '|%s' "--:"
    echo "|"
    for row in "${ROWS[@]}"; do
        echo "| ${row//|/ | } |"
    done
    echo
    echo "$LAG_LINE"
    echo
    echo "Targets (issue 3):"
    echo
    for line in "${TARGET_LINES[@]}"; do
        if [[ "$line" == "  "* ]]; then
            echo "  - ${line#  }"
        else
            echo "- $line"
        fi
    done
} >"$MD"

log "wrote $CSV"
log "wrote $MD"
