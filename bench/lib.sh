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
