#!/usr/bin/env bash
# Stand-in for the official postgres image's docker-entrypoint.sh. One script serves both
# users: the registry-free e2e test image (docker/test/Dockerfile, scripts/e2e-docker.sh)
# and the Rust tests of `run` on the host (tests/run.rs). It behaves like the official
# script wherever pg-password-sync can tell the difference:
#   * started as root it prepares the directories, reads POSTGRES_PASSWORD_FILE (root
#     may read a root-only secret) into an exported POSTGRES_PASSWORD, then re-execs
#     itself as `postgres` through gosu (as the official image does) or, where gosu is not
#     installed, `setpriv --reuid=postgres --regid=postgres --init-groups`; both exec in
#     place, so the PID is kept and signals arrive. Started as another user it runs as
#     that user;
#   * the data directory follows the major version: PGDATA defaults to
#     /var/lib/postgresql/<major>/docker from 18 on (the volume is /var/lib/postgresql)
#     and to /var/lib/postgresql/data before. With the 18+ default, an empty PGDATA is
#     refused (exit 1) when another major's data, or a mount at /var/lib/postgresql/data,
#     is found: the official image's answer to a volume still mounted the pre-18 way;
#   * on an empty PGDATA it needs a superuser password (or POSTGRES_HOST_AUTH_METHOD=trust),
#     runs initdb WITHOUT -A, so pg_hba.conf keeps initdb's trust lines for the socket,
#     127.0.0.1 and ::1, and appends `host all all all <method>` (the server's
#     password_encryption, i.e. scram-sha-256) after them. Only connections from other
#     addresses are password-checked: this is what makes `verify` on 127.0.0.1 worthless
#     inside the official image;
#   * it starts a *temporary* server on the socket only (listen_addresses='', a different
#     PID, detached by pg_ctl, its log on stdout), creates POSTGRES_DB, runs the init
#     scripts (*.sh run or sourced, *.sql[.gz|.xz|.zst] through psql), optionally waits
#     INIT_DELAY seconds, and stops it with a fast shutdown;
#   * finally it execs postgres, which therefore keeps the entrypoint's PID, with the
#     exported POSTGRES_PASSWORD still in its environment (as the official script leaves
#     it): the e2e leak test proves that `run` withholding the variables on an initialised
#     PGDATA, and the image's zz-unset-password.sh init script on the first start, keep it
#     out of every process's environment.
#
# What differs on purpose (hooks for the tests, defaults of the official image made
# explicit): PG_HBA replaces pg_hba.conf (and then no password is required), the socket
# directory, port and extra settings are written into postgresql.conf, initdb gets
# --encoding=UTF8 --locale=C.UTF-8 (the image's LANG), and INIT_DELAY exists.
#
# Environment (defaults are the container's):
#   PG_MAJOR               major version whose layout to use (default: the server's)
#   PGDATA                 data directory (see above)
#   POSTGRES_USER          superuser name (postgres)
#   POSTGRES_DB            database created at init (POSTGRES_USER)
#   POSTGRES_PASSWORD[_FILE]  superuser password (exclusive); required at init unless
#                          POSTGRES_HOST_AUTH_METHOD=trust or PG_HBA is given
#   POSTGRES_HOST_AUTH_METHOD  method of the appended host line (password_encryption)
#   POSTGRES_INITDB_ARGS   extra initdb arguments, split on blanks (as the official image)
#   PGPORT                 port (5432)
#   PGHOST                 socket directory when it is an absolute path (/var/run/postgresql)
#   PG_BINDIR              PostgreSQL binaries (/usr/lib/postgresql/15/bin)
#   INITDB_DIR             init scripts (/docker-entrypoint-initdb.d)
#   PG_HBA                 test hook: replaces pg_hba.conf entirely
#   POSTGRES_EXTRA_CONF    test hook: lines appended to postgresql.conf
#   INIT_DELAY             test hook: seconds to wait with the temporary server up
set -euo pipefail

log() { printf '[docker-entrypoint] %s\n' "$*" >&2; }

: "${PG_BINDIR:=/usr/lib/postgresql/15/bin}"
PATH="$PG_BINDIR:$PATH"
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
: "${PGPORT:=5432}"
: "${INITDB_DIR:=/docker-entrypoint-initdb.d}"
: "${POSTGRES_HOST_AUTH_METHOD:=}"
if [[ -z "${PG_MAJOR:-}" ]]; then
    # "postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)" -> 15
    PG_MAJOR="$(postgres --version | sed -E 's/^[^0-9]*([0-9]+).*/\1/')"
