#!/usr/bin/env bash
# Everything CI checks. Usage: see usage() below, or --help.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

usage() {
    cat <<'USAGE'
Usage: scripts/test.sh

Everything CI checks, on a fresh machine: installs what is missing (PostgreSQL 15, the
postgres OS user, lint tools), then formatting, clippy, the whole test suite, the
linters, and the end-to-end container test when a Docker engine answers.
USAGE
}
case "${1:-}" in
    "") ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        usage >&2
        exit 2
        ;;
esac

ensure_postgres

step "cargo fmt --check"
cargo fmt --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --quiet --all-targets -- -D warnings

step "cargo test"
cargo test

if [[ -x scripts/lint.sh ]]; then
    step "lint (shellcheck, hadolint, kubernetes-validate)"
    scripts/lint.sh
fi

if [[ -x scripts/e2e-docker.sh ]]; then
    step "end-to-end on Docker"
    scripts/e2e-docker.sh
fi

step "all checks passed"
