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

Environment:
  PG_TEST_MAJORS   the other majors to run the server tests on (default: "14 16 18";
                   empty: none)
USAGE
}
no_more_args "$@"

ensure_postgres
ensure_pgaudit
ensure_cluster_tools
# iptables: the test of a server that falls silent over TCP (tests/hardening.rs).
ensure_commands iptables:iptables
ensure_prometheus

step "cargo fmt --check"
cargo fmt --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --quiet --all-targets -- -D warnings

step "cargo test (PostgreSQL 15)"
cargo test

# The behaviour that touches the server (sync, run, watch) once more per major, with the
# server binaries of that major; the rest of the suite does not depend on the server.
majors="${PG_TEST_MAJORS-14 16 18}"
if [[ -n "$majors" ]]; then
    # shellcheck disable=SC2086 # a list of majors
    scripts/pg-majors.sh install $majors
    for major in $majors; do
        step "sync, run and watch tests on PostgreSQL $major"
        PG_BINDIR="$(scripts/pg-majors.sh bindir "$major")" \
            cargo test --test tests -- sync:: run:: watch::
    done
fi

if [[ -x scripts/lint.sh ]]; then
    step "lint (shellcheck, hadolint, kubernetes-validate)"
    scripts/lint.sh
fi

if [[ -x scripts/e2e-docker.sh ]]; then
    step "end-to-end on Docker"
    scripts/e2e-docker.sh
fi

step "all checks passed"
