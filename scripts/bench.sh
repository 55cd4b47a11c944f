#!/usr/bin/env bash
# Benchmarks pg-password-sync against the shell wrapper it replaces (bench/baseline/), side by
# side in one run on throwaway clusters. Usage: see usage() below, or --help.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

usage() {
    cat <<'USAGE'
Usage: scripts/bench.sh [--quick]

Benchmarks pg-password-sync against the shell wrapper it replaces (bench/baseline/), side
by side in one run on throwaway clusters, and reports medians and ratios (the machine is
shared and noisy: never compare numbers from different runs).

Scenarios (details in bench/README.md): startup -> first login with the new password, as
PID 1 of a new PID namespace; Kubernetes `..data` rotation -> first login with the new
password; stop (ours: SIGINT; baseline: what `docker stop` does) and the cluster state
afterwards; PID 1's steady RSS and thread count (ours with the metrics listener off and
on, tini, the baseline's bash); 1,000
roles rotated by one `sync` against one psql batch; the stripped binary size; failed
logins per rotation of a client fleet, overlap mode against single-login mode
(tests/fleet.rs).

Prints a markdown table and writes target/bench/summary.json (+ summary.md, raw samples,
PID-1 logs). Run as root (PID namespaces); installs what it needs; cleans up every process
and temp dir it made. The binary measured is the one `cargo build --release` makes.

  --quick   fewer repetitions and a 2 s stop grace (about 3 minutes)

For working on the bench:
  BENCH_ONLY=startup,tini,rotation,roles,fleet   run only these scenarios
  BENCH_BIN=PATH                           measure a prebuilt binary instead of building
  BENCH_DEBOUNCE=250ms                     the watcher's --debounce in the rotations
USAGE
}

MODE=full
if [[ "${1:-}" == --quick ]]; then
    MODE=quick
else
    no_more_args "$@"
fi
if [[ "$MODE" == quick ]]; then
    STARTUP_REPS=5 BASELINE_STOP_REPS=2 ROTATIONS=10 ROTATIONS_RENAME=10 ROLES_REPS=3 GRACE=2 TINI_REPS=1
else
    STARTUP_REPS=15 BASELINE_STOP_REPS=3 ROTATIONS=50 ROTATIONS_RENAME=50 ROLES_REPS=5 GRACE=10 TINI_REPS=3
fi
# The watcher's quiet period in the rotation scenarios: the default unless BENCH_DEBOUNCE.
DEBOUNCE="${BENCH_DEBOUNCE:-250ms (default)}"
NROLES=1000
ONLY="${BENCH_ONLY:-startup,tini,rotation,roles,fleet}"
want() { [[ ",$ONLY," == *",$1,"* ]]; }

if [[ "$(id -u)" -ne 0 ]]; then
    echo "scripts/bench.sh runs as root: it needs PID namespaces (unshare --pid) and runs postgres as the postgres user" >&2
    exit 1
fi

ensure_postgres
ensure_commands tini:tini strip:binutils python3:python3,python3-pip
if ! python3 -c 'import pg8000' 2>/dev/null; then
    step "installing pg8000 (Python PostgreSQL driver for the login pollers)"
    pip_install pg8000
fi

OUT="$PWD/target/bench"
mkdir -p "$OUT"
if [[ -n "${BENCH_BIN:-}" ]]; then
    # For comparing builds (e.g. another profile): measure this binary instead of building.
    step "using BENCH_BIN=$BENCH_BIN (not building)"
    BIN="$(realpath "$BENCH_BIN")"
else
    step "building pg-password-sync (cargo build --release, as shipped)"
    if ! BIN="$(build_release --locked --quiet 2>"$OUT/build.log")"; then
        cat "$OUT/build.log" >&2
        exit 1
    fi
fi
[[ -x "$BIN" ]] || {
    echo "no binary at $BIN" >&2
    exit 1
}

