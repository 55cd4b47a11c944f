#!/bin/bash
# Baseline for scripts/bench.sh: model of the replaced `sync-passwords.sh`. One psql process
# per role, the plaintext password passed with `psql -v` (argv) and sent in
# `ALTER ROLE … PASSWORD '<plaintext>'` (the server hashes it and may log it).
# Env: PGHOST PGPORT KEYS_DIR POSTGRES_USER APP_DB_USER APP_DB_RO_USER TEMPORAL_DB_USER.
set -e

KEYS_DIR=${KEYS_DIR:-/app/keys}
echo "[sync-passwords] Synchronizing Postgres role passwords with secrets..."

sync_role() {
  local role=$1 file=$2 pw
  pw=$(cat "$file")
  psql -X -v ON_ERROR_STOP=1 -h "${PGHOST:-/var/run/postgresql}" -p "${PGPORT:-5432}" \
    -U "${POSTGRES_USER:-postgres}" -d postgres -v role="$role" -v pw="$pw" <<'SQL'
ALTER ROLE :"role" PASSWORD :'pw';
SQL
}

sync_role "${POSTGRES_USER:-postgres}" "$KEYS_DIR/postgres_password.txt"
sync_role "${APP_DB_USER:-appuser}" "$KEYS_DIR/postgres_app_user_pw.txt"
sync_role "${APP_DB_RO_USER:-backupuser}" "$KEYS_DIR/postgres_app_ro_pw.txt"
if [ -n "${TEMPORAL_DB_USER:-}" ]; then
  sync_role "$TEMPORAL_DB_USER" "$KEYS_DIR/postgres_temporal_pw.txt"
fi

echo "[sync-passwords] Password synchronization complete."
