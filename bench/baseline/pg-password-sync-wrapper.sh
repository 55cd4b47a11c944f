#!/bin/bash
# Baseline for scripts/bench.sh: a faithful model of the wrapper pg-password-sync replaces
# (`pg-password-sync-wrapper.sh`, the container ENTRYPOINT). Deliberately keeps its defects,
# because they are what is being measured:
#   - bash is PID 1 and installs no signal handler, so SIGTERM/SIGINT from `docker stop`
#     are dropped by the kernel and postgres is SIGKILLed after the grace period;
#   - readiness is `pg_isready` once a second, with a hard 60 s limit;
#   - passwords are sent as plaintext `ALTER ROLE`, one psql per role, via `psql -v`
#     (so they sit in psql's argv) — see sync-passwords.sh.
# Usage: pg-password-sync-wrapper.sh ENTRYPOINT [ARGS…]   (env: PGHOST PGPORT KEYS_DIR …)
# The bench only ever feeds it throwaway passwords.

echo "[pg-password-sync-wrapper] Starting PostgreSQL in the background..."
"$@" &
PG_PID=$!

echo "[pg-password-sync-wrapper] Waiting for PostgreSQL to be ready..."
ready=0
for _ in $(seq 1 60); do
  if pg_isready -h "${PGHOST:-/var/run/postgresql}" -p "${PGPORT:-5432}" -U "${POSTGRES_USER:-postgres}" -q; then
    ready=1
    break
  fi
  sleep 1
done
if [ "$ready" -ne 1 ]; then
  echo "[pg-password-sync-wrapper] PostgreSQL did not become ready in 60 s; giving up." >&2
  kill "$PG_PID"
  exit 1
fi

echo "[pg-password-sync-wrapper] Running password sync script..."
"$(dirname "$0")/sync-passwords.sh" || echo "[pg-password-sync-wrapper] password sync failed" >&2

wait "$PG_PID"
