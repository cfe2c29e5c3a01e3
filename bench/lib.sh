# shellcheck shell=bash
# Helpers shared by the pgmesh benchmarks in bench/. Source it; it does not run anything.
#
# Conventions: progress and errors go to stderr, results to stdout. Server-side
# PostgreSQL tools (initdb, pg_ctl, postgres, pgbouncer) refuse to run as root, so
# when the effective uid is 0 they run as the `postgres` OS user via
# `runuser -u postgres --` (see as_server). Client tools run as whoever we are.

# log MSG...: a progress line on stderr.
log() {
    printf '%s\n' "$*" >&2
}

# die MSG...: an error on stderr, then exit 1 (the caller's EXIT trap cleans up).
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# is_root: whether the effective uid is 0.
is_root() {
    [[ "$(id -u)" == 0 ]]
}

# pg_bindir: prints the PostgreSQL bin directory holding initdb, pg_ctl and postgres.
# Order: $PGMESH_PG_BIN, the directory of `initdb` on PATH (symlinks resolved),
# then the highest version under /usr/lib/postgresql/*/bin.
pg_bindir() {
    local d found
    if [[ -n "${PGMESH_PG_BIN:-}" ]]; then
        [[ -x "$PGMESH_PG_BIN/pg_ctl" ]] || die "PGMESH_PG_BIN=$PGMESH_PG_BIN has no pg_ctl"
        printf '%s\n' "$PGMESH_PG_BIN"
        return
    fi
    if found="$(command -v initdb 2>/dev/null)"; then
        d="$(dirname "$(readlink -f "$found")")"
        if [[ -x "$d/pg_ctl" && -x "$d/postgres" ]]; then
            printf '%s\n' "$d"
            return
        fi
    fi
    found=""
    for d in /usr/lib/postgresql/*/bin; do
        [[ -x "$d/initdb" && -x "$d/pg_ctl" ]] || continue
        if [[ -z "$found" ]] || [[ "$(basename "$(dirname "$d")")" -gt "$(basename "$(dirname "$found")")" ]] 2>/dev/null; then
            found="$d"
        fi
    done
    [[ -n "$found" ]] || die "no PostgreSQL binaries: initdb is not on PATH and /usr/lib/postgresql/*/bin is empty"
    printf '%s\n' "$found"
}

# free_ports N: prints N distinct free TCP ports on 127.0.0.1, one per line. They are
# held open together while chosen so they differ; something else could still take one
# before we bind it, which the callers' startup checks would report.
free_ports() {
    local n="$1"
    if command -v python3 >/dev/null 2>&1; then
        python3 - "$n" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
for s in socks:
    print(s.getsockname()[1])
for s in socks:
    s.close()
EOF
        return
    fi
    command -v ss >/dev/null 2>&1 || die "need python3 or ss to find free ports"
    local used port picked=()
    used="$(ss -Htan | awk '{print $4}' | sed 's/.*://' | sort -u)"
    while ((${#picked[@]} < n)); do
        port=$((20000 + RANDOM % 40000))
        if ! grep -qx "$port" <<<"$used" && [[ " ${picked[*]} " != *" $port "* ]]; then
            picked+=("$port")
        fi
    done
    printf '%s\n' "${picked[@]}"
}

# as_server DIR CMD...: runs CMD with DIR as working directory, as the `postgres` OS
# user when we are root (it may not be able to read our working directory).
as_server() {
    local dir="$1"
    shift
    if is_root; then
        (cd "$dir" && exec runuser -u postgres -- "$@")
    else
        (cd "$dir" && exec "$@")
    fi
}

# wait_ready SECS NAME PID LOGFILE CMD...: retries CMD every 0.2 s until it succeeds.
# Dies, showing the tail of LOGFILE, if process PID exits first or SECS pass.
wait_ready() {
    local secs="$1" name="$2" pid="$3" logfile="$4" end
    shift 4
    end=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "$name exited during startup; last lines of $logfile:"
            tail -n 40 "$logfile" >&2 2>/dev/null || true
            die "$name did not start"
        fi
        if ((SECONDS >= end)); then
            log "$name not ready after ${secs}s; last lines of $logfile:"
            tail -n 40 "$logfile" >&2 2>/dev/null || true
            die "$name did not become ready"
        fi
        sleep 0.2
    done
}

# stop_pid PID [GRACE_SECS]: SIGTERM, wait up to GRACE_SECS (default 5) for it to
# go, then SIGKILL. Quiet, and never fails: it is for cleanup paths.
stop_pid() {
    local pid="$1" grace="${2:-5}" i
    [[ -n "$pid" ]] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    # Reap it if it is our child, so no zombie outlives us.
    wait "$pid" 2>/dev/null || true
}

# ratio A B: A/B with 3 decimals, or "n/a" when either is missing or B is zero.
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN {
        if (a == "" || b == "" || a == "n/a" || b == "n/a" || b + 0 == 0) print "n/a";
        else printf "%.3f\n", a / b }'
}

# wait_until SECS WHAT CMD...: retries CMD every 0.2 s until it succeeds; dies naming
# WHAT if SECS pass first. For conditions with no process of ours to watch.
wait_until() {
    local secs="$1" what="$2" end
    shift 2
    end=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || die "timed out after ${secs}s waiting for $what"
        sleep 0.2
    done
}

# now_s: the wall clock in seconds, with fractions.
now_s() {
    date +%s.%N
}

# secs_since T0: seconds elapsed since T0 (a now_s value), 1 decimal.
secs_since() {
    awk -v a="$1" -v b="$(now_s)" 'BEGIN { printf "%.1f\n", b - a }'
}

# cpu_mark: the machine's CPU counters now, for cpu_since: busy and total jiffies
# from /proc/stat, the microseconds some task waited for a CPU (/proc/pressure/cpu,
# 0 without PSI) and the time.
cpu_mark() {
    local psi=0
    if [[ -r /proc/pressure/cpu ]]; then
        psi="$(awk '/^some/ { sub("total=", "", $5); print $5 }' /proc/pressure/cpu)"
    fi
    awk -v psi="$psi" -v t="$(now_s)" '/^cpu / {
        total = 0; for (i = 2; i <= NF; i++) total += $i
        print total - $5 - $6, total, psi, t; exit }' /proc/stat
}

# cpu_since MARK: since MARK (from cpu_mark), the share of CPU time the machine was
# busy, and the share of wall time some task was runnable but waiting for a CPU
# (PSI "some"; "n/a" without PSI), as "BUSY% WAIT%".
cpu_since() {
    local now
    now="$(cpu_mark)"
    awk -v a="$1" -v b="$now" -v psi="$([[ -r /proc/pressure/cpu ]] && echo 1 || echo 0)" 'BEGIN {
        split(a, x, " "); split(b, y, " ")
        busy = (y[2] > x[2]) ? 100 * (y[1] - x[1]) / (y[2] - x[2]) : 0
        wait = (y[4] > x[4]) ? (y[3] - x[3]) / 1e6 / (y[4] - x[4]) * 100 : 0
        if (psi) printf "%.0f%% %.0f%%\n", busy, wait; else printf "%.0f%% n/a\n", busy }'
}

