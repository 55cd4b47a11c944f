#!/usr/bin/env bash
# Stand-in for the official postgres image's docker-entrypoint.sh. One script serves both
# users: the registry-free e2e test image (docker/test/Dockerfile, scripts/e2e-docker.sh)
# and the Rust tests of `run` on the host (tests/run.rs). It reproduces what matters to
# pg-password-sync's PID 1 logic:
#   * started as root it prepares the directories, then re-execs itself as `postgres`
#     through gosu (as the official image does) or, where gosu is not installed, through
#     `setpriv --reuid=postgres --regid=postgres --init-groups`; both exec in place, so
#     the PID is kept and signals arrive (runuser would fork). Started as another user
#     it runs as that user;
#   * on an empty PGDATA it runs initdb, starts a *temporary* server on the socket only
#     (listen_addresses='', a different PID, detached by pg_ctl, its log on stdout), runs
#     $INITDB_DIR/*.sh|*.sql, optionally waits INIT_DELAY seconds, and stops it with a
#     fast shutdown;
#   * finally it execs postgres, which therefore keeps the entrypoint's PID.
# Like the official script (its `file_env`), it exports the superuser's password from
# POSTGRES_PASSWORD_FILE as POSTGRES_PASSWORD whenever it can read the file, so the final
# `exec` would hand it to postgres: the e2e leak test proves that `run` withholding the
# variables on an initialised PGDATA, and the image's zz-unset-password.sh init script on
# the first start, keep it out of every process's environment.
#
# Environment (defaults are the container's):
#   PGDATA                 data directory (/var/lib/postgresql/data)
#   POSTGRES_USER          superuser name (postgres)
#   PGPORT                 port (5432)
#   PGHOST                 socket directory when it is an absolute path (/var/run/postgresql)
#   PG_BINDIR              PostgreSQL binaries (/usr/lib/postgresql/15/bin)
#   POSTGRES_PASSWORD_FILE superuser password for initdb (none: socket peer/trust only)
#   POSTGRES_INITDB_ARGS   extra initdb arguments, split on blanks (as the official image)
#   INITDB_DIR             init scripts (/docker-entrypoint-initdb.d)
#   PG_HBA                 replaces the default pg_hba.conf (peer for the superuser on the
#                          socket, scram-sha-256 for everything else)
#   POSTGRES_EXTRA_CONF    lines appended to postgresql.conf
#   INIT_DELAY             seconds to wait with the temporary server up (interruptible)
set -euo pipefail

log() { printf '[docker-entrypoint] %s\n' "$*" >&2; }

