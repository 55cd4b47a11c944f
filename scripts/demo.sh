#!/usr/bin/env bash
# The main job on a throwaway cluster, end to end. Usage: see usage() below, or --help.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

usage() {
    cat <<'USAGE'
Usage: scripts/demo.sh

The main job on a throwaway cluster: build (cargo build --release), start PostgreSQL 15 in
a temp dir, create the roles with old passwords, generate new key files, `sync`, show the
per-role report and a login with a new password; then `run` as the supervisor of that
cluster, rotate the files the Kubernetes way and watch the new password arrive without a
restart. Cleans up everything it made. Run as root or as a user that can run PostgreSQL.
USAGE
}
no_more_args "$@"

ensure_postgres

step "building pg-password-sync (cargo build --release, as shipped)"
BIN="$(build_release --quiet)"

WORK="$(mktemp -d /tmp/pps-demo-XXXXXX)"
chmod 755 "$WORK"
PGDATA="$WORK/data"
SOCK="$WORK/sock"
PORT="$(free_port)"
mkdir -p "$SOCK"
if [[ "$(id -u)" -eq 0 ]]; then chown postgres:postgres "$SOCK"; chown postgres:postgres "$WORK"; fi

RUN_PID=
cleanup() {
    if [[ -n "$RUN_PID" ]]; then kill -INT "$RUN_PID" 2>/dev/null || true; wait "$RUN_PID" 2>/dev/null || true; fi
    as_pg "$PG_BINDIR/pg_ctl" -D "$PGDATA" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

step "starting a throwaway PostgreSQL 15 cluster (port $PORT, socket $SOCK)"
as_pg "$PG_BINDIR/initdb" -U postgres -A trust --no-sync -D "$PGDATA" >/dev/null
OS_USER="$(id -un)"
[[ "$OS_USER" != root ]] || OS_USER=postgres
as_pg tee "$PGDATA/pg_hba.conf" >/dev/null <<HBA
local all postgres peer map=demo
local all all scram-sha-256
host all all 127.0.0.1/32 scram-sha-256
HBA
echo "demo $OS_USER postgres" | as_pg tee "$PGDATA/pg_ident.conf" >/dev/null
as_pg "$PG_BINDIR/pg_ctl" -D "$PGDATA" -l "$WORK/server.log" -w -o \
    "-p $PORT -k $SOCK -c listen_addresses=127.0.0.1 -c log_statement=all" start >/dev/null

psql_super() { as_pg psql -X -q -At -v ON_ERROR_STOP=1 -h "$SOCK" -p "$PORT" -U postgres -d postgres; }

step "creating roles appuser, backupuser, temporaluser with old passwords"
psql_super <<'SQL'
CREATE ROLE appuser LOGIN PASSWORD 'old-app-password';
CREATE ROLE backupuser LOGIN PASSWORD 'old-ro-password';
CREATE ROLE temporaluser LOGIN PASSWORD 'old-temporal-password';
SQL

SECRETS="$WORK/secrets"
KEYS="$SECRETS/keys"
step "generating the secret files with pg-password-sync generate --dir $SECRETS"
mkdir -m 700 "$SECRETS"
# The OIDC client secrets are never generated: they come from the operator's env file.
cat > "$SECRETS/user-provided.env" <<'ENV'
# demo values for the identity providers
OIDC_GOOGLE_CLIENT_SECRET="demo-google-client-secret"
export OIDC_MICROSOFT_CLIENT_SECRET='demo-microsoft-client-secret'
OIDC_KEYCLOAK_CLIENT_SECRET=demo-keycloak-client-secret
ENV
"$BIN" generate --dir "$SECRETS"
"$BIN" generate --dir "$SECRETS" --list

export KEYS_DIR="$KEYS" SECRETS_SOURCE_DIR="$WORK/none" PGHOST="$SOCK" PGPORT="$PORT" PGDATA TEMPORAL_DB_USER=temporaluser

step "pg-password-sync sync"
"$BIN" sync

step "pg-password-sync sync again (nothing to do)"
"$BIN" sync

step "logging in as appuser over TCP with the new password (from a passfile, never argv)"
PASSFILE="$WORK/pgpass"
(umask 077; printf '127.0.0.1:%s:*:appuser:%s\n' "$PORT" "$(cat "$KEYS/postgres_app_user_pw.txt")" > "$PASSFILE")
PGPASSFILE=$PASSFILE psql -X -At -h 127.0.0.1 -p "$PORT" -U appuser -d postgres \
    -c "SELECT 'logged in as ' || current_user || ' with the new password'"

step "pg-password-sync verify (every role logs in with its file)"
"$BIN" verify

step "the server log never saw a password"
# One pattern per line (the generator writes no trailing newline).
if grep -F -f <(for f in "$KEYS"/*.txt; do cat "$f"; echo; done) "$WORK/server.log" >/dev/null; then
    echo "LEAK: a password is in the server log" >&2
    exit 1
fi
echo "checked $(wc -l < "$WORK/server.log") log lines (log_statement=all): no password"

step "stopping the cluster; from now on pg-password-sync run supervises it"
as_pg "$PG_BINDIR/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null

# A Kubernetes Secret volume holding the generated passwords under the Secret's keys (the
# file names without .txt, as in docker/k8s/): the kubelet writes a new ..<timestamp>
# directory, points ..data_tmp at it and renames that over ..data; the visible names link
# through ..data (k8s_swap, scripts/lib.sh).
VOLUME="$WORK/volume"
secret_update() {
    local stage="$WORK/secret" name
    rm -rf "$stage"
    mkdir "$stage"
    for name in postgres_password postgres_app_user_pw postgres_app_ro_pw postgres_temporal_pw; do
        cp "$KEYS/$name.txt" "$stage/$name"
    done
    k8s_swap "$VOLUME" "$stage"
}
secret_update
export KEYS_DIR="$VOLUME"

STATE="$WORK/state"
LOG="$WORK/run.log"
# As root, postgres must run as the postgres OS user; setpriv execs in place, so the PID
# that run supervises is the postmaster's and signals reach it.
AS_PG=()
if [[ "$(id -u)" -eq 0 ]]; then AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups --); fi
"$BIN" run --state-dir "$STATE" -- "${AS_PG[@]}" "$PG_BINDIR/postgres" -D "$PGDATA" \
    -p "$PORT" -k "$SOCK" -c listen_addresses=127.0.0.1 -c log_statement=all \
    >"$LOG" 2>&1 &
RUN_PID=$!
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...: poll every 50 ms
    local limit=$1 what=$2 i
    shift 2
    for ((i = 0; i < limit * 20; i++)); do
        if "$@"; then return 0; fi
        sleep 0.05
    done
    echo "timed out waiting for $what; run log:" >&2
    tail -n 30 "$LOG" >&2
    return 1
}
wait_for 60 "the first sync" grep -q 'Password synchronization complete.' "$LOG"
grep -F '[pg-password-sync]' "$LOG" | tail -n 7
"$BIN" health --state-dir "$STATE"
POSTMASTER="$(head -n 1 "$PGDATA/postmaster.pid")"

step "rotating: generate --force (with a backup), then a Kubernetes-style ..data swap"
"$BIN" generate --dir "$SECRETS" --force
secret_update
(umask 077; printf '127.0.0.1:%s:*:appuser:%s\n' "$PORT" "$(cat "$KEYS/postgres_app_user_pw.txt")" > "$PASSFILE")
app_login() { PGPASSFILE=$PASSFILE psql -X -At -h 127.0.0.1 -p "$PORT" -U appuser -d postgres -c 'SELECT 1' >/dev/null 2>&1; }
wait_for 10 "the new app password" app_login
grep -F 'passwords rotated' "$LOG"
echo "appuser logs in with the rotated password"
if [[ "$(head -n 1 "$PGDATA/postmaster.pid")" == "$POSTMASTER" ]]; then
    echo "same postmaster (pid $POSTMASTER): the server was not restarted"
else
    echo "the server was restarted" >&2
    exit 1
fi
"$BIN" verify

step "SIGINT to run (what docker stop sends): postgres shuts down cleanly"
kill -INT "$RUN_PID"
status=0
wait "$RUN_PID" || status=$?
RUN_PID=
echo "run exited with status $status"
((status == 0))
# From /: postgres may not enter the caller's directory (a 0700 checkout).
(cd / && as_pg "$PG_BINDIR/pg_controldata" "$PGDATA") | grep 'Database cluster state'
if grep -F -f <(for f in "$KEYS"/*.txt "$SECRETS"/backups/*/keys/*.txt; do cat "$f"; echo; done) \
    "$LOG" "$WORK/server.log" >/dev/null; then
    echo "LEAK: a password is in a log" >&2
    exit 1
fi
echo "no password in the run log or the server log"

step "demo complete"
