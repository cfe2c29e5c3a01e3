#!/usr/bin/env bash
# bench/proxy.sh: pgbench throughput direct vs. through pgmesh vs. through PgBouncer.
#
# A benchmark, not a test: it prints figures and never judges them. It creates a fresh
# PostgreSQL cluster, PgBouncer and pgmesh in a temp dir, runs the pgbench matrix, and
# removes everything on exit, whether it succeeds, fails or is interrupted.
# Run with --help for the options.

set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bench/proxy.sh [--help]

pgbench throughput against a fresh PostgreSQL cluster, three ways:
  direct     pgbench -> PostgreSQL
  pgmesh     pgbench -> pgmesh run -> PostgreSQL
  pgbouncer  pgbench -> PgBouncer (session pooling) -> PostgreSQL

Matrix: workloads {select-only (-S), tpcb-like (default)} x modes {-M simple,
-M prepared} x clients {-c 1 -j 1, -c 16 -j 2}; the three targets run back to back
inside each cell, in a rotating order, so noise hits all three alike.

Prints a table on stdout and writes it to $BENCH_OUT/proxy-<timestamp>.{csv,md}.
Progress goes to stderr. A pgbench failure (non-zero exit, or any failed
transaction) aborts the run and shows pgbench's output.

Environment:
  BENCH_SECONDS  seconds per pgbench run (-T)                    [20]
  BENCH_SCALE    pgbench -i scale factor                         [10]
  BENCH_FAST     1: fsync=off, synchronous_commit=off (CI form)  [0: fsync on]
  BENCH_OUT      directory for the result files                  [bench-results]
  BENCH_PG_CONF  extra postgresql.conf lines for every cluster, separated by ";"
  PGMESH_BIN     pgmesh binary to use; skips `cargo build --release -p pgmesh-proxy`
  PGBOUNCER_BIN  pgbouncer binary, or "none" to skip it  [/usr/sbin/pgbouncer, else PATH]
  BENCH_INSTALL  1: apt-get install pgbouncer if missing (root only)  [0]
  PGMESH_PG_BIN  PostgreSQL bin dir   [dir of initdb on PATH, else /usr/lib/postgresql/*/bin]

Without PgBouncer the pgbouncer columns read n/a. When run as root, initdb, pg_ctl
and pgbouncer run as the `postgres` OS user.

Examples:
  bench/proxy.sh                                   # full run, ~24 x 20 s
  BENCH_SECONDS=2 BENCH_FAST=1 bench/proxy.sh      # short CI form
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

SECS="${BENCH_SECONDS:-20}"
SCALE="${BENCH_SCALE:-10}"
FAST="${BENCH_FAST:-0}"
OUT="${BENCH_OUT:-bench-results}"
[[ "$SECS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_SECONDS must be a positive integer, got '$SECS'"
[[ "$SCALE" =~ ^[1-9][0-9]*$ ]] || die "BENCH_SCALE must be a positive integer, got '$SCALE'"

# ---------------------------------------------------------------------------
# Cleanup. Everything started below is recorded here so the EXIT trap can stop it.

TMPD=""
PGMESH_PID=""
BOUNCER_PID=""    # runuser (as root) or pgbouncer itself
PGBENCH_PID=""
PG_STARTED=0
PGBIN=""

cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    set +e
    stop_pid "$PGBENCH_PID" 5
    stop_pid "$PGMESH_PID" 5
    if [[ -n "$TMPD" && -s "$TMPD/pgbouncer.pid" ]]; then
        pid="$(head -n 1 "$TMPD/pgbouncer.pid")"
        [[ "$pid" =~ ^[0-9]+$ ]] && stop_pid "$pid" 5
    fi
    stop_pid "$BOUNCER_PID" 5
    if ((PG_STARTED)); then
        if ! as_server "$TMPD" "$PGBIN/pg_ctl" -D "$TMPD/data" -m immediate -w -t 30 stop >/dev/null 2>&1; then
            if [[ -s "$TMPD/data/postmaster.pid" ]]; then
                pid="$(head -n 1 "$TMPD/data/postmaster.pid")"
                [[ "$pid" =~ ^[0-9]+$ ]] && kill -KILL "$pid" 2>/dev/null
            fi
        fi
    fi
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

PGBIN="$(pg_bindir)"
PGBENCH="$(pick_client pgbench)"
PSQL="$(pick_client psql)"

BOUNCER="${PGBOUNCER_BIN:-}"
if [[ "$BOUNCER" == none ]]; then
    BOUNCER=""
    log "NOTE: PGBOUNCER_BIN=none; skipping the pgbouncer column."
elif [[ -z "$BOUNCER" ]]; then
    if [[ -x /usr/sbin/pgbouncer ]]; then
        BOUNCER=/usr/sbin/pgbouncer
    elif command -v pgbouncer >/dev/null 2>&1; then
        BOUNCER="$(command -v pgbouncer)"
    elif [[ "${BENCH_INSTALL:-0}" == 1 ]] && is_root; then
        log "installing pgbouncer with apt-get (BENCH_INSTALL=1)"
        { apt-get install -y pgbouncer || { apt-get update && apt-get install -y pgbouncer; }; } >&2 ||
            die "apt-get install pgbouncer failed"
        BOUNCER=/usr/sbin/pgbouncer
    fi
fi
if [[ -n "$BOUNCER" ]]; then
    [[ -x "$BOUNCER" ]] || die "pgbouncer binary $BOUNCER is not executable"
elif [[ "${PGBOUNCER_BIN:-}" != none ]]; then
    log "NOTE: pgbouncer not found (install the Debian package 'pgbouncer', set PGBOUNCER_BIN,"
    log "      or run as root with BENCH_INSTALL=1); skipping the pgbouncer column."
fi

if is_root; then
    id postgres >/dev/null 2>&1 || die "running as root needs a 'postgres' OS user to run PostgreSQL"
fi

PG_VERSION="$("$PGBIN/postgres" --version)"
PGMESH_VERSION="$("$PGMESH_BIN" --version 2>/dev/null || echo unknown)"
BOUNCER_VERSION="n/a"
[[ -n "$BOUNCER" ]] && BOUNCER_VERSION="$("$BOUNCER" --version 2>/dev/null | head -n 1)"
log "PostgreSQL: $PG_VERSION ($PGBIN)"
log "pgmesh:     $PGMESH_VERSION ($PGMESH_BIN)"
log "PgBouncer:  $BOUNCER_VERSION${BOUNCER:+ ($BOUNCER)}"

# ---------------------------------------------------------------------------
# Fresh cluster. /tmp rather than $TMPDIR: the postgres OS user must reach it.

TMPD="$(mktemp -d /tmp/pgmesh-bench.XXXXXX)"
mapfile -t ports < <(free_ports 3)
((${#ports[@]} == 3)) || die "could not find free ports"
PG_PORT="${ports[0]}"
MESH_PORT="${ports[1]}"
BOUNCER_PORT="${ports[2]}"
is_root && chown postgres: "$TMPD"

log "initdb into $TMPD/data"
as_server "$TMPD" "$PGBIN/initdb" -D "$TMPD/data" -A trust -U postgres -E UTF8 --locale=C \
    >"$TMPD/initdb.log" 2>&1 || {
    cat "$TMPD/initdb.log" >&2
    die "initdb failed"
}
{
    echo "# bench/proxy.sh"
    echo "listen_addresses = '127.0.0.1'"
    echo "port = $PG_PORT"
    echo "unix_socket_directories = '$TMPD'"
    echo "max_connections = 200"
    echo "shared_buffers = 256MB"
    if [[ "$FAST" == 1 ]]; then
        echo "fsync = off"
        echo "synchronous_commit = off"
    fi
} >>"$TMPD/data/postgresql.conf"
FSYNC_DESC="fsync=on, synchronous_commit=on"
[[ "$FAST" == 1 ]] && FSYNC_DESC="fsync=off, synchronous_commit=off (BENCH_FAST=1)"

log "starting PostgreSQL on 127.0.0.1:$PG_PORT ($FSYNC_DESC)"
PG_STARTED=1
as_server "$TMPD" "$PGBIN/pg_ctl" -D "$TMPD/data" -l "$TMPD/postgres.log" -w -t 60 start \
    >/dev/null 2>&1 || {
    tail -n 40 "$TMPD/postgres.log" >&2 || true
    die "PostgreSQL did not start"
}

# psql_at PORT SQL: one query as postgres through 127.0.0.1:PORT.
psql_at() {
    "$PSQL" -X -A -t -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$1" -U postgres -d postgres -c "$2"
}

log "pgbench -i -s $SCALE (direct)"
"$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U postgres postgres \
    >"$TMPD/pgbench-init.log" 2>&1 || {
    cat "$TMPD/pgbench-init.log" >&2
    die "pgbench -i failed"
}

# ---------------------------------------------------------------------------
# pgmesh and PgBouncer, in the background (never daemonized), stopped by cleanup.

log "starting pgmesh on 127.0.0.1:$MESH_PORT"
"$PGMESH_BIN" run --listen "127.0.0.1:$MESH_PORT" \
    --upstream "postgres://postgres@127.0.0.1:$PG_PORT/postgres" \
    --shutdown-grace-secs 2 >"$TMPD/pgmesh.log" 2>&1 &
PGMESH_PID=$!
wait_ready 30 pgmesh "$PGMESH_PID" "$TMPD/pgmesh.log" psql_at "$MESH_PORT" "select 1"

if [[ -n "$BOUNCER" ]]; then
    log "starting PgBouncer (session pooling) on 127.0.0.1:$BOUNCER_PORT"
    printf '"postgres" ""\n' >"$TMPD/userlist.txt"
    cat >"$TMPD/pgbouncer.ini" <<EOF
[databases]
postgres = host=127.0.0.1 port=$PG_PORT dbname=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $TMPD/userlist.txt
pool_mode = session
max_client_conn = 200
default_pool_size = 40
logfile = $TMPD/pgbouncer.log
pidfile = $TMPD/pgbouncer.pid
ignore_startup_parameters = extra_float_digits
EOF
    is_root && chown postgres: "$TMPD/userlist.txt" "$TMPD/pgbouncer.ini"
    if is_root; then
        (cd "$TMPD" && exec runuser -u postgres -- "$BOUNCER" "$TMPD/pgbouncer.ini") \
            >"$TMPD/pgbouncer.out" 2>&1 &
    else
        (cd "$TMPD" && exec "$BOUNCER" "$TMPD/pgbouncer.ini") >"$TMPD/pgbouncer.out" 2>&1 &
    fi
    BOUNCER_PID=$!
    wait_ready 30 pgbouncer "$BOUNCER_PID" "$TMPD/pgbouncer.out" psql_at "$BOUNCER_PORT" "select 1"
fi

# ---------------------------------------------------------------------------
# The matrix.

WORKLOADS=(select-only tpcb-like)
MODES=(simple prepared)
CLIENTS=(1 16)
TARGETS=(direct pgmesh)
[[ -n "$BOUNCER" ]] && TARGETS+=(pgbouncer)
declare -A PORT=([direct]="$PG_PORT" [pgmesh]="$MESH_PORT" [pgbouncer]="$BOUNCER_PORT")
declare -A TPS=()

TOTAL=$((${#WORKLOADS[@]} * ${#MODES[@]} * ${#CLIENTS[@]} * ${#TARGETS[@]}))
RUN=0
log "running $TOTAL pgbench runs of ${SECS}s each (about $((TOTAL * SECS / 60 + 1)) min)"

# pgbench_failed OUTFILE MSG: shows pgbench's output, and the log of any proxy that
# has died meanwhile, then dies with MSG.
pgbench_failed() {
    printf 'FAILED\n' >&2
    cat "$1" >&2
    if ! kill -0 "$PGMESH_PID" 2>/dev/null; then
        log "pgmesh has exited; last lines of its log:"
        tail -n 40 "$TMPD/pgmesh.log" >&2 || true
    fi
    if [[ -n "$BOUNCER_PID" ]] && ! kill -0 "$BOUNCER_PID" 2>/dev/null; then
        log "pgbouncer has exited; last lines of its log:"
        tail -n 40 "$TMPD/pgbouncer.log" "$TMPD/pgbouncer.out" >&2 || true
    fi
    die "$2"
}

# run_one TARGET WORKLOAD MODE CLIENTS: one pgbench run; stores its TPS in TPS[].
run_one() {
    local target="$1" workload="$2" mode="$3" clients="$4"
    local jobs=1 flags=() outf failed tps
    ((clients > 1)) && jobs=2
    if [[ "$workload" == select-only ]]; then
        flags+=(-S)
    else
        flags+=(-b tpcb-like)
    fi
    flags+=(-M "$mode" -c "$clients" -j "$jobs" -T "$SECS")
    RUN=$((RUN + 1))
    printf '[%d/%d] %s %s ... ' "$RUN" "$TOTAL" "$target" "${flags[*]}" >&2

    # Start every run from a clean slate of dirty buffers, whoever ran before.
    psql_at "$PG_PORT" "checkpoint" >/dev/null

    outf="$TMPD/run-$RUN.log"
    # In the background and waited for, so a signal to this script is handled at once
    # (cleanup stops pgbench) instead of after the run.
    "$PGBENCH" "${flags[@]}" -h 127.0.0.1 -p "${PORT[$target]}" -U postgres postgres \
        >"$outf" 2>&1 &
    PGBENCH_PID=$!
    if ! wait "$PGBENCH_PID"; then
        PGBENCH_PID=""
        pgbench_failed "$outf" "pgbench failed: $target ${flags[*]}"
    fi
    PGBENCH_PID=""
    failed="$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$outf")"
    if [[ -n "$failed" && "$failed" != 0 ]]; then
        pgbench_failed "$outf" "pgbench reported $failed failed transactions: $target ${flags[*]}"
    fi
    tps="$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time).*/\1/p' "$outf" | head -n 1)"
    [[ -n "$tps" ]] || tps="$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$outf" | tail -n 1)"
    if [[ -z "$tps" ]]; then
        printf '?\n' >&2
        cat "$outf" >&2
        die "no tps line in pgbench output: $target ${flags[*]}"
    fi
    printf '%.1f tps\n' "$tps" >&2
    TPS["$target,$workload,$mode,$clients"]="$tps"
}

