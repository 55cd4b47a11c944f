#!/usr/bin/env bash
# Shared helpers for the project's scripts: installing what a fresh machine lacks and
# running PostgreSQL as the right OS user. Sourced, never executed.

# Print a step heading.
step() { printf '\n==> %s\n' "$*"; }

# Debian's PostgreSQL 15 server binaries.
PG_BINDIR=${PG_BINDIR:-/usr/lib/postgresql/15/bin}
export PG_BINDIR

apt_updated=0
# apt_install PKG...: install Debian packages (as root), running `apt-get update` once.
apt_install() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: $* (run as root, or install them)" >&2
    return 1
  fi
  if [ "$apt_updated" -eq 0 ]; then
    apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# pip_install PKG...: install PyPI tools with python3's pip (installing python3/pip first).
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
  if [ "${#missing[@]}" -gt 0 ]; then
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

# as_pg CMD...: run CMD as the OS user that owns the server (postgres when root).
# setpriv execs in place, so signals sent to the PID reach CMD.
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then
    setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"
  else
    "$@"
  fi
}

# free_port: a free TCP port on the loopback.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