fi
[[ "$PG_MAJOR" =~ ^[0-9]+$ ]] || { log "cannot tell the major version (PG_MAJOR=$PG_MAJOR)"; exit 1; }
# The 18+ layout: one volume at /var/lib/postgresql, data in a per-major subdirectory
# (the pg_ctlcluster convention), so `pg_upgrade --link` stays on one file system.
readonly LAYOUT_ROOT=/var/lib/postgresql
if ((PG_MAJOR >= 18)); then
    : "${PGDATA:=$LAYOUT_ROOT/$PG_MAJOR/docker}"
else
    : "${PGDATA:=$LAYOUT_ROOT/data}"
fi
SOCKET_DIR=/var/run/postgresql
if [[ "${PGHOST:-}" == /* ]]; then
    SOCKET_DIR="$PGHOST"
fi
readonly SOCKET_DIR
export PATH PGDATA PG_MAJOR POSTGRES_USER POSTGRES_DB PGPORT PG_BINDIR INITDB_DIR

# Options such as `-c foo=bar` alone mean `postgres -c foo=bar`.
if [[ $# -eq 0 || "${1:0:1}" == '-' ]]; then
    set -- postgres "$@"
fi
if [[ "$1" != postgres ]]; then
    exec "$@"
fi

# The official file_env for the password: the file's content becomes an exported
# variable (and the _FILE name goes), both set is an error.
if [[ -n "${POSTGRES_PASSWORD:-}" && -n "${POSTGRES_PASSWORD_FILE:-}" ]]; then
    log "POSTGRES_PASSWORD and POSTGRES_PASSWORD_FILE are exclusive"
    exit 1
fi
if [[ -n "${POSTGRES_PASSWORD_FILE:-}" ]]; then
    [[ -r "$POSTGRES_PASSWORD_FILE" ]] || { log "cannot read POSTGRES_PASSWORD_FILE"; exit 1; }
    POSTGRES_PASSWORD="$(<"$POSTGRES_PASSWORD_FILE")"
    export POSTGRES_PASSWORD
    unset POSTGRES_PASSWORD_FILE
fi

if [[ "$(id -u)" == 0 ]]; then
    mkdir -p "$PGDATA" "$SOCKET_DIR"
    chown postgres:postgres "$PGDATA" "$SOCKET_DIR"
    chmod 0700 "$PGDATA"
    chmod 3777 "$SOCKET_DIR"
    if command -v gosu >/dev/null 2>&1; then
        exec gosu postgres "${BASH_SOURCE[0]}" "$@"
    fi
    exec setpriv --reuid=postgres --regid=postgres --init-groups "${BASH_SOURCE[0]}" "$@"
fi

# True when PATH is a mount point in this process's mount namespace (field 5 of
# mountinfo is the mount point; Docker volumes are bind mounts, which a device/inode
# comparison would miss).
is_mount_point() {
    awk -v dir="$1" '$5 == dir { found = 1 } END { exit !found }' /proc/self/mountinfo
}

# Before initialising an empty 18+ PGDATA: data of the old layout or of another major
# means the volume is mounted the pre-18 way or needs pg_upgrade; initialising a fresh
# cluster beside it would look like data loss. Prints what was found.
stale_layout() {
    [[ "$PGDATA" == "$LAYOUT_ROOT/$PG_MAJOR/docker" ]] || return 1
    local found=() dir
    for dir in "$LAYOUT_ROOT" "$LAYOUT_ROOT/data" "$LAYOUT_ROOT"/*/docker; do
        [[ -s "$dir/PG_VERSION" ]] && found+=("$dir")
    done
    if ((${#found[@]} == 0 && PG_MAJOR >= 18)) && is_mount_point "$LAYOUT_ROOT/data"; then
        found+=("$LAYOUT_ROOT/data (a mount that PostgreSQL $PG_MAJOR does not use)")
    fi
    ((${#found[@]} > 0)) || return 1
    printf '%s\n' "${found[@]}"
}

refuse_stale_layout() {
    local found
    found="$(stale_layout)" || return 0
    log "error: from PostgreSQL 18 on, this image keeps its data in $LAYOUT_ROOT/<major>/docker"
    log "       (PGDATA=$PGDATA) with one volume mounted at $LAYOUT_ROOT, but found:"
    printf '[docker-entrypoint]          %s\n' "$found" >&2
    log "       Mount the volume at $LAYOUT_ROOT instead of $LAYOUT_ROOT/data, or upgrade the"
    log "       old data with pg_upgrade first. Not initialising a new cluster."
    exit 1
}

# psql on the socket as the superuser, never reading ~/.psqlrc.
sql() {
    psql -v ON_ERROR_STOP=1 --no-password --no-psqlrc --quiet \
        --host "$SOCKET_DIR" --port "$PGPORT" --username "$POSTGRES_USER" "$@"
}

# Runs the init scripts against the temporary server.
process_init_files() {
    local f
    for f in "$INITDB_DIR"/*; do
        case "$f" in
            *.sh)
                if [[ -x "$f" ]]; then
                    log "running $f"
                    "$f"
                else
                    log "sourcing $f"
                    # shellcheck disable=SC1090
                    . "$f"
                fi
                ;;
            *.sql) log "running $f"; sql --dbname "$POSTGRES_DB" --file "$f" ;;
            *.sql.gz) log "running $f"; gzip -dc "$f" | sql --dbname "$POSTGRES_DB" ;;
            *.sql.xz) log "running $f"; xz -dc "$f" | sql --dbname "$POSTGRES_DB" ;;
            *.sql.zst) log "running $f"; zstd -dc "$f" | sql --dbname "$POSTGRES_DB" ;;
            *) if [[ -e "$f" ]]; then log "ignoring $f"; fi ;;
        esac
    done
}

# Creates POSTGRES_DB unless it exists (`postgres` always does).
create_database() {
    local exists
    exists="$(sql --dbname postgres --tuples-only --no-align --set db="$POSTGRES_DB" \
        <<<"SELECT 1 FROM pg_database WHERE datname = :'db'")"
    if [[ -z "$exists" ]]; then
        log "creating database $POSTGRES_DB"
        sql --dbname postgres --set db="$POSTGRES_DB" <<<'CREATE DATABASE :"db"'
    fi
}

initialise() {
    refuse_stale_layout
    if [[ -z "${POSTGRES_PASSWORD:-}" && "$POSTGRES_HOST_AUTH_METHOD" != trust && -z "${PG_HBA:-}" ]]; then
        log "error: the database is uninitialised and no superuser password is given"
        log "       (POSTGRES_PASSWORD_FILE, or POSTGRES_HOST_AUTH_METHOD=trust)"
        exit 1
    fi
    log "initializing the database cluster in $PGDATA (PostgreSQL $PG_MAJOR layout)"
    local args=() extra=()
    read -r -a extra <<<"${POSTGRES_INITDB_ARGS:-}"
    # No -A/--auth: initdb's own defaults (trust) stay in pg_hba.conf, as in the image.
    args=(--username="$POSTGRES_USER" --encoding=UTF8 --locale=C.UTF-8 "${extra[@]}")
    if [[ -n "${POSTGRES_PASSWORD:-}" ]]; then
        # Through a pipe, never argv (printf is a builtin). The process substitution
        # lives only as long as this one command. The newline: initdb rejects an
        # empty file.
        initdb --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") "${args[@]}" >/dev/null
    else
        initdb "${args[@]}" >/dev/null
    fi
    {
        echo "listen_addresses = '*'"
        echo "port = $PGPORT"
        echo "unix_socket_directories = '$SOCKET_DIR'"
        if [[ -n "${POSTGRES_EXTRA_CONF:-}" ]]; then
            printf '%s\n' "$POSTGRES_EXTRA_CONF"
        fi
    } >>"$PGDATA/postgresql.conf"
    if [[ -n "${PG_HBA:-}" ]]; then
        printf '%s\n' "$PG_HBA" >"$PGDATA/pg_hba.conf"
    else
        # Every other address needs a password, with the method the server hashes with.
        local method="$POSTGRES_HOST_AUTH_METHOD"
        [[ -n "$method" ]] || method="$(postgres -C password_encryption)"
        printf '\nhost all all all %s\n' "$method" >>"$PGDATA/pg_hba.conf"
    fi

    log "starting the temporary server (socket only)"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -p $PGPORT" -w -t 60 start
    create_database
    process_init_files
    if [[ -n "${INIT_DELAY:-}" ]]; then
        log "init delay ${INIT_DELAY}s"
        # Interruptible: with a trap set, `wait` returns at once on the signal, so a stop
        # during init ends this script (and its sleep) and leaves the temporary server
        # running, as a killed official entrypoint would.
        sleep "$INIT_DELAY" &
        sleeper=$!
        trap 'kill "$sleeper" 2>/dev/null; exit 130' INT
        trap 'kill "$sleeper" 2>/dev/null; exit 143' TERM
        wait "$sleeper"
        trap - INT TERM
    fi
    log "stopping the temporary server"
    pg_ctl -D "$PGDATA" -m fast -w -t 60 stop
    log "init process complete; ready for start up"
}

if [[ -s "$PGDATA/PG_VERSION" ]]; then
    log "PGDATA already holds a cluster; skipping initialisation"
else
    initialise
fi

exec "$@"