: "${PGDATA:=/var/lib/postgresql/data}"
: "${POSTGRES_USER:=postgres}"
: "${PGPORT:=5432}"
: "${PG_BINDIR:=/usr/lib/postgresql/15/bin}"
: "${INITDB_DIR:=/docker-entrypoint-initdb.d}"
SOCKET_DIR=/var/run/postgresql
if [[ "${PGHOST:-}" == /* ]]; then
    SOCKET_DIR="$PGHOST"
fi
readonly SOCKET_DIR
# Private copy of the password file that the postgres user can read (the mounted secret
# is usually root-owned 0600); removed right after initdb.
readonly PWFILE_COPY="$SOCKET_DIR/.initdb-pwfile"
PATH="$PG_BINDIR:$PATH"
export PATH PGDATA POSTGRES_USER PGPORT PG_BINDIR INITDB_DIR

# Options such as `-c foo=bar` alone mean `postgres -c foo=bar`.
if [[ $# -eq 0 || "${1:0:1}" == '-' ]]; then
    set -- postgres "$@"
fi
if [[ "$1" != postgres ]]; then
    exec "$@"
fi

if [[ "$(id -u)" == 0 ]]; then
    mkdir -p "$PGDATA" "$SOCKET_DIR"
    chown postgres:postgres "$PGDATA" "$SOCKET_DIR"
    chmod 0700 "$PGDATA"
    chmod 3777 "$SOCKET_DIR"
    if [[ ! -s "$PGDATA/PG_VERSION" && -n "${POSTGRES_PASSWORD_FILE:-}" ]]; then
        [[ -r "$POSTGRES_PASSWORD_FILE" ]] || { log "cannot read POSTGRES_PASSWORD_FILE"; exit 1; }
        install -o postgres -g postgres -m 0600 "$POSTGRES_PASSWORD_FILE" "$PWFILE_COPY"
    fi
    if command -v gosu >/dev/null 2>&1; then
        exec gosu postgres "${BASH_SOURCE[0]}" "$@"
    fi
    exec setpriv --reuid=postgres --regid=postgres --init-groups "${BASH_SOURCE[0]}" "$@"
fi

# The official image's file_env: the password file's content becomes an exported variable.
if [[ -n "${POSTGRES_PASSWORD_FILE:-}" ]]; then
    if [[ -r "$POSTGRES_PASSWORD_FILE" ]]; then
        POSTGRES_PASSWORD="$(<"$POSTGRES_PASSWORD_FILE")"
        export POSTGRES_PASSWORD
    elif [[ -s "$PWFILE_COPY" ]]; then
        POSTGRES_PASSWORD="$(<"$PWFILE_COPY")"
        export POSTGRES_PASSWORD
    fi
fi

# Runs the init scripts against the temporary server over the socket.
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
            *.sql)
                log "running $f"
                psql -v ON_ERROR_STOP=1 --no-password --no-psqlrc --quiet \
                    --host "$SOCKET_DIR" --port "$PGPORT" --username "$POSTGRES_USER" \
                    --dbname postgres --file "$f"
                ;;
            *) [[ -e "$f" ]] && log "ignoring $f" ;;
        esac
    done
}

if [[ ! -s "$PGDATA/PG_VERSION" ]]; then
    log "initializing the database cluster in $PGDATA"
    trap 'rm -f "$PWFILE_COPY"' EXIT
    pwopt=()
    if [[ -s "$PWFILE_COPY" ]]; then
        pwopt=(--pwfile="$PWFILE_COPY")
    elif [[ -n "${POSTGRES_PASSWORD_FILE:-}" && -r "$POSTGRES_PASSWORD_FILE" ]]; then
        pwopt=(--pwfile="$POSTGRES_PASSWORD_FILE")
    else
        log "no POSTGRES_PASSWORD_FILE: the superuser gets no password (socket only)"
    fi
    extra=()
    read -r -a extra <<<"${POSTGRES_INITDB_ARGS:-}"
    initdb --username="$POSTGRES_USER" "${pwopt[@]}" --encoding=UTF8 --locale=C.UTF-8 \
        --auth-local=peer --auth-host=scram-sha-256 "${extra[@]}" >/dev/null
    rm -f "$PWFILE_COPY"
    if [[ -n "${PG_HBA:-}" ]]; then
        printf '%s\n' "$PG_HBA" >"$PGDATA/pg_hba.conf"
    else
        cat >"$PGDATA/pg_hba.conf" <<HBA
# TYPE  DATABASE  USER      ADDRESS     METHOD
local   all       $POSTGRES_USER             peer
local   all       all                   scram-sha-256
host    all       all       0.0.0.0/0   scram-sha-256
host    all       all       ::/0        scram-sha-256
HBA
    fi
    {
        echo "listen_addresses = '*'"
        echo "password_encryption = 'scram-sha-256'"
        echo "port = $PGPORT"
        echo "unix_socket_directories = '$SOCKET_DIR'"
        if [[ -n "${POSTGRES_EXTRA_CONF:-}" ]]; then
            printf '%s\n' "$POSTGRES_EXTRA_CONF"
        fi
    } >>"$PGDATA/postgresql.conf"

    log "starting the temporary server (socket only)"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w -t 60 start
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
    trap - EXIT
fi

exec "$@"
