# shellcheck shell=bash
# bench/stages.sh: where replication lag goes, stage by stage (BENCH_STAGES=1 of
# bench/replication.sh, which sources this file and provides rsql, log, ORIGIN and
# TMPD).
#
# stages_prepare adds a column `bench_xact_at timestamptz DEFAULT now()` to a
# region's mesh.changelog: every appender (capture, apply) leaves it out of its
# INSERT, so it records when the appending transaction began. With logged_at
# (clock_timestamp() in that transaction) and commit_ts at the origin, each event
# then tells its stages apart:
#   wait     commit at the origin -> capture's append transaction begins
#   append   capture's append: begin -> logged_at (its commit follows)
#   ship     logged in the origin -> the peer's apply transaction begins (the append's
#            commit, the link, and the wait for the batch before it)
#   apply    the peer's apply: begin -> logged_at (its commit follows)
# It costs one more timestamp per logged event, which is why it is not the default.

# stages_prepare REGION
stages_prepare() {
    # The same small statistics target as the log's own columns (catalog 17), so
    # that autovacuum's ANALYZE of the log does not sample ten times more rows.
    rsql "$1" "ALTER TABLE mesh.changelog ADD COLUMN bench_xact_at timestamptz DEFAULT now(),
               ALTER COLUMN bench_xact_at SET STATISTICS 10" >/dev/null
}

# stages_report T0 T1: prints one line of p50 / p99 in ms per stage, over ORIGIN's
# events committed between T0 and T1 that every region logged.
stages_report() {
    local r
    for r in r1 r2 r3; do
        rsql "$r" "COPY (SELECT hlc, extract(epoch FROM commit_ts), extract(epoch FROM bench_xact_at),
                   extract(epoch FROM logged_at)
                   FROM mesh.changelog WHERE origin = '$ORIGIN' AND commit_ts BETWEEN '$1' AND '$2')
                   TO STDOUT (FORMAT csv)" | sort -t, -k1,1 >"$TMPD/stages-$r.csv"
    done
    # Fields after the joins: hlc, then commit, begin, logged of r1, r2 and r3.
    join -t, "$TMPD/stages-r1.csv" "$TMPD/stages-r2.csv" | join -t, - "$TMPD/stages-r3.csv" |
        awk -F, '{ ms = 1000
            printf "%f %f %f %f %f %f\n", ($3 - $2) * ms, ($4 - $3) * ms, ($6 - $4) * ms,
                ($7 - $6) * ms, ($9 - $4) * ms, ($10 - $9) * ms }' >"$TMPD/stages.txt"
    local names=("wait for capture" "capture append" "ship to r2" "apply in r2" "ship to r3" "apply in r3")
    local i line=""
    for i in 1 2 3 4 5 6; do
        line+="${line:+; }${names[$((i - 1))]} $(cut -d' ' -f"$i" "$TMPD/stages.txt" | sort -n |
            awk '{ v[NR] = $1 } END { if (NR == 0) { print "n/a"; exit }
                i = int(NR * 0.99) + 1; if (i > NR) i = NR
                printf "%.2f / %.2f", v[int(NR * 0.5) + 1], v[i] }')"
    done
    echo "$line"
}
