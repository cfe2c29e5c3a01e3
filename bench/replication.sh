#!/usr/bin/env bash
# bench/replication.sh: multi-region replication lag and catch-up rate of pgmesh, next
# to the lag of native logical replication (issue 4, "Benchmark").
#
# A benchmark, not a test: it prints figures next to the issue's targets and never
# fails on them. It creates fresh PostgreSQL clusters and pgmesh nodes in a temp dir
# and removes everything on exit, whether it succeeds, fails or is interrupted.
# Run with --help for the options.

set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bench/replication.sh [--help]

In one run, on fresh local clusters:

1. Replication lag. Three regions r1, r2, r3 (three clusters, three `pgmesh run`
   nodes, full mesh), the pgbench tables created in each region (`pgbench -i`)
   before `pgmesh init`. A short max-throughput probe (pgbench TPC-B -c 8 -j 2,
   BENCH_PROBE_SECONDS) through r1's proxy sets the rate; then pgbench TPC-B at a
   fixed rate (-R, half the probe's TPS) through r1's proxy for BENCH_SECONDS.
   Once every region has every r1 event, per peer (r1->r2, r1->r3) and per event of
   that run: lag = the event's mesh.changelog.logged_at in the peer
   (clock_timestamp() when apply logs the batch, its last step before the link
   checkpoint and COMMIT) - its commit_ts (the commit time at the origin). p50, p99
   and max in ms.
   The probe's TPS is what r1's proxy takes while the peers fall behind, not what
   the mesh sustains. So the probe also measures the replicated max: the slowest
   peer's events of the probe applied before the probe ended, per second of it. When
   that is under 90% of the probe's TPS, a second pgmesh lag run goes at half of it
   (BENCH_REPLICATED_MAX_RUN=0 skips it).
   Each lag run also reports the CPU of each part of the mesh over its middle (each
   node process, each region's PostgreSQL sessions by application_name, the pgbench
   client), in % of one CPU and in microseconds per transaction: a steadier figure
   than the lag's tail on a shared machine. The probe reports the same, and each lag
   run prints its total CPU per transaction as a multiple of the probe's. Every stage
   batches less at a lower rate, so a transaction costs more there: at half the
   probe's rate the machine is about half that multiple as busy as during the probe.
2. Catch-up rate. r2 pauses its link from r1 (mesh.pause_link('r1')); r1 writes a
   backlog of BENCH_BACKLOG events through its proxy at full speed (pgbench -c 8
   -j 2 -t N; r3 keeps replicating live). Write rate = backlog / span of the
   backlog's origin commit times. Then r2 resumes the link; catch-up rate = events
   pending in r2 / (the last one's logged_at in r2 - the resume). Target ratio >= 3.
3. Reference. The pgmesh clusters are stopped, then two fresh clusters with native
   logical replication (publication on the pgbench tables and a `lagprobe` table,
   subscription WITH (copy_data = false)). pgbench TPC-B plus an INSERT INTO
   lagprobe in the same transaction, at the same -R for the same time. Lag per
   transaction = lagprobe.applied (subscriber-side default clock_timestamp(),
   filled at apply) - lagprobe.t (clock_timestamp() at the origin, the last
   statement before COMMIT).

The nodes do not prune their change logs (--prune-interval-secs 0): the figures
are read back from every region's log. Links still make their checkpoints durable
every 2 s for pruning.

All clusters share the machine's clock, so the timestamps compare. Runs pass -n
to pgbench (no vacuum and no TRUNCATE of pgbench_history, so every transaction is
exactly one replicated event); instead every cluster is vacuumed (VACUUM ANALYZE)
and checkpointed before each lag run, pgmesh's and native alike.

Prints a table and the issue's targets on stdout and writes them to
$BENCH_OUT/replication-<timestamp>.{csv,md}. Progress goes to stderr. A pgbench
failure, a node that exits, or replication that stops making progress for
BENCH_STALL_TIMEOUT seconds aborts the run and shows the node logs.

Environment:
  BENCH_SECONDS        seconds of the fixed-rate lag runs (-T)     [60; 5 with BENCH_FAST=1]
  BENCH_BACKLOG        events written while r2's link is paused    [100000; 2000 with BENCH_FAST=1]
  BENCH_PROBE_SECONDS  seconds of the max-throughput probe         [10; 5 with BENCH_FAST=1]
  BENCH_RATE           -R for the lag runs                         [half the probe's TPS]
  BENCH_EXTRA_RATES    more pgmesh lag runs, at these rates (tps, separated by spaces) [none]
  BENCH_REPLICATED_MAX_RUN  1: a second pgmesh lag run at half the replicated max,
                       when the peers applied under 90% of the probe's rate  [1]
  BENCH_BACKLOG_WORKLOAD  tpcb: pgbench TPC-B transactions         [tpcb]
                       insert: single-row INSERT transactions into a table bench_events
  BENCH_SCALE          pgbench -i scale factor                     [10]
  BENCH_WAL_POOL_MB    recycled WAL segments every cluster starts with, in MB, as on a
                       server that has run a while (min_wal_size keeps them); 0: none,
                       so every new 16 MB segment is created and zero-filled while
                       commits wait, as in a fresh cluster  [768; 128 with BENCH_FAST=1]
  BENCH_FAST           1: fsync=off and the short defaults above (CI form) [0: fsync on]
                       synchronous_commit stays on either way: with it off, walsenders
                       only see a commit once the WAL writer flushes it, which would
                       show up as lag that is not the replication's.
  BENCH_STALL_TIMEOUT  seconds without replication progress before giving up [60]
  BENCH_OUT            directory for the result files              [bench-results]
  BENCH_STAGES         1: also split each lag run's lag into stages (see bench/stages.sh;
                       adds a timestamp column to every region's change log)  [0]
  BENCH_PG_CONF        extra postgresql.conf lines for every cluster, separated by ";"
                       (profiling: "shared_preload_libraries = 'pg_stat_statements'")
  BENCH_NODE_ARGS      extra `pgmesh run` flags for every node, separated by spaces
                       (e.g. "--capture-linger-ms 0 --apply-linger-ms 0")  [none]
  BENCH_KEEP           1: keep the run's directory (clusters, logs) afterwards [0]
  PGMESH_BIN           pgmesh binary to use; skips `cargo build --release -p pgmesh-proxy`
  PGMESH_PG_BIN        PostgreSQL bin dir  [dir of initdb on PATH, else /usr/lib/postgresql/*/bin]

When run as root, initdb and pg_ctl run as the `postgres` OS user.

Examples:
  bench/replication.sh                     # full run: 60 s lag runs, 100,000-event backlog;
                                           # several minutes, mostly the backlog and its catch-up
  BENCH_FAST=1 bench/replication.sh        # short CI form: 5 s runs, 2,000-event backlog
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
# shellcheck source=bench/stages.sh
. "$HERE/stages.sh"

FAST="${BENCH_FAST:-0}"
if [[ "$FAST" == 1 ]]; then
    SECS="${BENCH_SECONDS:-5}"
    BACKLOG="${BENCH_BACKLOG:-2000}"
    PROBE_SECS="${BENCH_PROBE_SECONDS:-5}"
else
    SECS="${BENCH_SECONDS:-60}"
    BACKLOG="${BENCH_BACKLOG:-100000}"
    PROBE_SECS="${BENCH_PROBE_SECONDS:-10}"
fi
SCALE="${BENCH_SCALE:-10}"
WAL_POOL_MB="${BENCH_WAL_POOL_MB:-768}"
[[ "$FAST" != 1 ]] || WAL_POOL_MB="${BENCH_WAL_POOL_MB:-128}"
[[ "$WAL_POOL_MB" =~ ^[0-9]+$ ]] && { ((WAL_POOL_MB == 0 || WAL_POOL_MB >= 32)); } ||
    die "BENCH_WAL_POOL_MB must be 0 or at least 32 (MB), not '$WAL_POOL_MB'"
RATE="${BENCH_RATE:-}"
REPLMAX_RUN="${BENCH_REPLICATED_MAX_RUN:-1}"
read -r -a EXTRA_RATES <<<"${BENCH_EXTRA_RATES:-}"
read -r -a NODE_ARGS <<<"${BENCH_NODE_ARGS:-}"
WORKLOAD="${BENCH_BACKLOG_WORKLOAD:-tpcb}"
STALL="${BENCH_STALL_TIMEOUT:-60}"
STAGES="${BENCH_STAGES:-0}"
OUT="${BENCH_OUT:-bench-results}"
for v in SECS BACKLOG PROBE_SECS SCALE STALL; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'"
done
[[ -z "$RATE" || "$RATE" =~ ^[1-9][0-9]*$ ]] || die "BENCH_RATE must be a positive integer, got '$RATE'"
for x in "${EXTRA_RATES[@]}"; do
    [[ "$x" =~ ^[1-9][0-9]*$ ]] || die "BENCH_EXTRA_RATES must be positive integers, got '$x'"
done
[[ "$REPLMAX_RUN" == 0 || "$REPLMAX_RUN" == 1 ]] ||
    die "BENCH_REPLICATED_MAX_RUN must be 0 or 1, got '$REPLMAX_RUN'"
[[ "$WORKLOAD" == tpcb || "$WORKLOAD" == insert ]] ||
    die "BENCH_BACKLOG_WORKLOAD must be tpcb or insert, got '$WORKLOAD'"

CLIENTS=8
JOBS=2
REGIONS=(r1 r2 r3)
ORIGIN=r1   # every write goes to this region
PAUSED=r2   # the region whose link from ORIGIN is paused for the catch-up run
SUB=native_sub

# ---------------------------------------------------------------------------
# Cleanup. Everything started below is recorded here so the EXIT trap can stop it.

TMPD=""
PGBENCH_PID=""
declare -A NODE_PID=()
CLUSTERS=() # data directories started, in start order
PGBIN=""

cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    set +e
    stop_pid "$PGBENCH_PID" 5
    for i in "${!NODE_PID[@]}"; do
        stop_pid "${NODE_PID[$i]}" 10
    done
    # Reverse order: a subscriber stops before its publisher.
    for ((i = ${#CLUSTERS[@]} - 1; i >= 0; i--)); do
        pg_cluster_stop "$PGBIN" "${CLUSTERS[$i]}"
    done
    if [[ -n "$TMPD" && -d "$TMPD" ]]; then
        if [[ "${BENCH_KEEP:-0}" == 1 ]]; then
            echo "kept $TMPD (clusters and logs)" >&2
        else
            rm -rf "$TMPD"
        fi
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
"$PGMESH_BIN" run --help 2>/dev/null | grep -q -- '--peer-listen' ||
    die "$PGMESH_BIN run has no --peer-listen (stale build?)"

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
[[ ${#NODE_ARGS[@]} -eq 0 ]] || log "node flags: ${NODE_ARGS[*]}"

# ---------------------------------------------------------------------------
# Ports and the temp dir. /tmp rather than $TMPDIR: the postgres OS user must reach it.

TMPD="$(mktemp -d /tmp/pgmesh-bench.XXXXXX)"
is_root && chown postgres: "$TMPD"
mapfile -t ports < <(free_ports 14)
((${#ports[@]} == 14)) || die "could not find free ports"
declare -A PG_PORT=() PROXY_PORT=() PEER_PORT=() METRICS_PORT=()
for ((i = 0; i < 3; i++)); do
    r="${REGIONS[$i]}"
    PG_PORT[$r]="${ports[$((i * 4))]}"
    PROXY_PORT[$r]="${ports[$((i * 4 + 1))]}"
    PEER_PORT[$r]="${ports[$((i * 4 + 2))]}"
    METRICS_PORT[$r]="${ports[$((i * 4 + 3))]}"
done
PUB_PORT="${ports[12]}"
SUB_PORT="${ports[13]}"

COMMON_CONF=("max_connections = 200" "shared_buffers = 256MB")
if [[ "$FAST" == 1 ]]; then
    COMMON_CONF+=("fsync = off")
    FSYNC_DESC="fsync=off, synchronous_commit=on (BENCH_FAST=1)"
else
    FSYNC_DESC="fsync=on, synchronous_commit=on"
fi
if ((WAL_POOL_MB > 0)); then
    COMMON_CONF+=("min_wal_size = ${WAL_POOL_MB}MB")
fi
LOGICAL_CONF=("wal_level = logical" "max_wal_senders = 20" "max_replication_slots = 20")

# psql_at PORT SQL: one query as postgres through 127.0.0.1:PORT; unaligned, tuples only.
psql_at() {
    "$PSQL" -X -A -t -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$1" -U postgres -d postgres -c "$2"
}

# sql_true PORT SQL: succeeds when SQL returns true.
sql_true() {
    [[ "$(psql_at "$1" "$2" 2>/dev/null)" == t ]]
}

# rsql REGION SQL: psql_at on REGION's cluster (directly, not through its proxy).
rsql() {
    psql_at "${PG_PORT[$1]}" "$2"
}

# wal_pool PORT: gives the cluster WAL_POOL_MB of recycled WAL segments, as a server
# that has been running a while has (min_wal_size keeps them through checkpoints).
# A fresh cluster instead creates, and zero-fills, every 16 MB segment it reaches,
# holding up its commits (tens of ms on a busy shared machine) - a cost of a new
# cluster, not of replication. Run before `pgmesh init`, so no slot decodes it.
wal_pool() {
    ((WAL_POOL_MB > 0)) || return 0
    psql_at "$1" "DO \$\$ BEGIN FOR i IN 1..$((WAL_POOL_MB / 16)) LOOP
        PERFORM pg_logical_emit_message(false, 'pgmesh-bench-wal-pool', '');
        PERFORM pg_switch_wal();
    END LOOP; END \$\$" >/dev/null
    psql_at "$1" "CHECKPOINT" >/dev/null
}

# pgbench_init PORT LABEL: pgbench -i -s SCALE, quietly; dies showing its output.
pgbench_init() {
    "$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "$1" -U postgres postgres \
        >"$TMPD/pgbench-init-$2.log" 2>&1 || {
        cat "$TMPD/pgbench-init-$2.log" >&2
        die "pgbench -i on $2 failed"
    }
}

# ---------------------------------------------------------------------------
# Three regions.

log "initdb r1, r2, r3 in $TMPD ($FSYNC_DESC)"
for r in "${REGIONS[@]}"; do
    pg_cluster_create "$PGBIN" "$TMPD/$r" "${PG_PORT[$r]}" "${COMMON_CONF[@]}" "${LOGICAL_CONF[@]}"
done
for r in "${REGIONS[@]}"; do
    CLUSTERS+=("$TMPD/$r")
    pg_cluster_start "$PGBIN" "$TMPD/$r" "$TMPD/$r.log"
done
((WAL_POOL_MB == 0)) || log "a pool of ${WAL_POOL_MB} MB of recycled WAL segments in each cluster"
for r in "${REGIONS[@]}"; do
    wal_pool "${PG_PORT[$r]}"
done

# DDL does not replicate: the same schema in every region, before `pgmesh init`.
for r in "${REGIONS[@]}"; do
    log "pgbench -i -s $SCALE in $r (127.0.0.1:${PG_PORT[$r]})"
    pgbench_init "${PG_PORT[$r]}" "$r"
    if [[ "$WORKLOAD" == insert ]]; then
        rsql "$r" "CREATE TABLE bench_events (id bigserial PRIMARY KEY, v int NOT NULL)" >/dev/null
    fi
    "$PGMESH_BIN" init --upstream "postgres://postgres@127.0.0.1:${PG_PORT[$r]}/postgres" \
        --region "$r" >"$TMPD/init-$r.log" 2>&1 || {
        cat "$TMPD/init-$r.log" >&2
        die "pgmesh init in $r failed"
    }
    if [[ "$STAGES" == 1 ]]; then stages_prepare "$r"; fi
done

# show_node_logs: the tails of every node's log and each region's links, on stderr.
show_node_logs() {
    local r
    for r in "${REGIONS[@]}"; do
        [[ -f "$TMPD/node-$r.log" ]] || continue
        if [[ -n "${NODE_PID[$r]:-}" ]] && ! kill -0 "${NODE_PID[$r]}" 2>/dev/null; then
            log "--- node $r has EXITED; last lines of $TMPD/node-$r.log:"
        else
            log "--- last lines of $TMPD/node-$r.log:"
        fi
        tail -n 30 "$TMPD/node-$r.log" | sed 's/\x1b\[[0-9;]*m//g' >&2 || true
    done
    for r in "${REGIONS[@]}"; do
        log "--- mesh.links in $r:"
        "$PSQL" -X -h 127.0.0.1 -p "${PG_PORT[$r]}" -U postgres -d postgres -c \
            "SELECT name, status, checkpoint, peer_head, backlog_events, lag_ms, last_applied_at, error
             FROM mesh.links ORDER BY name" >&2 2>&1 || true
        "$PSQL" -X -A -t -h 127.0.0.1 -p "${PG_PORT[$r]}" -U postgres -d postgres -c \
            "SELECT 'dead letters: ' || count(*) FROM mesh.dead_letters" >&2 2>&1 || true
    done
}

# check_nodes: dies, with the logs, if a node has exited.
check_nodes() {
    local r
    for r in "${REGIONS[@]}"; do
        if [[ -n "${NODE_PID[$r]:-}" ]] && ! kill -0 "${NODE_PID[$r]}" 2>/dev/null; then
            show_node_logs
            die "the pgmesh node of $r exited"
        fi
    done
}

# log_count REGION PATTERN: how many lines of REGION's node log hold PATTERN.
log_count() {
    grep -c -- "$2" "$TMPD/node-$1.log" 2>/dev/null || true
}

# wait_log SECS REGION PATTERN N WHAT: waits until REGION's node log holds PATTERN
# at least N times; dies with the logs after SECS.
wait_log() {
    local secs="$1" r="$2" pat="$3" n="$4" what="$5" end
    end=$((SECONDS + secs))
    until (($(log_count "$r" "$pat") >= n)); do
        check_nodes
        if ((SECONDS >= end)); then
            show_node_logs
            die "timed out after ${secs}s waiting for $what"
        fi
        sleep 0.2
    done
}

for r in "${REGIONS[@]}"; do
    peers=()
    for o in "${REGIONS[@]}"; do
        [[ "$o" == "$r" ]] || peers+=(--peer "$o=127.0.0.1:${PEER_PORT[$o]}")
    done
    log "starting node $r: proxy 127.0.0.1:${PROXY_PORT[$r]}, peers on 127.0.0.1:${PEER_PORT[$r]}"
    NO_COLOR=1 "$PGMESH_BIN" run --listen "127.0.0.1:${PROXY_PORT[$r]}" \
        --upstream "postgres://postgres@127.0.0.1:${PG_PORT[$r]}/postgres" \
        --region "$r" --node "$r-node" \
        --peer-listen "127.0.0.1:${PEER_PORT[$r]}" "${peers[@]}" \
        --metrics-listen "127.0.0.1:${METRICS_PORT[$r]}" \
        --prune-interval-secs 0 "${NODE_ARGS[@]}" \
        --shutdown-grace-secs 2 >"$TMPD/node-$r.log" 2>&1 &
    NODE_PID[$r]=$!
done
for r in "${REGIONS[@]}"; do
    wait_ready 30 "node $r" "${NODE_PID[$r]}" "$TMPD/node-$r.log" psql_at "${PROXY_PORT[$r]}" "select 1"
    wait_ready 30 "capture in $r" "${NODE_PID[$r]}" "$TMPD/node-$r.log" sql_true "${PG_PORT[$r]}" \
        "SELECT EXISTS (SELECT 1 FROM pg_stat_replication
                        WHERE application_name = 'pgmesh-capture-$r' AND state = 'streaming')"
done
for r in "${REGIONS[@]}"; do
    wait_log 60 "$r" "link connected" 2 "both links of $r to connect"
done
log "mesh up: every node captures and pulls from both peers"

# ---------------------------------------------------------------------------
# Waiting for replication.

# origin_head: the highest seq in ORIGIN's change log (0 when empty).
origin_head() {
    rsql "$ORIGIN" "SELECT coalesce(max(seq), 0) FROM mesh.changelog"
}

# origin_count REGION: mesh.changelog rows of origin ORIGIN in REGION.
origin_count() {
    rsql "$1" "SELECT count(*) FROM mesh.changelog WHERE origin = '$ORIGIN'"
}

# link_checkpoint REGION: REGION's checkpoint in ORIGIN's change log (0 if none yet).
link_checkpoint() {
    rsql "$1" "SELECT coalesce(max(checkpoint), 0) FROM mesh.link_state WHERE peer = '$ORIGIN'"
}

# wait_captured SEQ0 N WHAT: waits until ORIGIN's capture has logged N events after
# seq SEQ0; dies (with the logs) if capture stalls for STALL seconds.
wait_captured() {
    local seq0="$1" want="$2" what="$3" have last=-1 since=$SECONDS
    while :; do
        have="$(rsql "$ORIGIN" "SELECT count(*) FROM mesh.changelog WHERE seq > $seq0")"
        ((have >= want)) && return 0
        check_nodes
        if ((have != last)); then
            last=$have
            since=$SECONDS
        elif ((SECONDS - since >= STALL)); then
            show_node_logs
            die "capture in $ORIGIN stalled at $have of $want events ($what)"
        fi
        sleep 0.2
    done
}

# wait_replicated WHAT REGION...: waits until each REGION's link from ORIGIN has
# applied ORIGIN's whole change log (checkpoint >= head), polling one cheap row, then
# checks that every region holds as many ORIGIN events as ORIGIN itself. Dies, with
# the node logs and links, when a region makes no progress for STALL seconds or the
# counts do not agree.
wait_replicated() {
    local what="$1" head r cp n0 n last since end next
    shift
    head="$(origin_head)"
    for r in "$@"; do
        last=-1
        since=$SECONDS
        next=$((SECONDS + 5))
        while :; do
            cp="$(link_checkpoint "$r")"
            ((cp >= head)) && break
            check_nodes
            if ((SECONDS >= next)); then
                log "      $r: checkpoint $cp of $ORIGIN's head $head"
                next=$((SECONDS + 5))
            fi
            if ((cp != last)); then
                last=$cp
                since=$SECONDS
            elif ((SECONDS - since >= STALL)); then
                show_node_logs
                die "$r stopped applying $ORIGIN's events at checkpoint $cp of $head ($what)"
            fi
            sleep 0.2
        done
    done
    n0="$(origin_count "$ORIGIN")"
    end=$((SECONDS + 10))
    for r in "$@"; do
        until [[ "$(origin_count "$r")" == "$n0" ]]; do
            if ((SECONDS >= end)); then
                n="$(origin_count "$r")"
                show_node_logs
                die "$r holds $n events of origin $ORIGIN, $ORIGIN holds $n0, though its checkpoint reached $head ($what)"
            fi
            sleep 0.5
        done
    done
}

# ---------------------------------------------------------------------------
# One pgbench run.

LAST_TPS=""
LAST_PROCESSED=""
RUN=0

# run_pgbench LABEL PORT FLAG...: pgbench -n -c CLIENTS -j JOBS FLAGs against
# 127.0.0.1:PORT; sets LAST_TPS and LAST_PROCESSED. Dies on any failure.
run_pgbench() {
    local label="$1" port="$2" outf failed
    shift 2
    local flags=(-n -M simple -c "$CLIENTS" -j "$JOBS" "$@")
    RUN=$((RUN + 1))
    printf '[%d] %s: pgbench %s ... ' "$RUN" "$label" "${flags[*]}" >&2
    outf="$TMPD/run-$RUN.log"
    # In the background and waited for, so a signal to this script is handled at once.
    "$PGBENCH" "${flags[@]}" -h 127.0.0.1 -p "$port" -U postgres postgres >"$outf" 2>&1 &
    PGBENCH_PID=$!
    if ! wait "$PGBENCH_PID"; then
        PGBENCH_PID=""
        printf 'FAILED\n' >&2
        cat "$outf" >&2
        check_nodes
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
    if [[ -z "$LAST_TPS" || -z "$LAST_PROCESSED" ]]; then
        printf '?\n' >&2
        cat "$outf" >&2
        die "no tps line in pgbench output: $label"
    fi
    printf '%.1f tps, %s transactions\n' "$LAST_TPS" "$LAST_PROCESSED" >&2
}

# checkpoint_all PORT...: a CHECKPOINT in each, so no run pays for its predecessor.
checkpoint_all() {
    local p
    for p in "$@"; do
        psql_at "$p" "CHECKPOINT" >/dev/null
    done
}

# settle PORT...: VACUUM ANALYZE, then CHECKPOINT, in each: what pgbench does before
# a run unless -n (which these runs pass so that pgbench_history is not truncated).
# Without it autovacuum's first round over the freshly loaded tables lands inside
# the measured minute, in every cluster at once.
settle() {
    local p
    for p in "$@"; do
        psql_at "$p" "VACUUM ANALYZE" >/dev/null
    done
    checkpoint_all "$@"
}

# wal_per_tx PORT LSN0 N: the WAL written since LSN0 in the cluster at PORT, in MB
# and in KB for each of N transactions.
wal_per_tx() {
    psql_at "$1" "SELECT round(d / 1048576, 1) || ' MB, ' || round(d / 1024 / greatest($3, 1), 1) || ' KB per transaction'
        FROM (SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '$2')::numeric AS d) s"
}

# STATS_SQL: p50|p99|max (ms, 2 decimals) over column ms of a subquery named s.
stats_select() {
    echo "count(*),
        coalesce(round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 2)::text, 'n/a'),
        coalesce(round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 2)::text, 'n/a'),
        coalesce(round(max(ms)::numeric, 2)::text, 'n/a')"
}

# cpu_by_part OUT DELAY SPAN: after DELAY seconds, the CPU each part of the mesh uses
# over SPAN seconds (each node; each region's PostgreSQL sessions by
# application_name: apply, capture's log append and walsender, pgbench's sessions,
# the rest; the pgbench client), as "ms|label" lines in OUT. Run in the background
# while the probe's or a lag run's pgbench runs.
cpu_by_part() {
    local out="$1" delay="$2" span="$3" r pid name hz
    declare -A label=()
    sleep "$delay"
    for r in "${REGIONS[@]}"; do
        label[${NODE_PID[$r]}]="$r node (proxy, capture, links)"
        while IFS='|' read -r pid name; do
            case "$name" in
                pgmesh-apply-*) label[$pid]="$r apply session (from ${name#pgmesh-apply-})" ;;
                pgmesh-capture-log) label[$pid]="$r capture log append session" ;;
                "pgmesh-capture-$r") label[$pid]="$r walsender (capture)" ;;
                pgbench) label[$pid]="$r pgbench sessions" ;;
                *) label[$pid]="$r other sessions" ;;
            esac
        done < <(rsql "$r" "SELECT pid, application_name FROM pg_stat_activity
                            WHERE pid <> pg_backend_pid() AND backend_type IN ('client backend', 'walsender')")
    done
    for pid in $(pgrep -x pgbench); do label[$pid]="pgbench client"; done
    hz="$(getconf CLK_TCK)"
    proc_cpu_ticks "${!label[@]}" | sort -k1,1 >"$out.0"
    sleep "$span"
    proc_cpu_ticks "${!label[@]}" | sort -k1,1 >"$out.1"
    join "$out.0" "$out.1" | while read -r pid a b; do
        printf '%s|%s\n' "${label[$pid]}" "$(((b - a) * 1000 / hz))"
    done | awk -F'|' '{ ms[$1] += $2 } END { for (l in ms) if (ms[l] > 0) printf "%d|%s\n", ms[l], l }' |
        sort -t'|' -k1,1nr >"$out"
}

# parts_report FILE SPAN TPS: logs cpu_by_part's FILE (SPAN seconds at TPS) as a
# table, % of one CPU and us per transaction, and prints it as "part|pct|us" lines.
parts_report() {
    local ms part pct us
    log "      CPU by part over ${2}s of it (% of one CPU, us per transaction):"
    while IFS='|' read -r ms part; do
        read -r pct us < <(awk -v ms="$ms" -v s="$2" -v t="$3" 'BEGIN {
            printf "%.1f %.0f\n", ms / s / 10, (t > 0) ? ms * 1000 / s / t : 0 }')
        printf '%s|%s|%s\n' "$part" "$pct" "$us"
        log "$(printf '        %-44s %6s%% %6s us' "$part" "$pct" "$us")"
    done <"$1"
}

# parts_total PARTS: the sum of the us per transaction of PARTS ("part|pct|us" lines).
parts_total() {
    awk -F'|' '{ t += $3 } END { printf "%.0f\n", t }' <<<"$1"
}

# ---------------------------------------------------------------------------
# 1. Replication lag.

ORIGIN_PROXY="${PROXY_PORT[$ORIGIN]}"
ALL_PG=("${PG_PORT[r1]}" "${PG_PORT[r2]}" "${PG_PORT[r3]}")

log "== 1. replication lag"
seq0="$(origin_head)"
checkpoint_all "${ALL_PG[@]}"
P0="$(rsql "$ORIGIN" "SELECT clock_timestamp()")"
# The CPU each part uses per transaction at full speed, where every stage batches
# the most: the lag runs compare theirs with it.
MAX_SPAN=$((PROBE_SECS > 3 ? PROBE_SECS - 2 : 1))
cpu_by_part "$TMPD/parts-max" 1 "$MAX_SPAN" &
sampler=$!
run_pgbench "max-throughput probe through $ORIGIN's proxy" "$ORIGIN_PROXY" -b tpcb-like -T "$PROBE_SECS"
P1="$(rsql "$ORIGIN" "SELECT clock_timestamp()")"
MAX_TPS="$LAST_TPS"
MAX_PARTS=""
if wait "$sampler" && [[ -s "$TMPD/parts-max" ]]; then
    MAX_PARTS="$(parts_report "$TMPD/parts-max" "$MAX_SPAN" "$MAX_TPS")"
fi
wait_captured "$seq0" "$LAST_PROCESSED" "max-throughput probe"
t0="$(now_s)"
wait_replicated "after the max-throughput probe" r2 r3
log "      r2 and r3 caught up with the probe in $(secs_since "$t0")s"
# What the mesh replicated while the origin ran flat out: the slowest peer's events
# of the probe logged (applied) before the probe ended, per second of it. Events the
# peers applied only after the probe do not count: at the probe's rate they fall
# behind without bound.
REPL_MAX="$MAX_TPS"
for r in r2 r3; do
    applied="$(rsql "$r" "SELECT round(count(*) / extract(epoch FROM timestamptz '$P1' - timestamptz '$P0'), 1)
        FROM mesh.changelog
        WHERE origin = '$ORIGIN' AND commit_ts >= '$P0' AND logged_at <= '$P1'")"
    log "      $r applied $applied events/s of the probe while it ran"
    awk -v a="$applied" -v m="$REPL_MAX" 'BEGIN { exit !(a < m) }' && REPL_MAX="$applied"
done

half() { awk -v t="$1" 'BEGIN { r = int(t / 2 + 0.5); print (r < 1) ? 1 : r }'; }
if [[ -z "$RATE" ]]; then
    RATE="$(half "$MAX_TPS")"
    RATE_DESC="half the probe's $(printf '%.1f' "$MAX_TPS") tps"
else
    RATE_DESC="BENCH_RATE; the probe reached $(printf '%.1f' "$MAX_TPS") tps"
fi
# Worth a run of its own only when the peers fell clearly behind the probe.
RATE2=""
if [[ "$REPLMAX_RUN" == 1 ]] && awk -v a="$REPL_MAX" -v m="$MAX_TPS" 'BEGIN { exit !(a < 0.9 * m) }'; then
    RATE2="$(half "$REPL_MAX")"
    RATE2_DESC="half the $(printf '%.1f' "$REPL_MAX") events/s the slowest peer applied during the probe"
fi

# lag_run KEY RATE: pgbench TPC-B at -R RATE through ORIGIN's proxy for SECS, then,
# once every peer has it all, per peer: lag = logged_at in the peer (clock_timestamp()
# when apply logs the batch, its last step before the link checkpoint and COMMIT) -
# commit_ts at the origin. Sets LAG[KEY,r], BATCHES[KEY,r], CAPTURE[KEY], TPS[KEY],
# PROCESSED[KEY], BUSY[KEY], WAIT[KEY], and writes the per-event series.
# Not pg_xact_commit_timestamp() of the applied rows: with a replication origin set
# up in the session and no per-transaction origin timestamp, PostgreSQL records the
# session's first commit time for every later commit of that session.
declare -A LAG=() BATCHES=() CAPTURE=() TPS=() PROCESSED=() BUSY=() WAIT=() PARTS=() STAGES_OF=()
# lag_stats REGION T0 T1: count, p50, p99 and max of logged_at - commit_ts in ms
# over REGION's change log rows of ORIGIN's events committed between T0 and T1 (in
# the origin, capture's share; in a peer, the whole replication lag).
lag_stats() {
    rsql "$1" "SELECT $(stats_select)
        FROM (SELECT extract(epoch FROM logged_at - commit_ts) * 1000 AS ms
              FROM mesh.changelog
              WHERE origin = '$ORIGIN' AND commit_ts BETWEEN '$2' AND '$3') s"
}

lag_run() {
    local key="$1" rate="$2" seq0 t0 T0 T1 mark r n p50 p99 mx series sampler span here there wal0
    seq0="$(origin_head)"
    settle "${ALL_PG[@]}"
    T0="$(rsql "$ORIGIN" "SELECT clock_timestamp()")"
    wal0="$(rsql "$ORIGIN" "SELECT pg_current_wal_insert_lsn()")"
    mark="$(cpu_mark)"
    # The middle of the run: from a second in to a second before its end.
    span=$((SECS > 3 ? SECS - 2 : 1))
    cpu_by_part "$TMPD/parts-$key" 1 "$span" &
    sampler=$!
    run_pgbench "pgmesh lag at $rate tps" "$ORIGIN_PROXY" -b tpcb-like -R "$rate" -T "$SECS"
    read -r "BUSY[$key]" "WAIT[$key]" < <(cpu_since "$mark")
    log "      machine during the run: CPU busy ${BUSY[$key]}, some task waiting for a CPU ${WAIT[$key]} of the time"
    log "      WAL written in $ORIGIN: $(wal_per_tx "${PG_PORT[$ORIGIN]}" "$wal0" "$LAST_PROCESSED")"
    PARTS[$key]=""
    if wait "$sampler" && [[ -s "$TMPD/parts-$key" ]]; then
        PARTS[$key]="$(parts_report "$TMPD/parts-$key" "$span" "$LAST_TPS")"
        if [[ -n "$MAX_PARTS" ]]; then
            here="$(parts_total "${PARTS[$key]}")"
            there="$(parts_total "$MAX_PARTS")"
            log "      all parts: $here us per transaction, $(awk -v a="$here" -v b="$there" 'BEGIN {
                printf "%.2f", (b > 0) ? a / b : 0 }')x the $there us of the max-throughput probe"
        fi
    fi
    T1="$(rsql "$ORIGIN" "SELECT clock_timestamp()")"
    TPS[$key]="$LAST_TPS"
    PROCESSED[$key]="$LAST_PROCESSED"
    wait_captured "$seq0" "$LAST_PROCESSED" "lag run at $rate tps"
    t0="$(now_s)"
    wait_replicated "after the lag run at $rate tps" r2 r3
    log "      r2 and r3 caught up with the lag run $(secs_since "$t0")s after capture"
    for r in r2 r3; do
        LAG[$key,$r]="$(lag_stats "$r" "$T0" "$T1")"
        IFS='|' read -r n p50 p99 mx <<<"${LAG[$key,$r]}"
        [[ "$n" == "${PROCESSED[$key]}" ]] ||
            log "WARNING: $r holds $n events of the lag run, pgbench committed ${PROCESSED[$key]}"
        # One apply transaction per batch: its rows share an xmin.
        BATCHES[$key,$r]="$(rsql "$r" "SELECT count(DISTINCT xmin::text) FROM mesh.changelog
            WHERE origin = '$ORIGIN' AND commit_ts BETWEEN '$T0' AND '$T1'")"
        log "      $ORIGIN -> $r: lag p50 $p50 ms, p99 $p99 ms, max $mx ms over $n events in ${BATCHES[$key,$r]} apply transactions"
    done
    # The per-event series, for a look at where the tail lies (stalls or spread out):
    # commit time at the origin, then lag in ms to r2, to r3 and of capture in r1.
    mkdir -p "$OUT"
    series="$OUT/replication-series-$key-$(date -u +%Y%m%dT%H%M%SZ).csv"
    {
        echo "commit_ts,r2_ms,r3_ms,capture_ms"
        for r in r1 r2 r3; do
            rsql "$r" "COPY (SELECT hlc, extract(epoch FROM commit_ts), extract(epoch FROM logged_at - commit_ts) * 1000
                       FROM mesh.changelog WHERE origin = '$ORIGIN' AND commit_ts BETWEEN '$T0' AND '$T1')
                       TO STDOUT (FORMAT csv)" >"$TMPD/series-$r.csv"
        done
        join -t, <(sort "$TMPD/series-r2.csv") <(sort "$TMPD/series-r3.csv") |
            join -t, - <(sort "$TMPD/series-r1.csv") |
            awk -F, '{ printf "%.6f,%.2f,%.2f,%.2f\n", $2, $3, $5, $7 }' | sort -t, -k1,1n
    } >"$series"
    log "      per-event lag series: $series"
    # The origin's share of it: capture (commit at the origin -> logged in its change log).
    CAPTURE[$key]="$(lag_stats "$ORIGIN" "$T0" "$T1")"
    IFS='|' read -r n p50 p99 mx <<<"${CAPTURE[$key]}"
    log "      of which capture in $ORIGIN: p50 $p50 ms, p99 $p99 ms, max $mx ms over $n events"
    if [[ "$STAGES" == 1 ]]; then
        STAGES_OF[$key]="$(stages_report "$T0" "$T1")"
        log "      stages, p50 / p99 ms: ${STAGES_OF[$key]}"
    fi
}

lag_run probe "$RATE"
if [[ -n "$RATE2" ]]; then
    log "== 1b. replication lag at $RATE2 tps ($RATE2_DESC)"
    lag_run repl "$RATE2"
fi
# The lag runs by key, and each one's rate and how it was chosen.
KEYS=(probe ${RATE2:+repl})
declare -A RATE_OF=([probe]="$RATE" [repl]="$RATE2") DESC_OF=([probe]="$RATE_DESC" [repl]="${RATE2_DESC:-}")
for x in "${EXTRA_RATES[@]}"; do
    log "== 1c. replication lag at $x tps (BENCH_EXTRA_RATES)"
    lag_run "x$x" "$x"
    KEYS+=("x$x")
    RATE_OF[x$x]="$x"
    DESC_OF[x$x]="BENCH_EXTRA_RATES"
done

# ---------------------------------------------------------------------------
# 2. Catch-up rate.

log "== 2. catch-up: $PAUSED pauses its link from $ORIGIN, $ORIGIN writes a backlog of $BACKLOG events"
paused_before="$(log_count "$PAUSED" "link paused")"
rsql "$PAUSED" "SELECT mesh.pause_link('$ORIGIN')" >/dev/null
wait_log 30 "$PAUSED" "link paused" $((paused_before + 1)) "$PAUSED to pause its link from $ORIGIN"
held0="$(origin_count "$PAUSED")"

PER_CLIENT=$(((BACKLOG + CLIENTS - 1) / CLIENTS))
if [[ "$WORKLOAD" == insert ]]; then
    echo "INSERT INTO bench_events (v) VALUES (1);" >"$TMPD/insert.sql"
    BACKLOG_FLAGS=(-f "$TMPD/insert.sql")
    WORKLOAD_DESC="single-row INSERT transactions"
else
    BACKLOG_FLAGS=(-b tpcb-like)
    WORKLOAD_DESC="pgbench TPC-B transactions"
fi
seq0="$(origin_head)"
checkpoint_all "${ALL_PG[@]}"
run_pgbench "backlog through $ORIGIN's proxy" "$ORIGIN_PROXY" "${BACKLOG_FLAGS[@]}" -t "$PER_CLIENT"
BACKLOG_PGBENCH_TPS="$LAST_TPS"
BACKLOG_EVENTS="$LAST_PROCESSED"
wait_captured "$seq0" "$BACKLOG_EVENTS" "backlog"
# r3 keeps replicating live; let it finish so it does not compete with r2's catch-up.
t0="$(now_s)"
wait_replicated "r3 during the backlog" r3
log "      r3 caught up live with the backlog $(secs_since "$t0")s after capture"

IFS='|' read -r written WRITE_SPAN WRITE_RATE < <(rsql "$ORIGIN" "
    SELECT count(*), round(extract(epoch FROM max(commit_ts) - min(commit_ts))::numeric, 3),
           CASE WHEN max(commit_ts) > min(commit_ts)
                THEN round((count(*) / extract(epoch FROM max(commit_ts) - min(commit_ts)))::numeric, 1)::text
                ELSE 'n/a' END
    FROM mesh.changelog WHERE seq > $seq0")
held1="$(origin_count "$PAUSED")"
((held1 == held0)) ||
    log "WARNING: $PAUSED applied $((held1 - held0)) events from $ORIGIN while its link was paused"
PENDING=$(($(origin_count "$ORIGIN") - held1))
log "      backlog: $written events written in ${WRITE_SPAN}s (first to last origin commit): $WRITE_RATE events/s; $PENDING pending in $PAUSED"

R2_SEQ0="$(rsql "$PAUSED" "SELECT coalesce(max(seq), 0) FROM mesh.changelog")"
RESUMED_AT="$(rsql "$PAUSED" "SELECT clock_timestamp() FROM (SELECT mesh.resume_link('$ORIGIN')) s")"
t0="$(now_s)"
wait_replicated "$PAUSED catching up" "$PAUSED"
log "      $PAUSED caught up in $(secs_since "$t0")s (polled)"

IFS='|' read -r caught CATCHUP_TXNS DRAIN_SECS FIRST_SECS CATCHUP_RATE < <(rsql "$PAUSED" "
    SELECT count(*), count(DISTINCT x),
           round(extract(epoch FROM max(t) - '$RESUMED_AT'::timestamptz)::numeric, 3),
           round(extract(epoch FROM min(t) - '$RESUMED_AT'::timestamptz)::numeric, 3),
           CASE WHEN max(t) > '$RESUMED_AT'::timestamptz
                THEN round((count(*) / extract(epoch FROM max(t) - '$RESUMED_AT'::timestamptz))::numeric, 1)::text
                ELSE 'n/a' END
    FROM (SELECT logged_at AS t, xmin::text AS x
          FROM mesh.changelog WHERE origin = '$ORIGIN' AND seq > $R2_SEQ0) s")
[[ "$caught" == "$PENDING" ]] ||
    log "WARNING: $PAUSED applied $caught events after the resume, $PENDING were pending"
CATCHUP_RATIO="$(ratio "$CATCHUP_RATE" "$WRITE_RATE")"
log "      catch-up: $caught events in $CATCHUP_TXNS apply transactions, the last ${DRAIN_SECS}s after the resume (first after ${FIRST_SECS}s): $CATCHUP_RATE events/s, ${CATCHUP_RATIO}x the write rate"

DEAD=0
CONFLICTS=0
for r in "${REGIONS[@]}"; do
    DEAD=$((DEAD + $(rsql "$r" "SELECT count(*) FROM mesh.dead_letters")))
    CONFLICTS=$((CONFLICTS + $(rsql "$r" "SELECT count(*) FROM mesh.conflicts")))
done
((DEAD == 0)) || log "WARNING: $DEAD dead letters in the mesh"
((CONFLICTS == 0)) || log "WARNING: $CONFLICTS conflicts recorded (only $ORIGIN writes; expected none)"

# Warnings and errors the nodes logged (link errors, apply retries, ...).
NODE_WARNINGS=0
for r in "${REGIONS[@]}"; do
    n="$(grep -cE 'WARN|ERROR' "$TMPD/node-$r.log" || true)"
    NODE_WARNINGS=$((NODE_WARNINGS + n))
    if ((n > 0)); then
        note=""
        [[ "$r" == "$PAUSED" ]] && note=" (pausing the link ends one session with 'peer closed the link')"
        log "NOTE: node $r logged $n warnings/errors$note; the first ones:"
        grep -E 'WARN|ERROR' "$TMPD/node-$r.log" | sed 's/\x1b\[[0-9;]*m//g' | head -n 5 >&2
    fi
done

# The pgmesh part is over: stop its nodes and clusters so the reference runs alone.
log "stopping the pgmesh nodes and clusters"
for r in "${REGIONS[@]}"; do
    stop_pid "${NODE_PID[$r]}" 10
    unset "NODE_PID[$r]"
done
for r in "${REGIONS[@]}"; do
    pg_cluster_stop "$PGBIN" "$TMPD/$r"
done
CLUSTERS=()
for r in "${REGIONS[@]}"; do
    [[ "${BENCH_KEEP:-0}" == 1 ]] || rm -rf "${TMPD:?}/$r"
done

# ---------------------------------------------------------------------------
# 3. Reference: native logical replication.

log "== 3. reference: native logical replication between two fresh clusters"
pg_cluster_create "$PGBIN" "$TMPD/pub" "$PUB_PORT" "${COMMON_CONF[@]}" "${LOGICAL_CONF[@]}"
pg_cluster_create "$PGBIN" "$TMPD/sub" "$SUB_PORT" "${COMMON_CONF[@]}"
CLUSTERS+=("$TMPD/pub")
pg_cluster_start "$PGBIN" "$TMPD/pub" "$TMPD/pub.log"
CLUSTERS+=("$TMPD/sub")
pg_cluster_start "$PGBIN" "$TMPD/sub" "$TMPD/sub.log"
wal_pool "$PUB_PORT"
wal_pool "$SUB_PORT"
log "pgbench -i -s $SCALE on the publisher and the subscriber"
pgbench_init "$PUB_PORT" pub
pgbench_init "$SUB_PORT" sub
psql_at "$PUB_PORT" "CREATE TABLE lagprobe (id bigserial PRIMARY KEY,
    t timestamptz NOT NULL DEFAULT clock_timestamp())" >/dev/null
psql_at "$SUB_PORT" "CREATE TABLE lagprobe (id bigint PRIMARY KEY, t timestamptz NOT NULL,
    applied timestamptz NOT NULL DEFAULT clock_timestamp())" >/dev/null
psql_at "$PUB_PORT" "CREATE PUBLICATION native FOR TABLE pgbench_accounts, pgbench_branches,
    pgbench_tellers, pgbench_history, lagprobe" >/dev/null
PGOPTIONS="-c client_min_messages=warning" psql_at "$SUB_PORT" "CREATE SUBSCRIPTION $SUB
    CONNECTION 'host=127.0.0.1 port=$PUB_PORT dbname=postgres user=postgres'
    PUBLICATION native WITH (copy_data = false)" >/dev/null
wait_until 30 "the native subscriber to stream" sql_true "$PUB_PORT" \
    "SELECT EXISTS (SELECT 1 FROM pg_stat_replication
                    WHERE application_name = '$SUB' AND state = 'streaming')"

# pgbench's built-in tpcb-like script plus the probe row, last before COMMIT.
cat >"$TMPD/tpcb-probe.sql" <<'EOF'
\set aid random(1, 100000 * :scale)
\set bid random(1, 1 * :scale)
\set tid random(1, 10 * :scale)
\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
INSERT INTO lagprobe DEFAULT VALUES;
END;
EOF
settle "$PUB_PORT" "$SUB_PORT"
mark="$(cpu_mark)"
wal0="$(psql_at "$PUB_PORT" "SELECT pg_current_wal_insert_lsn()")"
run_pgbench "native lag at $RATE tps" "$PUB_PORT" -f "$TMPD/tpcb-probe.sql" -s "$SCALE" -R "$RATE" -T "$SECS"
read -r NATIVE_BUSY NATIVE_WAIT < <(cpu_since "$mark")
log "      machine during the run: CPU busy $NATIVE_BUSY, some task waiting for a CPU $NATIVE_WAIT of the time"
log "      WAL written in the publisher: $(wal_per_tx "$PUB_PORT" "$wal0" "$LAST_PROCESSED")"
NATIVE_TPS="$LAST_TPS"
NATIVE_PROCESSED="$LAST_PROCESSED"
want="$(psql_at "$PUB_PORT" "SELECT count(*) FROM lagprobe")"
t0="$(now_s)"
last=-1
since=$SECONDS
while :; do
    have="$(psql_at "$SUB_PORT" "SELECT count(*) FROM lagprobe")"
    ((have >= want)) && break
    if ((have != last)); then
        last=$have
        since=$SECONDS
    elif ((SECONDS - since >= STALL)); then
        tail -n 30 "$TMPD/sub.log" >&2 || true
        die "the native subscriber stalled at $have of $want transactions"
    fi
    sleep 0.2
done
log "      the subscriber caught up $(secs_since "$t0")s after pgbench ended"
IFS='|' read -r NATIVE_N NATIVE_P50 NATIVE_P99 NATIVE_MAX < <(psql_at "$SUB_PORT" "
    SELECT $(stats_select)
    FROM (SELECT extract(epoch FROM applied - t) * 1000 AS ms FROM lagprobe) s")
[[ "$NATIVE_N" == "$NATIVE_PROCESSED" ]] ||
    log "WARNING: the subscriber holds $NATIVE_N probe rows, pgbench committed $NATIVE_PROCESSED"
errors="$(psql_at "$SUB_PORT" "SELECT coalesce(sum(apply_error_count), 0) FROM pg_stat_subscription_stats")"
[[ "$errors" == 0 ]] || log "WARNING: the native subscriber logged $errors apply errors"
log "      native: lag p50 $NATIVE_P50 ms, p99 $NATIVE_P99 ms, max $NATIVE_MAX ms over $NATIVE_N transactions"
psql_at "$SUB_PORT" "DROP SUBSCRIPTION $SUB" >/dev/null 2>&1 ||
    log "NOTE: DROP SUBSCRIPTION failed; the clusters are removed anyway"

# ---------------------------------------------------------------------------
# Results.

NATIVE_REF="native logical replication measured p50 0.6 ms, p99 2.4 ms at half load on this machine (issue 4)"
LAG_TARGET_MS=25
CATCHUP_TARGET=3
judge() { # judge EXPR: "met" / "not met" for an awk condition over numbers
    awk "BEGIN { print ($1) ? \"met\" : \"not met\" }"
}

fmt1() { if [[ -z "$1" || "$1" == n/a ]]; then echo n/a; else printf '%.1f\n' "$1"; fi; }

HEAD=(system link "rate tps" "achieved tps" events "lag p50 ms" "lag p99 ms" "lag max ms")
ROWS=()
declare -A WORST=()
# rows KEY RATE: the table rows of lag run KEY; sets WORST[KEY] (worst peer p99).
rows() {
    local key="$1" rate="$2" r n p50 p99 mx
    for r in r2 r3; do
        IFS='|' read -r n p50 p99 mx <<<"${LAG[$key,$r]}"
        ROWS+=("pgmesh|$ORIGIN -> $r|$rate|$(fmt1 "${TPS[$key]}")|$n|$p50|$p99|$mx")
        if [[ "$p99" != n/a ]]; then
            if [[ -z "${WORST[$key]:-}" ]] || awk -v a="$p99" -v b="${WORST[$key]}" 'BEGIN { exit !(a > b) }'; then
                WORST[$key]="$p99"
            fi
        fi
    done
    IFS='|' read -r n p50 p99 mx <<<"${CAPTURE[$key]}"
    ROWS+=("pgmesh|capture in $ORIGIN|$rate|$(fmt1 "${TPS[$key]}")|$n|$p50|$p99|$mx")
}
rows probe "$RATE"
ROWS+=("native|pub -> sub|$RATE|$(fmt1 "$NATIVE_TPS")|$NATIVE_N|$NATIVE_P50|$NATIVE_P99|$NATIVE_MAX")
for key in "${KEYS[@]:1}"; do rows "$key" "${RATE_OF[$key]}"; done

# verdict KEY: the lag target's verdict for lag run KEY.
verdict() { if [[ -n "${WORST[$1]:-}" ]]; then judge "${WORST[$1]} < $LAG_TARGET_MS"; else echo n/a; fi; }
VERDICT_CATCHUP=n/a
[[ "$CATCHUP_RATIO" != n/a ]] && VERDICT_CATCHUP="$(judge "$CATCHUP_RATIO >= $CATCHUP_TARGET")"

CHEAD=("backlog events" "workload" "write rate ev/s" "catch-up rate ev/s" "ratio" "drain s")
CROW="$PENDING|$WORKLOAD|$WRITE_RATE|$CATCHUP_RATE|${CATCHUP_RATIO}x|$DRAIN_SECS"

RATE_LINE="rate: -R $RATE ($RATE_DESC), ${SECS}s, pgbench TPC-B -c $CLIENTS -j $JOBS through $ORIGIN's proxy (pgmesh) / directly (native)"
for key in "${KEYS[@]:1}"; do RATE_LINE+=$'\n'"and pgmesh at -R ${RATE_OF[$key]} (${DESC_OF[$key]})"; done
TARGET_LINES=(
    "$NATIVE_REF"
    "  this run: native p50 $NATIVE_P50 ms, p99 $NATIVE_P99 ms at $RATE tps"
    "target: pgmesh lag p99 < $LAG_TARGET_MS ms on loopback"
    "  this run, at $RATE tps ($RATE_DESC): worst peer p99 ${WORST[probe]:-n/a} ms -> $(verdict probe)"
)
for key in "${KEYS[@]:1}"; do
    TARGET_LINES+=(
        "  this run, at ${RATE_OF[$key]} tps (${DESC_OF[$key]}): worst peer p99 ${WORST[$key]:-n/a} ms -> $(verdict "$key")"
    )
done
TARGET_LINES+=(
    "target: catch-up rate >= ${CATCHUP_TARGET}x the rate the backlog was written"
    "  this run: $CATCHUP_RATE / $WRITE_RATE events/s = ${CATCHUP_RATIO}x -> $VERDICT_CATCHUP"
)

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"
CSV="$OUT/replication-$STAMP.csv"
MD="$OUT/replication-$STAMP.md"

TFMT='%-7s  %-13s  %8s  %12s  %7s  %10s  %10s  %10s\n'
CFMT='%-14s  %-8s  %15s  %18s  %8s  %8s\n'
# shellcheck disable=SC2059
{
    printf "$TFMT" "${HEAD[@]}"
    for row in "${ROWS[@]}"; do
        IFS='|' read -r -a f <<<"$row"
        printf "$TFMT" "${f[@]}"
    done
    echo "$RATE_LINE"
    echo
    printf "$CFMT" "${CHEAD[@]}"
    IFS='|' read -r -a f <<<"$CROW"
    printf "$CFMT" "${f[@]}"
    echo
    printf '%s\n' "${TARGET_LINES[@]}"
}

{
    echo "measure,system,link,rate_tps,achieved_tps,events,apply_txns,lag_p50_ms,lag_p99_ms,lag_max_ms,write_rate_eps,catchup_rate_eps,catchup_ratio,drain_s,first_apply_s"
    for key in "${KEYS[@]}"; do
        rate="${RATE_OF[$key]}"
        for r in r2 r3; do
            IFS='|' read -r n p50 p99 mx <<<"${LAG[$key,$r]}"
            echo "lag,pgmesh,$ORIGIN->$r,$rate,${TPS[$key]},$n,${BATCHES[$key,$r]},$p50,$p99,$mx,,,,,"
        done
        IFS='|' read -r n p50 p99 mx <<<"${CAPTURE[$key]}"
        echo "capture,pgmesh,$ORIGIN,$rate,${TPS[$key]},$n,,$p50,$p99,$mx,,,,,"
    done
    echo "lag,native,pub->sub,$RATE,$NATIVE_TPS,$NATIVE_N,,$NATIVE_P50,$NATIVE_P99,$NATIVE_MAX,,,,,"
    echo "catchup,pgmesh,$ORIGIN->$PAUSED,,$BACKLOG_PGBENCH_TPS,$PENDING,$CATCHUP_TXNS,,,,$WRITE_RATE,$CATCHUP_RATE,$CATCHUP_RATIO,$DRAIN_SECS,$FIRST_SECS"
} >"$CSV"

# Per lag run, for the summary below.
MORE_RUNS="" RUN_BATCHES="" RUN_CPU=""
for key in "${KEYS[@]}"; do
    [[ "$key" == probe ]] || MORE_RUNS+=" -R ${RATE_OF[$key]} (${DESC_OF[$key]})"
    RUN_BATCHES+="${RUN_BATCHES:+;} at ${RATE_OF[$key]} tps: r2 ${BATCHES[$key,r2]:-}, r3 ${BATCHES[$key,r3]:-}"
    RUN_CPU+="${RUN_CPU:+;} pgmesh at ${RATE_OF[$key]} tps ${BUSY[$key]:-} / ${WAIT[$key]:-}"
done

GIT_REV="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [[ "$GIT_REV" != unknown ]] && [[ -n "$(git -C "$ROOT" status --porcelain 2>/dev/null)" ]]; then
    GIT_REV="$GIT_REV (dirty tree)"
fi
{
    echo "# pgmesh replication benchmark, $STAMP"
    echo
    echo "- pgmesh: $PGMESH_VERSION, commit $GIT_REV"
    echo "- $PG_VERSION; $FSYNC_DESC; shared_buffers=256MB; every cluster on this host"
    echo "- pgmesh: regions r1, r2, r3, full mesh, plain TCP on loopback; every write goes to r1 through its proxy"
    echo "- max-throughput probe: pgbench TPC-B -c $CLIENTS -j $JOBS -T $PROBE_SECS through r1's proxy: $(fmt1 "$MAX_TPS") tps; meanwhile the slowest peer applied $(fmt1 "$REPL_MAX") events/s of it (events logged in the peer before the probe ended, per second of the probe)"
    echo "- lag runs: pgbench -n TPC-B (-M simple), scale $SCALE, -c $CLIENTS -j $JOBS, -R $RATE ($RATE_DESC)${MORE_RUNS:+ and, pgmesh only,$MORE_RUNS}, ${SECS}s each"
    echo "- pgmesh lag: mesh.changelog.logged_at in the peer (clock_timestamp() when apply logs the batch, its last step before the checkpoint update and COMMIT) - commit_ts (origin commit time), every event of the run; the \"capture in $ORIGIN\" row is the origin's share (logged_at - commit_ts in $ORIGIN's change log)"
    echo "- native lag: publication/subscription (copy_data = false) between two fresh clusters, run after the pgmesh clusters were stopped; the TPC-B transaction plus INSERT INTO lagprobe; lag = lagprobe.applied (subscriber-side default clock_timestamp()) - lagprobe.t (clock_timestamp() at the origin)"
    echo "- catch-up: r2 paused its link from r1 (mesh.pause_link), r1 wrote $PENDING $WORKLOAD_DESC (pgbench -c $CLIENTS -j $JOBS -t $PER_CLIENT, $(fmt1 "$BACKLOG_PGBENCH_TPS") tps by pgbench) while r3 replicated live; write rate = events / (last - first origin commit, ${WRITE_SPAN}s); catch-up rate = events / (last logged_at in r2 - resume, ${DRAIN_SECS}s; the first batch was logged ${FIRST_SECS}s after the resume)"
    echo "- apply transactions (batches) during the lag run$RUN_BATCHES"
    echo "- dead letters in the mesh: $DEAD; conflicts: $CONFLICTS; warning/error lines in the node logs: $NODE_WARNINGS (the pause accounts for one)"
    echo "- host: $(nproc 2>/dev/null || echo '?') CPUs, $(uname -sr)"
    echo "- CPU during the lag runs (whole machine, /proc/stat and /proc/pressure/cpu, busy / some task waiting for a CPU):$RUN_CPU; native busy $NATIVE_BUSY, waiting $NATIVE_WAIT"
    echo
    echo "## Replication lag"
    echo
    printf '| %s ' "${HEAD[@]}"
    echo "|"
    printf '|%s' "---" "---" "--:" "--:" "--:" "--:" "--:" "--:"
    echo "|"
    for row in "${ROWS[@]}"; do
        echo "| ${row//|/ | } |"
    done
    echo
    if [[ "$STAGES" == 1 ]]; then
        echo "## Where the lag goes (BENCH_STAGES=1)"
        echo
        echo "Per stage, p50 / p99 in ms (see bench/stages.sh): wait = commit at the origin to capture's append transaction beginning; append = that transaction to logged_at; ship = logged in $ORIGIN to the peer's apply transaction beginning (the append's commit, the link, the batch before); apply = that transaction to logged_at."
        echo
        for key in "${KEYS[@]}"; do
            echo "- at ${RATE_OF[$key]} tps: ${STAGES_OF[$key]:-n/a}"
        done
        echo
    fi
    if [[ -n "${PARTS[probe]:-}" ]]; then
        echo "## CPU by part during the lag run at $RATE tps"
        echo
        echo "Over the run's middle (all but its first and last second): each node process, each region's PostgreSQL sessions by application_name, and the pgbench client. 100% is one CPU; the machine has $(nproc 2>/dev/null || echo '?')."
        echo
        echo "The last column is the same part's CPU per transaction during the max-throughput probe ($(fmt1 "$MAX_TPS") tps), where every stage batches the most."
        echo
        echo "| part | % of one CPU | us per transaction | us per transaction at the probe |"
        echo "|---|--:|--:|--:|"
        declare -A at_max=()
        while IFS='|' read -r part pct us; do
            [[ -n "$part" ]] && at_max[$part]="$us"
        done <<<"$MAX_PARTS"
        while IFS='|' read -r part pct us; do
            [[ -n "$part" ]] && echo "| $part | $pct | $us | ${at_max[$part]:-n/a} |"
        done <<<"${PARTS[probe]}"
        echo "| all parts | | $(parts_total "${PARTS[probe]}") | ${MAX_PARTS:+$(parts_total "$MAX_PARTS")} |"
        echo
    fi
    echo "## Catch-up"
    echo
    printf '| %s ' "${CHEAD[@]}"
    echo "|"
    printf '|%s' "--:" "---" "--:" "--:" "--:" "--:"
    echo "|"
    echo "| ${CROW//|/ | } |"
    echo
    echo "## Targets (issue 4)"
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
