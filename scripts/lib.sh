#!/usr/bin/env bash
# Shared helpers for the project's scripts: installing what a fresh machine lacks, building
# the release binary, running PostgreSQL as the right OS user, throwaway clusters, the
# Kubernetes secret-volume swap and the last-resort process cleanup. Sourced, never executed.
#
# Shell style of every script in scripts/ (the one lint.sh and e2e-docker.sh were written
# in): bash with `set -euo pipefail`; 4-space indentation; `[[ … ]]` and `(( … ))` for
# tests; `local` for function variables; command substitutions quoted ("$(…)"), also in
# assignments; `--help` from a usage() heredoc; data reaches Python (and any other
# interpreter) as arguments or environment, never pasted into its source; shellcheck-clean
# (scripts/lint.sh).

# step TEXT…: print a step heading.
step() { printf '\n==> %s\n' "$*"; }

# no_more_args [ARG]: the end of a script's argument handling, given the first argument it
# did not take itself: none returns; `-h`/`--help` prints the caller's usage() and exits 0;
# anything else prints usage() on stderr and exits 2.
no_more_args() {
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
}

# Debian's PostgreSQL 15 server binaries.
PG_BINDIR="${PG_BINDIR:-/usr/lib/postgresql/15/bin}"
export PG_BINDIR

