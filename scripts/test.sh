#!/usr/bin/env bash
# Everything CI checks. Usage: see usage() below, or --help.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

usage() {
    cat <<'USAGE'
Usage: scripts/test.sh

Everything CI checks, on a fresh machine: installs what is missing (PostgreSQL 15 and its
pgaudit, the postgres OS user, Patroni, etcd and PgBouncer for the cluster tests, the
servers of the other majors, Prometheus, lint tools), then
formatting, clippy, the whole test suite on PostgreSQL 15, the sync, run and watch tests
on every other supported major (scripts/pg-majors.sh), the linters, and the end-to-end
container test when a Docker engine answers.

Formatting first; then, as parallel jobs: the release build followed by the end-to-end
test and the linters (started at once), and, after one build of the test binaries, the
suite on 15 (its cluster tests in a job of their own), the other majors one after the
other, and clippy. Each job writes a log of
its own, printed whole (with the job's outcome and duration) when the job ends; at the
end a table gives every step's duration, and the script fails when any job failed.

Environment:
  PG_TEST_MAJORS   the other majors to run the server tests on (default: "14 16 18";
                   empty: none)
  PG_TEST_THREADS  test threads of the PostgreSQL 15 suite but its cluster tests, which
                   run two at a time beside it (default: 3)
  PG_TEST_MAJOR_THREADS
                   test threads of each other major's sync, run and watch tests
                   (default: 3)
USAGE
}
no_more_args "$@"

ensure_postgres
ensure_pgaudit
ensure_cluster_tools
# iptables: the test of a server that falls silent over TCP (tests/hardening.rs).
ensure_commands iptables:iptables
ensure_prometheus

# The behaviour that touches the server (sync, run, watch) runs once more per major, with
# the server binaries of that major; the rest of the suite does not depend on the server.
# Installed here, before anything runs in parallel.
majors="${PG_TEST_MAJORS-14 16 18}"
if [[ -n "$majors" ]]; then
    # shellcheck disable=SC2086 # a list of majors
    scripts/pg-majors.sh install $majors
fi

# Durations for the closing table: "SECONDS NAME" lines.
timings=()
started=$SECONDS
failed=()

timed() {
    local name=$1 from=$SECONDS
    shift
    step "$name"
    "$@"
    timings+=("$((SECONDS - from)) $name")
}

timed "cargo fmt --check" cargo fmt --check

# A fresh clone builds every crate once: incremental compilation's bookkeeping only costs
# there (about a fifth of the build of this crate), and nothing reuses it.
if [[ -n "${CI:-}" ]]; then
    export CARGO_INCREMENTAL=0
fi

# ---------------------------------------------------------------------------------------
# Jobs: commands run in the background, each with its output in a log file of its own,
# printed whole (with the job's outcome and duration) when the job ends.

logs="$(mktemp -d "${TMPDIR:-/tmp}/pg-password-sync-test.XXXXXX")"
declare -A job_name=() job_log=() job_from=()
job_count=0

# Job control: every job is a process group of its own, so that an interrupt can end a
# job with everything it started, and nothing else.
set -m
stop_jobs() {
    local pid
    for pid in "${!job_name[@]}"; do
        kill -TERM -- "-$pid" 2>/dev/null || true
    done
}
trap 'stop_jobs; exit 130' INT
trap 'stop_jobs; exit 143' TERM

# start_job NAME CMD…: runs CMD in the background, stdin from /dev/null.
start_job() {
    local name=$1 log
    shift
    log="$logs/job-$job_count.log"
    job_count=$((job_count + 1))
    "$@" </dev/null >"$log" 2>&1 &
    job_name[$!]=$name
    job_log[$!]=$log
    job_from[$!]=$SECONDS
    echo "started: $name (log: $log)"
}

# wait_jobs: waits for every job; as each one ends, prints its outcome and its whole log.
wait_jobs() {
    local pid rc took
    while ((${#job_name[@]} > 0)); do
        rc=0
        wait -n -p pid "${!job_name[@]}" || rc=$?
        took=$((SECONDS - job_from[$pid]))
        if ((rc == 0)); then
            step "${job_name[$pid]}: passed in $took s"
        else
            step "${job_name[$pid]}: FAILED (exit $rc) in $took s"
            failed+=("${job_name[$pid]}")
        fi
        cat "${job_log[$pid]}"
        timings+=("$took ${job_name[$pid]}")
        unset "job_name[$pid]"
    done
}

# job_step NAME CMD…: one step of a job that runs several, with its heading in the log.
job_step() {
    local name=$1 from=$SECONDS rc=0
    shift
    step "$name"
    "$@" || rc=$?
    echo "($name: $((SECONDS - from)) s, exit $rc)"
    return "$rc"
}

# The end-to-end test with the release binary, built here, then the linters. The release
# build (LTO, one codegen unit) is a minute of mostly one core: started first, beside the
# build of the test binaries, its long single-threaded end is not what is left running at
# the end.
e2e_and_lint() {
    local rc=0 bin
    if [[ -x scripts/e2e-docker.sh ]]; then
        if docker info >/dev/null 2>&1; then
            job_step "cargo build --release --locked" build_release --locked || return 1
            bin="$(release_bin)"
            job_step "end-to-end on Docker" env PG_PASSWORD_SYNC_BIN="$bin" scripts/e2e-docker.sh || rc=1
        else
            # It says why it skips.
            job_step "end-to-end on Docker" scripts/e2e-docker.sh || rc=1
        fi
    fi
    if [[ -x scripts/lint.sh ]]; then
        job_step "lint (shellcheck, hadolint, kubernetes-validate)" scripts/lint.sh || rc=1
    fi
    return "$rc"
}
start_job "release build, end-to-end on Docker, lint" e2e_and_lint

# One build of both test binaries (the unit tests in src/ and tests/tests.rs); every test
# job below runs them directly. (Through `cargo test` each job would take cargo's lock on
# the build directory, and clippy, running beside them, holds that lock for its whole
# compile: the jobs would wait for it.)
unit_tests=""
integration_tests=""
build_tests() {
    local name path
    while read -r name path; do
        case "$name" in
            pg-password-sync) unit_tests=$path ;;
            tests) integration_tests=$path ;;
        esac
    done < <(cargo test --no-run --locked --message-format=json-render-diagnostics |
        python3 -c '
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg["profile"]["test"] and msg.get("executable"):
        print(msg["target"]["name"], msg["executable"])
')
    [[ -x "$unit_tests" && -x "$integration_tests" ]] || {
        echo "cargo test --no-run named no unit test or integration test binary" >&2
        return 1
    }
}
if ! timed "cargo test --no-run (the test binaries)" build_tests; then
    failed+=("cargo test --no-run")
    wait_jobs
    step "FAILED: ${failed[*]}"
    exit 1
fi

# The tests, in parallel. Most of them wait (for servers, grace periods, timeouts), so the
# jobs fill each other's pauses. Nothing they share collides: every cluster, Patroni, etcd,
# PgBouncer and Prometheus of a test has a temp dir and free ports of its own, the
# template cluster is per test process, the e2e test's Docker names carry its own prefix,
# and the one test that needs something of the machine to itself for a while (run::'s use
# of every inotify instance of the postgres OS user) takes a lock that every test process
# honours.

# The whole suite on PostgreSQL 15 in two jobs. The cluster tests (clusters::: a 3-node
# Patroni cluster on etcd each, PgBouncer) in one of their own, two at a time: Patroni's
# leader lock lives 5 s, and more of them at once, beside everything else, starve their
# servers past their bounds. The other: the unit tests (the property tests among them),
# then the rest of the integration tests, both run even when the first fails.
suite_15() {
    local rc=0
    job_step "unit tests" "$unit_tests" || rc=1
    job_step "integration tests (tests/tests.rs) but clusters::" \
        "$integration_tests" --test-threads "${PG_TEST_THREADS:-3}" --skip clusters:: || rc=1
    return "$rc"
}

# The sync, run and watch tests on the server binaries of each other major, one major
# after the other (beside the suite on 15, more at once would only make every test wait
# longer for a core); each major runs even when one before it failed.
suite_majors() {
    local major bindir rc=0
    for major in "$@"; do
        bindir="$(scripts/pg-majors.sh bindir "$major")" || { rc=1; continue; }
        job_step "PostgreSQL $major: sync, run and watch tests" env PG_BINDIR="$bindir" \
            "$integration_tests" --test-threads "${PG_TEST_MAJOR_THREADS:-3}" \
            sync:: run:: watch:: || rc=1
    done
    return "$rc"
}

# Priorities (their servers inherit them): the cores are busy throughout, and the cluster
# tests are the ones that time the product (a rotation in force within a second of a
# promotion) and whose Patroni needs its loop on time; the other tests run at nice 5 and
# clippy, which has no time limit, at nice 10. The release build keeps the default: it
# must not be the last thing left running.
# lower_priority N CMD…: CMD (a function too) at niceness N, and all it starts.
lower_priority() {
    renice -n "$1" -p "$BASHPID" >/dev/null
    shift
    "$@"
}
start_job "PostgreSQL 15: cluster tests (clusters::)" \
    "$integration_tests" --test-threads 2 clusters::
start_job "PostgreSQL 15: unit tests, the other integration tests" lower_priority 5 suite_15
if [[ -n "$majors" ]]; then
    # shellcheck disable=SC2086 # a list of majors
    start_job "PostgreSQL ${majors// /, }: sync, run and watch tests" \
        lower_priority 5 suite_majors $majors
fi
start_job "cargo clippy --all-targets -- -D warnings" \
    nice -n 10 cargo clippy --quiet --locked --all-targets -- -D warnings
wait_jobs
set +m
trap - INT TERM

step "durations"
for line in "${timings[@]}"; do
    printf '%6s s  %s\n' "${line%% *}" "${line#* }"
done
printf '%6s s  %s\n' "$((SECONDS - started))" "in all (after the installs)"

if ((${#failed[@]} > 0)); then
    step "FAILED: ${failed[*]}"
    exit 1
fi
rm -rf "$logs"
step "all checks passed"