# pg_cluster_create PGBIN DIR PORT [CONF_LINE...]: a fresh cluster in DIR (trust
# auth, superuser postgres, UTF8, C locale) listening on 127.0.0.1:PORT with its
# socket in DIR's parent, plus CONF_LINEs appended to postgresql.conf. DIR's parent
# must belong to the server user (see as_server). Shows initdb's output on failure.
pg_cluster_create() {
    local pgbin="$1" dir="$2" port="$3" parent
    shift 3
    parent="$(dirname "$dir")"
    as_server "$parent" "$pgbin/initdb" -D "$dir" -A trust -U postgres -E UTF8 --locale=C \
        >"$dir.initdb.log" 2>&1 || {
        cat "$dir.initdb.log" >&2
        die "initdb $dir failed"
    }
    {
        echo "# pgmesh bench"
        echo "listen_addresses = '127.0.0.1'"
        echo "port = $port"
        echo "unix_socket_directories = '$parent'"
        local line
        for line in "$@"; do
            echo "$line"
        done
        # BENCH_PG_CONF: extra lines for every bench cluster, separated by ';'
        # (profiling, e.g. "shared_preload_libraries = 'pg_stat_statements'").
        if [[ -n "${BENCH_PG_CONF:-}" ]]; then
            tr ';' '\n' <<<"$BENCH_PG_CONF"
        fi
    } >>"$dir/postgresql.conf"
}

# pg_cluster_start PGBIN DIR LOGFILE: starts the cluster in DIR, waiting up to 60 s;
# dies showing the tail of LOGFILE if it does not come up.
pg_cluster_start() {
    local pgbin="$1" dir="$2" logfile="$3"
    as_server "$(dirname "$dir")" "$pgbin/pg_ctl" -D "$dir" -l "$logfile" -w -t 60 start \
        >/dev/null 2>&1 || {
        tail -n 40 "$logfile" >&2 || true
        die "PostgreSQL in $dir did not start"
    }
}

# pg_cluster_stop PGBIN DIR: immediate shutdown of the cluster in DIR; SIGKILLs the
# postmaster if pg_ctl cannot. Quiet, and never fails: it is for cleanup paths.
pg_cluster_stop() {
    local pgbin="$1" dir="$2" pid
    [[ -d "$dir" ]] || return 0
    if ! as_server "$(dirname "$dir")" "$pgbin/pg_ctl" -D "$dir" -m immediate -w -t 30 stop \
        >/dev/null 2>&1; then
        if [[ -s "$dir/postmaster.pid" ]]; then
            pid="$(head -n 1 "$dir/postmaster.pid")"
            [[ "$pid" =~ ^[0-9]+$ ]] && kill -KILL "$pid" 2>/dev/null
        fi
    fi
    return 0
}

# pgbench_tps FILE: the tps pgbench printed in FILE (the figure without initial
# connection time when there is one), or nothing.
pgbench_tps() {
    local tps
    tps="$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time).*/\1/p' "$1" | head -n 1)"
    [[ -n "$tps" ]] || tps="$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$1" | tail -n 1)"
    printf '%s\n' "$tps"
}

# pgbench_failed_txns FILE: the "number of failed transactions" in FILE, or nothing
# (older pgbench does not print it).
pgbench_failed_txns() {
    sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$1" | head -n 1
}

# pgbench_processed FILE: the "number of transactions actually processed" in FILE.
pgbench_processed() {
    sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$1" | head -n 1
}

# Path of a client program ($1): from $PGBIN (set by the caller) first, else PATH.
# shellcheck disable=SC2153
pick_client() {
    if [[ -x "$PGBIN/$1" ]]; then
        printf '%s\n' "$PGBIN/$1"
    else
        command -v "$1" || die "$1 not found in $PGBIN or on PATH"
    fi
}

# proc_cpu_ticks PID...: "PID TICKS" per live PID, TICKS = its user + system CPU time
# in clock ticks (/proc/PID/stat fields 14 and 15, counted after the command name).
proc_cpu_ticks() {
    local pid
    for pid in "$@"; do
        [[ -r "/proc/$pid/stat" ]] || continue
        awk -v pid="$pid" '{ sub(/^.*\) /, ""); print pid, $12 + $13 }' "/proc/$pid/stat" 2>/dev/null
    done
}