apt_updated=0
# apt_install PKG…: install Debian packages (as root), running `apt-get update` once.
apt_install() {
    if [[ "$(id -u)" -ne 0 ]]; then
        echo "missing packages: $* (run as root, or install them)" >&2
        return 1
    fi
    if ((apt_updated == 0)); then
        apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# apt_download DIR PKG…: fetch Debian packages' .deb files into DIR without installing
# them (to unpack elsewhere); `apt-get update` first when apt knows no such package yet.
apt_download() {
    local dir=$1
    shift
    (cd "$dir" && apt-get download -qq "$@" 2>/dev/null) && return 0
    [[ "$(id -u)" -eq 0 && "$apt_updated" -eq 0 ]] || return 1
    apt-get update -qq
    apt_updated=1
    (cd "$dir" && apt-get download -qq "$@")
}

# pip_install PKG…: install PyPI tools with python3's pip (installing python3/pip first).
pip_install() {
    command -v python3 >/dev/null || apt_install python3
    python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
    # Debian's system Python refuses a plain install (PEP 668); these are tool installs.
    python3 -m pip install --quiet --disable-pip-version-check "$@" 2>/dev/null ||
        python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$@"
    hash -r
}

# ensure_commands CMD:PKG[,PKG…]…: install the Debian packages of every CMD (a name on
# PATH or an absolute path) that cannot be run, each package once.
ensure_commands() {
    local spec pkg pkgs missing=()
    for spec in "$@"; do
        command -v "${spec%%:*}" >/dev/null && continue
        IFS=, read -r -a pkgs <<<"${spec#*:}"
        for pkg in "${pkgs[@]}"; do
            [[ " ${missing[*]} " == *" $pkg "* ]] || missing+=("$pkg")
        done
    done
    if ((${#missing[@]} > 0)); then
        step "installing ${missing[*]}"
        apt_install "${missing[@]}"
    fi
}

# ensure_postgres: PostgreSQL 15 server binaries, the `postgres` OS user, setpriv/unshare,
# python3 (free_port, and Debian's /usr/bin/python3 for a test run as `postgres`).
ensure_postgres() {
    # /usr/bin/python3: Debian's own, which the `postgres` user can run too (tests/run.rs).
    ensure_commands "$PG_BINDIR/initdb:postgresql-15" psql:postgresql-client-15 \
        setpriv:util-linux unshare:util-linux /usr/bin/python3:python3
    if ! id postgres >/dev/null 2>&1; then
        step "creating the postgres OS user"
        useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/bash postgres
    fi
}

# ensure_pgaudit: the pgaudit extension for PG_BINDIR's server (Debian's 15), for the test
# that an audit trail of everything holds no password or verifier (tests/overlap.rs).
ensure_pgaudit() {
    [[ -e "$PG_BINDIR/../lib/pgaudit.so" ]] && return
    step "installing postgresql-15-pgaudit"
    apt_install postgresql-15-pgaudit
}

# ensure_cluster_tools: Debian's Patroni, etcd and PgBouncer, for the cluster tests
# (tests/clusters.rs: a 3-node Patroni cluster on etcd, a client fleet behind PgBouncer).
# The tests start their own on free loopback ports, as the postgres OS user; where an init
# system starts the packages' own services, those keep their usual ports.
ensure_cluster_tools() {
    ensure_commands patroni:patroni etcd:etcd-server /usr/sbin/pgbouncer:pgbouncer \
        nsenter:util-linux
}

# ensure_prometheus: Debian's prometheus package, for the metrics tests (tests/metrics.rs):
# `promtool check metrics` judges the exposition, and a Prometheus server the test starts
# on a free loopback port (temp config and data dir) scrapes a sidecar. The package's own
# service is not needed: where invoke-rc.d may start it (no policy-rc.d), it listens on
# :9090, which no test uses.
ensure_prometheus() {
    ensure_commands promtool:prometheus prometheus:prometheus
}

# release_bin: the path of the binary `cargo build --release` makes. .cargo/config.toml
# builds for the host's target triple explicitly, so it is
# <target dir>/<host triple>/release/pg-password-sync; the target dir is cargo's own answer
# (CARGO_TARGET_DIR, build.target-dir), as an absolute path. Run from the repository.
release_bin() {
    local target_dir host
    target_dir="$(cargo metadata --format-version 1 --no-deps --offline |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
    host="$(rustc --print host-tuple)"
    [[ -n "$target_dir" && -n "$host" ]] || {
        echo "release_bin: cannot tell cargo's target dir or the host triple" >&2
        return 1
    }
    echo "$target_dir/$host/release/pg-password-sync"
}

# build_release [CARGO OPTION…]: `cargo build --release` (the build we ship, test, benchmark
# and put in the image; its settings are in Cargo.toml and .cargo/config.toml), cargo's
# output on stderr; prints the binary's path. Run from the repository.
build_release() {
    cargo build --release "$@" >&2
    release_bin
}

# as_pg CMD…: run CMD as the OS user that owns the server (postgres when root).
# setpriv execs in place, so signals sent to the PID reach CMD.
as_pg() {
    if [[ "$(id -u)" -eq 0 ]]; then
        setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"
    else
        "$@"
    fi
}

# free_port: a free TCP port on the loopback.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# template_cluster DATA: a throwaway cluster in DATA (which must not exist; its parent must
# be writable by the server's OS user) with the official image's authentication (trust on
# the Unix socket, SCRAM over TCP). It is started on a private socket, the SQL on stdin runs
# as the superuser `postgres`, and it is stopped cleanly: copy DATA (`cp -a`) for each run.
template_cluster() {
    local data=$1 sock="$1.sock" port rc=0
    as_pg "$PG_BINDIR/initdb" -U postgres -A trust --no-sync -D "$data" >/dev/null
    as_pg tee "$data/pg_hba.conf" >/dev/null <<'HBA'
local all all trust
host all all 127.0.0.1/32 scram-sha-256
HBA
    mkdir "$sock"
    [[ "$(id -u)" -ne 0 ]] || chown postgres:postgres "$sock"
    port="$(free_port)"
    as_pg "$PG_BINDIR/pg_ctl" -D "$data" -l "$data.log" -t 60 -w \
        -o "-p $port -k $sock -c listen_addresses=''" start >/dev/null
    timeout 300 psql -X -q -v ON_ERROR_STOP=1 -h "$sock" -p "$port" -U postgres -d postgres || rc=$?
    as_pg "$PG_BINDIR/pg_ctl" -D "$data" -m fast -t 60 -w stop >/dev/null
    rmdir "$sock"
    return "$rc"
}

# k8s_swap VOLUME SRC: one update of a Kubernetes Secret volume, the way the kubelet makes
# it: SRC's files are copied into a new VOLUME/..<timestamp> directory, a `..data_tmp`
# symlink to it is renamed over `..data` (the one atomic step: readers see the old set or the
# new one), each visible NAME -> ..data/NAME link is made where missing, and the previous
# timestamped directory is removed. A new VOLUME is created with its first swap.
# (bench/harness.py does the same in Python, where the instant of the rename is timed.)
k8s_swap() {
    local volume=$1 src=$2 ts old="" f name
    mkdir -p "$volume"
    if [[ -L "$volume/..data" ]]; then old="$(readlink "$volume/..data")"; fi
    ts="..$(date -u +%Y_%m_%d_%H_%M_%S.%N)"
    mkdir "$volume/$ts"
    for f in "$src"/*; do
        if [[ -f "$f" ]]; then cp "$f" "$volume/$ts/"; fi
    done
    chmod -R a+rX "$volume/$ts"
    ln -s "$ts" "$volume/..data_tmp"
    mv -T "$volume/..data_tmp" "$volume/..data"
    for f in "$volume/$ts"/*; do
        name="${f##*/}"
        [[ -L "$volume/$name" ]] || ln -s "..data/$name" "$volume/$name"
    done
    if [[ -n "$old" && "$old" != "$ts" ]]; then rm -rf "${volume:?}/$old"; fi
}

# kill_mentioning DIR: SIGKILL, by PID, every process but this shell whose command line
# mentions DIR: the last resort of a cleanup trap, for servers and PID 1s started with
# their data or sockets under a temp dir that something (an interrupt) left running.
kill_mentioning() {
    local dir=$1 f pid
    for f in /proc/[0-9]*/cmdline; do
        pid="${f#/proc/}" pid="${pid%/cmdline}"
        if [[ "$pid" != "$$" ]] && grep -qsF -- "$dir" "$f"; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
}