group=0
for workload in "${WORKLOADS[@]}"; do
    for mode in "${MODES[@]}"; do
        for clients in "${CLIENTS[@]}"; do
            # Rotate the order per cell so no target always runs first (or last).
            n=${#TARGETS[@]}
            for ((i = 0; i < n; i++)); do
                run_one "${TARGETS[$(((i + group) % n))]}" "$workload" "$mode" "$clients"
            done
            group=$((group + 1))
        done
    done
done

# ---------------------------------------------------------------------------
# Results.

fmt_tps() {
    if [[ -z "$1" ]]; then echo n/a; else printf '%.1f\n' "$1"; fi
}

HEAD=(workload mode clients "direct TPS" "pgmesh TPS" "pgmesh/direct" "pgbouncer TPS" "pgbouncer/direct" "pgmesh > pgbouncer")
ROWS=()
for workload in "${WORKLOADS[@]}"; do
    for mode in "${MODES[@]}"; do
        for clients in "${CLIENTS[@]}"; do
            k="$workload,$mode,$clients"
            d="${TPS[direct,$k]}"
            m="${TPS[pgmesh,$k]}"
            b="${TPS[pgbouncer,$k]:-}"
            if [[ -n "$b" ]]; then
                better="$(awk -v m="$m" -v b="$b" 'BEGIN { print (m + 0 > b + 0) ? "yes" : "no" }')"
            else
                better=n/a
            fi
            ROWS+=("$workload|$mode|$clients|$(fmt_tps "$d")|$(fmt_tps "$m")|$(ratio "$m" "$d")|$(fmt_tps "$b")|$(ratio "$b" "$d")|$better")
        done
    done
done

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"
CSV="$OUT/proxy-$STAMP.csv"
MD="$OUT/proxy-$STAMP.md"

# Plain table on stdout.
TFMT='%-11s  %-8s  %7s  %11s  %11s  %13s  %13s  %16s  %18s\n'
# shellcheck disable=SC2059
{
    printf "$TFMT" "${HEAD[@]}"
    for row in "${ROWS[@]}"; do
        IFS='|' read -r -a f <<<"$row"
        printf "$TFMT" "${f[@]}"
    done
}

{
    echo "workload,mode,clients,direct_tps,pgmesh_tps,pgmesh_direct_ratio,pgbouncer_tps,pgbouncer_direct_ratio,pgmesh_gt_pgbouncer"
    for row in "${ROWS[@]}"; do
        echo "${row//|/,}"
    done
} >"$CSV"

GIT_REV="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [[ "$GIT_REV" != unknown ]] && [[ -n "$(git -C "$ROOT" status --porcelain 2>/dev/null)" ]]; then
    GIT_REV="$GIT_REV (dirty tree)"
fi
{
    echo "# pgmesh proxy benchmark, $STAMP"
    echo
    echo "- pgmesh: $PGMESH_VERSION, commit $GIT_REV"
    echo "- $PG_VERSION; $FSYNC_DESC; shared_buffers=256MB; max_connections=200"
    if [[ -n "$BOUNCER" ]]; then
        echo "- PgBouncer: $BOUNCER_VERSION (session pooling, default_pool_size=40)"
    else
        echo "- PgBouncer: not run"
    fi
    echo "- pgbench scale $SCALE, ${SECS}s per run; -c 1 -j 1 and -c 16 -j 2; targets interleaved per cell"
    echo "- host: $(nproc 2>/dev/null || echo '?') CPUs, $(uname -sr)"
    echo
    printf '| %s ' "${HEAD[@]}"
    echo "|"
    printf '|%s' "---" "---" "--:" "--:" "--:" "--:" "--:" "--:" "---"
    echo "|"
    for row in "${ROWS[@]}"; do
        echo "| ${row//|/ | } |"
    done
} >"$MD"

log "wrote $CSV"
log "wrote $MD"
