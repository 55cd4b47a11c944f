#!/usr/bin/env bash
# Test stand-in for the official postgres image's docker-entrypoint.sh, for the
# registry-free e2e test (scripts/e2e-docker.sh). It reproduces what matters to
# pg-password-sync's PID 1 logic:
#   * started as root it prepares the directories, then re-execs itself through gosu
#     (exec: the PID is kept);
#   * on an empty PGDATA it runs initdb, starts a *temporary* server on the socket only
#     (listen_addresses='', a different PID, detached by pg_ctl), runs
#     /docker-entrypoint-initdb.d/*.sh|*.sql, and stops it with a fast shutdown;
#   * finally it execs postgres, which therefore keeps the entrypoint's PID.
# Unlike the official script it never puts the superuser password into the
# environment: POSTGRES_PASSWORD_FILE is handed to initdb as a file.
set -euo pipefail

log() { printf '[docker-entrypoint] %s\n' "$*" >&2; }

: "${PGDATA:=/var/lib/postgresql/data}"
: "${POSTGRES_USER:=postgres}"
: "${PGPORT:=5432}"
readonly SOCKET_DIR=/var/run/postgresql
# Private copy of the password file that the postgres user can read (the mounted secret
# is usually root-owned 0600); removed right after initdb.
readonly PWFILE_COPY="$SOCKET_DIR/.initdb-pwfile"
export PGDATA POSTGRES_USER PGPORT

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
    exec gosu postgres "${BASH_SOURCE[0]}" "$@"
fi

# Runs the init scripts against the temporary server over the socket (peer auth).
process_init_files() {
    local f
    for f in /docker-entrypoint-initdb.d/*; do
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
        log "no POSTGRES_PASSWORD_FILE: the superuser gets no password (socket peer only)"
    fi
    initdb --username="$POSTGRES_USER" "${pwopt[@]}" --encoding=UTF8 --locale=C.UTF-8 \
        --auth-local=peer --auth-host=scram-sha-256 >/dev/null
    rm -f "$PWFILE_COPY"
    cat >"$PGDATA/pg_hba.conf" <<HBA
# TYPE  DATABASE  USER      ADDRESS     METHOD
local   all       $POSTGRES_USER             peer
local   all       all                   scram-sha-256
host    all       all       0.0.0.0/0   scram-sha-256
host    all       all       ::/0        scram-sha-256
HBA
    printf "\nlisten_addresses = '*'\npassword_encryption = 'scram-sha-256'\n" >>"$PGDATA/postgresql.conf"

    log "starting the temporary server (socket only)"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -p $PGPORT -k $SOCKET_DIR" -w -t 60 start
    process_init_files
    log "stopping the temporary server"
    pg_ctl -D "$PGDATA" -m fast -w -t 60 stop
    log "init process complete; ready for start up"
    trap - EXIT
fi

exec "$@"