rm -rf "$OUT/logs"
mkdir -p "$OUT/logs"
HARNESS=(python3 "$PWD/bench/harness.py")
BASELINE="$PWD/bench/baseline/pg-password-sync-wrapper.sh"

WORK="$(mktemp -d /tmp/pps-bench-XXXXXX)"
chmod 755 "$WORK"
chown postgres:postgres "$WORK"
RES="$WORK/results"
mkdir "$RES"
ROLES_DATA=

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n "$ROLES_DATA" && -f "$ROLES_DATA/postmaster.pid" ]]; then
        as_pg "$PG_BINDIR/pg_ctl" -D "$ROLES_DATA" -m immediate -t 30 -w stop >/dev/null 2>&1 || true
    fi
    # Every server and PID 1 we start has $WORK in its command line.
    kill_mentioning "$WORK"
    rm -rf "$WORK"
    exit "$rc"
}
# interruptible CMD…: run CMD as a background job and wait for it, so that a signal to this
# script runs its trap at once (bash defers traps while a foreground command runs); the EXIT
# trap then kills what is left.
interruptible() {
    "$@" &
    wait "$!"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --------------------------------------------------------------------------- fixtures
step "preparing a template cluster and secrets in $WORK"
TEMPLATE="$WORK/template"
# Throwaway bench passwords only.
template_cluster "$TEMPLATE" <<'SQL'
CREATE ROLE appuser LOGIN PASSWORD 'bench-old-app';
CREATE ROLE backupuser LOGIN PASSWORD 'bench-old-ro';
CREATE ROLE temporaluser LOGIN PASSWORD 'bench-old-temporal';
ALTER ROLE postgres PASSWORD 'bench-old-super';
SQL
printf 'bench-old-app\n' >"$WORK/old_app_pw"

SECRET_NAMES=postgres_password.txt,postgres_app_user_pw.txt,postgres_app_ro_pw.txt,postgres_temporal_pw.txt
# make_plain_keys DIR: plain secret files holding fresh random passwords (a generator's
# keys dir, a directory bind mount).
make_plain_keys() {
    local dir=$1 name
    mkdir -p "$dir"
    for name in ${SECRET_NAMES//,/ }; do
        python3 -c 'import secrets; print("bench-" + secrets.token_urlsafe(24))' >"$dir/$name"
    done
    chmod -R a+rX "$dir"
}
# make_keys DIR: a Kubernetes-style secret volume (..<ts>/FILE, ..data -> ..<ts>,
# FILE -> ..data/FILE) holding fresh random passwords.
make_keys() {
    local dir=$1
    make_plain_keys "$dir.new"
    k8s_swap "$dir" "$dir.new"
    rm -rf "$dir.new"
}
KEYS="$WORK/keys"
make_keys "$KEYS"

# new_instance NAME: a fresh copy of the template cluster with its own port and socket dir;
# sets DATA, SOCK, PORT, LOGDIR.
new_instance() {
    local dir="$WORK/$1"
    mkdir -p "$dir/sock" "$dir/state"
    cp -a "$TEMPLATE" "$dir/data"
    chown postgres:postgres "$dir" "$dir/sock"
    DATA="$dir/data" SOCK="$dir/sock" PORT="$(free_port)" LOGDIR="$dir"
}
# POSTGRES_CMD: postgres on the current instance, as the postgres OS user (setpriv execs
# in place, so the PID 1 under test supervises the postmaster itself).
postgres_cmd() {
    POSTGRES_CMD=(setpriv --reuid=postgres --regid=postgres --init-groups --
        "$PG_BINDIR/postgres" -D "$DATA" -p "$PORT" -k "$SOCK" -c listen_addresses=127.0.0.1)
}
# life LABEL OUTFILE [harness life options…] -- CMD…: one run as PID 1, a JSON line to OUTFILE.
life() {
    local label=$1 outfile=$2
    shift 2
    if ! KEYS_DIR="$KEYS" SECRETS_SOURCE_DIR="$WORK/no-such-dir" PGHOST="$SOCK" PGPORT="$PORT" \
        PGDATA="$DATA" TEMPORAL_DB_USER=temporaluser PG_PASSWORD_SYNC_STATE_DIR="$LOGDIR/state" \
        interruptible "${HARNESS[@]}" life --label "$label" --port "$PORT" --pgdata "$DATA" \
        --bindir "$PG_BINDIR" --log "$LOGDIR/pid1.log" "$@" >>"$outfile"; then
        echo "    $label failed; last lines of its log:" >&2
        tail -n 5 "$LOGDIR/pid1.log" | sed 's/^/    | /' >&2
    fi
    tail -n 1 "$outfile" | sed 's/^/    /'
    cp "$LOGDIR/pid1.log" "$OUT/logs/${LOGDIR##*/}.log" 2>/dev/null || true
    cp "$LOGDIR/pid1.log.smaps" "$OUT/logs/${LOGDIR##*/}.smaps" 2>/dev/null || true
}

# --------------------------------------------------------------------------- startup, RSS, stop
step "startup → first login with the new password, RSS, stop: ours (metrics listener off, and on), and the baseline, $STARTUP_REPS interleaved runs each (the baseline's stop, grace ${GRACE} s, timed in $BASELINE_STOP_REPS)"
ours_run() {
    new_instance "ours-$1"
    postgres_cmd
    life ours "$RES/startup.jsonl" --user appuser --password-file "$KEYS/postgres_app_user_pw.txt" \
        --stop-signal INT --grace 30 -- "$BIN" run -- "${POSTGRES_CMD[@]}"
    rm -rf "$WORK/ours-$1"
}
# The same with the metrics listener on (scraped three times before the RSS is sampled).
ours_metrics_run() {
    local mport
    new_instance "ours-metrics-$1"
    postgres_cmd
    mport="$(free_port)"
    life ours_metrics "$RES/startup.jsonl" --user appuser \
        --password-file "$KEYS/postgres_app_user_pw.txt" --scrape-port "$mport" \
        --stop-signal INT --grace 30 -- "$BIN" run --metrics-listen "127.0.0.1:$mport" \
        -- "${POSTGRES_CMD[@]}"
    rm -rf "$WORK/ours-metrics-$1"
}
baseline_run() {
    new_instance "baseline-$1"
    postgres_cmd
    # The baseline's stop always takes the whole grace period: time it in a few runs only.
    local stop=(--stop-signal TERM --grace "$GRACE")
    (($1 <= BASELINE_STOP_REPS)) || stop=(--stop-signal KILL)
    life baseline "$RES/startup.jsonl" --user appuser --password-file "$KEYS/postgres_app_user_pw.txt" \
        "${stop[@]}" -- "$BASELINE" "${POSTGRES_CMD[@]}"
    rm -rf "$WORK/baseline-$1"
}
for i in $(seq 1 "$STARTUP_REPS"); do
    want startup || break
    if ((i % 2 == 1)); then
        ours_run "$i"
        ours_metrics_run "$i"
        baseline_run "$i"
    else
        baseline_run "$i"
        ours_metrics_run "$i"
        ours_run "$i"
    fi
done

step "tini supervising the same postgres (RSS reference), $TINI_REPS run(s)"
for i in $(seq 1 "$TINI_REPS"); do
    want tini || break
    new_instance "tini-$i"
    postgres_cmd
    life tini "$RES/tini.jsonl" --user appuser --password-file "$WORK/old_app_pw" \
        --stop-signal INT --grace 30 -- "$(command -v tini)" -- "${POSTGRES_CMD[@]}"
    rm -rf "$WORK/tini-$i"
done

# --------------------------------------------------------------------------- rotation
# rotation_run LABEL OUTFILE N LAYOUT(k8s|plain) [run option…]
rotation_run() {
    local label=$1 outfile=$2 n=$3 layout=$4 keys=$KEYS
    shift 4
    new_instance "$label"
    postgres_cmd
    KEYS="$WORK/$label/keys"
    if [[ "$layout" == k8s ]]; then make_keys "$KEYS"; else make_plain_keys "$KEYS"; fi
    life "$label" "$outfile" --user appuser --password-file "$KEYS/postgres_app_user_pw.txt" \
        --settle 0.5 --rotations "$n" --rotation-layout "$layout" --keys-dir "$KEYS" \
        --rotate-file postgres_app_user_pw.txt --rotate-names "$SECRET_NAMES" \
        --stop-signal INT --grace 30 -- "$BIN" run "$@" -- "${POSTGRES_CMD[@]}"
    KEYS=$keys
    rm -rf "${WORK:?}/$label"
}
if want rotation; then
    debounce_args=()
    [[ -z "${BENCH_DEBOUNCE:-}" ]] || debounce_args=(--debounce "$BENCH_DEBOUNCE")
    step "rotation: Kubernetes ..data swap → first login with the new password, $ROTATIONS rotations, debounce $DEBOUNCE"
    rotation_run rotation "$RES/rotation.jsonl" "$ROTATIONS" k8s "${debounce_args[@]}"
    step "rotation of a plain file by rename (generator, editor), $ROTATIONS_RENAME rotations, debounce $DEBOUNCE"
    rotation_run rotation-rename "$RES/rotation_rename.jsonl" "$ROTATIONS_RENAME" plain "${debounce_args[@]}"
fi

# --------------------------------------------------------------------------- 1,000 roles
# new_role_secrets: fresh passwords in the files (for ours) and in a SQL batch (for psql),
# written before the clock starts; plus one file per side to check a login afterwards.
new_role_secrets() {
    python3 - "$ROLES_KEYS" "$LOGDIR" "$NROLES" <<'PY'
import os, secrets, sys
keys, logdir, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(os.path.join(logdir, "batch.sql"), "w") as sql:
    for i in range(1, n + 1):
        name = f"bench_r{i:04d}"
        ours, theirs = "bench-" + secrets.token_urlsafe(24), "bench-" + secrets.token_urlsafe(24)
        with open(os.path.join(keys, name), "w") as f:
            f.write(ours + "\n")
        sql.write(f"ALTER ROLE {name} PASSWORD '{theirs}';\n")
        if i == n // 2:
            with open(os.path.join(logdir, "check_psql"), "w") as f:
                f.write(theirs + "\n")
PY
    chmod -R a+rX "$ROLES_KEYS"
}
roles_ours() {
    new_role_secrets
    KEYS_DIR="$ROLES_KEYS" SECRETS_SOURCE_DIR="$WORK/no-such-dir" PGHOST="$SOCK" PGPORT="$PORT" \
        PGDATA="$DATA" PG_PASSWORD_SYNC_ROLES="$ROLE_MAP" \
        interruptible "${HARNESS[@]}" time --label ours -- "$BIN" sync \
        >>"$RES/roles.jsonl" || echo "    ours: sync failed" >&2
    roles_check "$ROLES_KEYS/$MIDDLE_ROLE" "synced by ours"
}
roles_psql() {
    new_role_secrets
    interruptible "${HARNESS[@]}" time --label psql_batch -- timeout 600 psql -X -q -v ON_ERROR_STOP=1 \
        -h "$SOCK" -p "$PORT" -U postgres -d postgres -f "$LOGDIR/batch.sql" \
        >>"$RES/roles.jsonl" || echo "    psql batch failed" >&2
    roles_check "$LOGDIR/check_psql" "set by the psql batch"
}
# roles_check PASSWORD_FILE WHO: show the last timing, then log in as the middle role.
roles_check() {
    tail -n 1 "$RES/roles.jsonl" | sed 's/^/    /'
    "${HARNESS[@]}" login --port "$PORT" --user "$MIDDLE_ROLE" --password-file "$1" ||
        echo "    WARNING: a role $2 does not log in with its new password" >&2
}
roles_1000() {
    step "1,000 login roles: one \`pg-password-sync sync\` against one psql batch of plaintext ALTER ROLEs, $ROLES_REPS runs each"
    new_instance roles
    ROLES_DATA=$DATA
    MIDDLE_ROLE="bench_r$(printf %04d $((NROLES / 2)))"
    as_pg "$PG_BINDIR/pg_ctl" -D "$DATA" -l "$LOGDIR/server.log" -t 60 -w \
        -o "-p $PORT -k $SOCK -c listen_addresses=127.0.0.1" start >/dev/null
    # The count goes in as a psql variable (:nroles), not pasted into the SQL.
    timeout 600 psql -X -q -v ON_ERROR_STOP=1 -v nroles="$NROLES" \
        -h "$SOCK" -p "$PORT" -U postgres -d postgres <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', 'bench_r' || lpad(i::text, 4, '0'), 'bench-old-' || i)
FROM generate_series(1, :nroles) AS i
\gexec
SQL
    ROLES_KEYS="$LOGDIR/keys"
    mkdir "$ROLES_KEYS"
    ROLE_MAP="$(python3 -c 'import sys; n = int(sys.argv[1]); print(",".join(f"bench_r{i:04d}=bench_r{i:04d}" for i in range(1, n + 1)))' "$NROLES")"
    for i in $(seq 1 "$ROLES_REPS"); do
        if ((i % 2 == 1)); then
            roles_ours
            roles_psql
        else
            roles_psql
            roles_ours
        fi
    done
    as_pg "$PG_BINDIR/pg_ctl" -D "$DATA" -m fast -t 60 -w stop >/dev/null
    ROLES_DATA=
}
if want roles; then roles_1000; fi

# --------------------------------------------------------------------------- client fleet
# Failed logins per rotation, overlap mode against single-login mode, for each pair of
# delivery delays (database view / app view): the client-fleet test (tests/fleet.rs) run
# once, its figures appended to fleet.jsonl. The test fails only on a failed login in
# overlap mode; the summary shows the figures either way. It builds and runs the test
# profile: failed logins depend on delivery timing, not on the build.
if want fleet; then
    step "client fleet: failed logins per rotation, overlap and single-login (tests/fleet.rs)"
    : >"$RES/fleet.jsonl"
    if ! PG_PASSWORD_SYNC_FLEET_REPORT="$RES/fleet.jsonl" \
        interruptible cargo test --quiet --test tests -- fleet:: --nocapture >"$OUT/logs/fleet.log" 2>&1; then
        echo "the fleet test failed (see $OUT/logs/fleet.log); its figures are reported anyway" >&2
    fi
fi

# --------------------------------------------------------------------------- binary, summary
cp "$BIN" "$WORK/pg-password-sync"
strip "$WORK/pg-password-sync"

CPU="$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)"
[[ -n "$CPU" ]] || CPU="$(uname -m)"
"${HARNESS[@]}" meta --out "$RES/meta.json" \
    mode="$MODE" binary="$BIN" only="$ONLY" startup_reps="$STARTUP_REPS" \
    baseline_stop_reps="$BASELINE_STOP_REPS" grace_s="$GRACE" debounce="$DEBOUNCE" \
    rotations="$ROTATIONS" roles="$NROLES" roles_reps="$ROLES_REPS" \
    binary_bytes="$(stat -c %s "$WORK/pg-password-sync")" \
    binary_bytes_as_built="$(stat -c %s "$BIN")" \
    nproc="$(nproc)" cpu="$CPU" kernel="$(uname -r)" \
    postgres="$("$PG_BINDIR/postgres" --version)" \
    rotation_poll_interval_ms=5 startup_poll_interval_ms=5

step "results ($MODE)"
"${HARNESS[@]}" summary --dir "$RES" --out "$OUT/summary.json" | tee "$OUT/summary.md"
cp "$RES"/*.jsonl "$OUT/" 2>/dev/null || true
echo
echo "wrote $OUT/summary.json, $OUT/summary.md and the raw samples ($OUT/*.jsonl)"
