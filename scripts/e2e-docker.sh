#!/usr/bin/env bash
# End-to-end container test of pg-password-sync against a real Docker engine.
#
# Needs no registry: the base image is a debootstrap'ed Debian root filesystem
# (postgresql-15 + gosu) imported with `docker import`, and the test image is built
# FROM it with the locally built binary and a stand-in for the official postgres
# image's docker-entrypoint.sh (docker/test/docker-entrypoint.sh). The server is
# PostgreSQL 15 (Debian bookworm's), run with the official images' pg_hba.conf (initdb's
# trust lines for loopback, then `host all all all scram-sha-256`) and the PostgreSQL 18
# layout (PG_MAJOR=18: the volume at /var/lib/postgresql, PGDATA /var/lib/postgresql/18/docker).
#
# Usage: scripts/e2e-docker.sh [--base-only]
#   --base-only   only make sure the base image exists (build it when missing), then exit
#
# Environment:
#   PG_PASSWORD_SYNC_BIN   path of an already built binary (default: cargo build --release)
#   E2E_PG_MAJOR           the layout's major version (default 18; 17 and older: the
#                          volume at /var/lib/postgresql/data)
#   E2E_BASE_IMAGE         base image tag (default pg-password-sync-base:bookworm)
#   E2E_KEEP=1             keep containers, network, volume and temp dir for inspection
#
# Prints `SKIP: …` and exits 0 when no Docker engine answers. The last line is a summary
# such as `e2e-docker: 11 passed, 0 failed in 114 s (layout of PostgreSQL 18, server 15;
# rotation live 594 ms after the rename, docker stop 404 ms)`.
set -euo pipefail

readonly BASE_IMAGE="${E2E_BASE_IMAGE:-pg-password-sync-base:bookworm}"
readonly SUITE="bookworm"
readonly BASE_PACKAGES="postgresql-15,gosu,procps"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
# apt_install
# shellcheck source=scripts/lib.sh
. "$REPO_ROOT/scripts/lib.sh"

log() { printf '[e2e-docker] %s\n' "$*" >&2; }
die() { printf '[e2e-docker] ERROR: %s\n' "$*" >&2; exit 1; }

# Prints the first archive URI apt's sources use for the Debian suite $SUITE (not the
# security archive). Reads both the one-line (*.list) and deb822 (*.sources) formats.
debian_mirror() {
    local files=()
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] && files+=("$f")
    done
    ((${#files[@]} > 0)) || return 1
    awk -v suite="$SUITE" '
        function flush() {
            if (types ~ /(^|[ \t])deb([ \t]|$)/ && enabled != "no") {
                n = split(suites, s, /[ \t]+/)
                for (i = 1; i <= n; i++) if (s[i] == suite && !found) {
                    split(uris, u, /[ \t]+/); print u[1]; found = 1
                }
            }
            types = ""; uris = ""; suites = ""; enabled = ""
        }
        found { exit }
        FNR == 1 { flush() }
        FILENAME ~ /\.sources$/ {
            if ($0 ~ /^[ \t]*$/) { flush(); next }
            if ($0 ~ /^[ \t]*#/) next
            key = tolower($1); sub(/:$/, "", key)
            val = $0; sub(/^[^:]*:[ \t]*/, "", val)
            if (key == "types") types = val
            else if (key == "uris") uris = val
            else if (key == "suites") suites = val
            else if (key == "enabled") enabled = tolower(val)
            next
        }
        /^[ \t]*deb[ \t]/ {
            line = $0; sub(/\[[^]]*\]/, "", line); split(line, w, /[ \t]+/)
            j = (w[1] == "") ? 2 : 1
            if (w[j + 2] == suite) { print w[j + 1]; found = 1; exit }
        }
        END { if (!found) flush(); exit found ? 0 : 1 }
    ' "${files[@]}"
}

# Removes a debootstrap target even after an interrupted run: unmounts whatever
# debootstrap left mounted inside it (proc, sys, possibly a bind-mounted /dev), deepest
# first, and never lets rm cross into another file system.
remove_rootfs() {
    local rootfs=$1 mnt
    [[ -n "$rootfs" && "$rootfs" == /var/tmp/pg-password-sync-rootfs.* ]] || return 0
    if [[ -d "$rootfs" ]]; then
        awk -v root="$rootfs/" 'index($2, root) == 1 { print $2 }' /proc/mounts | sort -r |
            while IFS= read -r mnt; do
                umount -l "$mnt" 2>/dev/null || true
            done
        rm -rf --one-file-system "$rootfs"
    fi
    rm -f "$rootfs.log"
}

# Builds $BASE_IMAGE with debootstrap unless it already exists.
ensure_base_image() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base image $BASE_IMAGE present, reusing it"
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || die "building the base image needs root (debootstrap)"
    if ! command -v debootstrap >/dev/null 2>&1; then
        log "installing debootstrap"
        apt_install debootstrap
    fi
    local mirror
    mirror="$(debian_mirror)" || die "no Debian '$SUITE' archive found in apt's sources"
    local rootfs
    rootfs="$(mktemp -d /var/tmp/pg-password-sync-rootfs.XXXXXX)"
    # shellcheck disable=SC2064 # expand now: rootfs is local
    trap "remove_rootfs '$rootfs'" EXIT
    log "debootstrap $SUITE ($BASE_PACKAGES) into $rootfs from apt's Debian mirror"
    local started=$SECONDS
    if ! debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$rootfs" "$mirror" \
        >"$rootfs.log" 2>&1; then
        tail -n 30 "$rootfs.log" >&2
        die "debootstrap failed (the end of its log is above)"
    fi
    # Keep the image small and free of host-specific state.
    rm -rf --one-file-system "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    log "debootstrap took $((SECONDS - started)) s ($(du -sh "$rootfs" | cut -f1)); importing"
    tar -C "$rootfs" -c . | docker import - "$BASE_IMAGE" >/dev/null
    remove_rootfs "$rootfs"
    trap - EXIT
    log "base image $BASE_IMAGE built in $((SECONDS - started)) s"
}

# ---------------------------------------------------------------------------------------
# Test machinery
# ---------------------------------------------------------------------------------------

readonly TEST_IMAGE="${E2E_TEST_IMAGE:-pg-password-sync-e2e:test}"
readonly PG_MAJOR="${E2E_PG_MAJOR:-18}"
[[ "$PG_MAJOR" =~ ^[0-9]+$ ]] || { echo "E2E_PG_MAJOR must be a number" >&2; exit 2; }
# The official images' layout for that major: where the volume goes and PGDATA inside it.
if ((PG_MAJOR >= 18)); then
    readonly DATA_VOLUME=/var/lib/postgresql PGDATA_IN_IMAGE="/var/lib/postgresql/$PG_MAJOR/docker"
else
    readonly DATA_VOLUME=/var/lib/postgresql/data PGDATA_IN_IMAGE=/var/lib/postgresql/data
fi
readonly ROTATE_DEADLINE_MS="${E2E_ROTATE_DEADLINE_MS:-2000}"
readonly STOP_DEADLINE_MS="${E2E_STOP_DEADLINE_MS:-2000}"
PREFIX="ppse2e-$$-${RANDOM}"
readonly PREFIX
readonly LABEL="pg-password-sync-e2e=$PREFIX"
readonly NET="$PREFIX-net"
readonly VOLUME="$PREFIX-data"
readonly DB="$PREFIX-db"
readonly CLIENT="$PREFIX-client"
# Roles of docker/test/initdb.d/10-roles.sql and the secret file each one follows.
readonly -a ROLES=(postgres appuser backupuser temporaluser)
declare -A ROLE_FILE=(
    [postgres]=postgres_password.txt
    [appuser]=postgres_app_user_pw.txt
    [backupuser]=postgres_app_ro_pw.txt
    [temporaluser]=postgres_temporal_pw.txt
)
readonly ALL_KEY_FILES=(postgres_password.txt postgres_app_user_pw.txt postgres_app_ro_pw.txt
    postgres_temporal_pw.txt postgres_app_owner_pw.txt)

WORK=""
BIN=""
USE_GENERATE=0
PASSED=()
FAILED=()
# Measurements for the summary line (empty when the test did not get that far).
ROTATE_MS=""
STOP_MS=""

now_ms() { date +%s%3N; }

cleanup() {
    local rc=$?
    if [[ "${E2E_KEEP:-0}" == 1 ]]; then
        log "E2E_KEEP=1: leaving containers (label $LABEL), $NET, $VOLUME and $WORK"
        return "$rc"
    fi
    local ids
    ids="$(docker ps -aq --filter "label=$LABEL" 2>/dev/null || true)"
    if [[ -n "$ids" ]]; then
        # shellcheck disable=SC2086 # one id per word
        docker rm -f -v $ids >/dev/null 2>&1 || true
    fi
    docker network rm "$NET" >/dev/null 2>&1 || true
    ids="$(docker volume ls -q --filter "label=$LABEL" 2>/dev/null || true)"
    if [[ -n "$ids" ]]; then
        # shellcheck disable=SC2086 # one name per word
        docker volume rm $ids >/dev/null 2>&1 || true
    fi
    [[ -n "$WORK" ]] && rm -rf "$WORK"
    return "$rc"
}

# wait_until TIMEOUT_MS CMD… : polls CMD every 50 ms until it succeeds; 1 on deadline.
wait_until() {
    local timeout_ms=$1
    shift
    local deadline=$(($(now_ms) + timeout_ms))
    until "$@"; do
        (($(now_ms) < deadline)) || return 1
        sleep 0.05
    done
}

# Shows why a step failed: the container's state and the tail of its log.
show_container() {
    local name=$1
    {
        echo "    --- $name: $(docker inspect -f 'status={{.State.Status}} exit={{.State.ExitCode}} started={{.State.StartedAt}}{{if .State.Health}} health={{.State.Health.Status}}{{end}}' "$name" 2>&1)"
        docker inspect -f '{{if .State.Health}}{{range .State.Health.Log}}{{.ExitCode}}: {{.Output}}{{println}}{{end}}{{end}}' "$name" 2>/dev/null |
            grep -v '^[[:space:]]*$' | tail -n 3 | sed 's/^/    health> /'
        docker logs --tail 40 "$name" 2>&1 | sed 's/^/    | /'
    } >&2
}

# fail MESSAGE : reports a failed check of the current test with the container log.
fail() {
    printf '[e2e-docker]   FAIL: %s\n' "$*" >&2
    show_container "$DB"
    return 1
}

run_test() {
    local name=$1
    shift
    log "TEST $name"
    local started
    started=$(now_ms)
    if "$@"; then
        log "  PASS $name ($(($(now_ms) - started)) ms)"
        PASSED+=("$name")
    else
        log "  FAIL $name ($(($(now_ms) - started)) ms)"
        FAILED+=("$name")
    fi
}

# Reads a secret file as pg-password-sync does (trailing CR/LF removed); no process sees it.
read_secret() {
    local value
    value="$(<"$1")"
    value="${value%$'\r'}"
    printf '%s' "$value"
}

# A random secret: 32 hex characters from the kernel CSPRNG.
random_secret() { od -An -tx1 -N16 /dev/urandom | tr -d ' \n'; }

# Writes the five postgres secret files into DIR atomically (temp file, then rename),
# as an editor or generator does, so that a mounted directory shows the new files.
write_keys_fallback() {
    local dir=$1 name tmp
    mkdir -p "$dir"
    chmod 0700 "$dir"
    for name in "${ALL_KEY_FILES[@]}"; do
        tmp="$(mktemp "$dir/.$name.XXXXXX")"
        random_secret >"$tmp"
        printf '\n' >>"$tmp"
        chmod 0600 "$tmp"
        mv -f "$tmp" "$dir/$name"
    done
}

# (Re)generates the secret files in $WORK/keys: with `pg-password-sync generate` when it
# works (first call decides), else with write_keys_fallback.
generate_keys() {
    local force=()
    [[ -d "$WORK/keys" ]] && force=(--force)
    if ((USE_GENERATE)); then
        "$BIN" generate --dir "$WORK" "${force[@]}" >"$WORK/generate.log" 2>&1 || {
            cat "$WORK/generate.log" >&2
            return 1
        }
        return 0
    fi
    write_keys_fallback "$WORK/keys"
}

# Appends every current secret to $WORK/secrets.patterns (0600), one per line, for the
# leak check; never a blank line (an empty grep pattern would match everything).
remember_secrets() {
    local name secret
    (
        umask 077
        for name in "${ALL_KEY_FILES[@]}"; do
            secret="$(read_secret "$WORK/keys/$name")"
            [[ -n "$secret" ]] && printf '%s\n' "$secret"
        done >>"$WORK/secrets.patterns"
    )
}

# Writes a libpq passfile with every role's current password into $WORK/client/NAME.
write_passfile() {
    local target="$WORK/client/$1" role secret tmp
    tmp="$(mktemp "$WORK/client/.pgpass.XXXXXX")"
    chmod 0600 "$tmp"
    for role in "${ROLES[@]}"; do
        secret="$(read_secret "$WORK/keys/${ROLE_FILE[$role]}")"
        secret="${secret//\\/\\\\}"
        secret="${secret//:/\\:}"
        printf '*:*:*:%s:%s\n' "$role" "$secret" >>"$tmp"
    done
    mv -f "$tmp" "$target"
}

# logins_within PASSFILE DEADLINE_MS ROLE… : inside the client container, retries a psql
# login (TCP, SCRAM, password from PASSFILE) for each role until it succeeds or the
# deadline passes; prints the milliseconds it took.
logins_within() {
    local passfile=$1 deadline_ms=$2
    shift 2
    # shellcheck disable=SC2016 # expanded by the container's bash
    docker exec "$CLIENT" bash -c '
        set -u
        pf=$1; budget=$2; shift 2
        start=$(date +%s%3N); end=$((start + budget))
        for role in "$@"; do
            until [[ "$(PGPASSFILE=$pf PGCONNECT_TIMEOUT=2 psql -h db -U "$role" -d postgres \
                        -w -X -Atqc "select current_user" 2>/dev/null)" == "$role" ]]; do
                if (($(date +%s%3N) >= end)); then
                    echo "login as $role with $pf still failing after $budget ms" >&2
                    PGPASSFILE=$pf PGCONNECT_TIMEOUT=2 psql -h db -U "$role" -d postgres -w -X \
                        -Atqc "select 1" 2>&1 | sed "s/^/    psql> /" >&2
                    exit 1
                fi
                sleep 0.02
            done
        done
        echo $(($(date +%s%3N) - start))
    ' _ "/client/$passfile" "$deadline_ms" "$@"
}

# login_refused PASSFILE ROLE : the server rejects ROLE's password from PASSFILE.
login_refused() {
    # shellcheck disable=SC2016 # expanded by the container's bash
    ! docker exec "$CLIENT" bash -c \
        'PGPASSFILE=$1 PGCONNECT_TIMEOUT=2 psql -h db -U "$2" -d postgres -w -X -Atqc "select 1" >/dev/null 2>&1' \
        _ "/client/$1" "$2"
}

log_count() { docker logs "$DB" 2>&1 | grep -cF -- "$1" || true; }
# (grep reads all input: with pipefail, `grep -q` quitting early could fail the pipeline.)
log_has() { docker logs "$DB" 2>&1 | grep -F -- "$1" >/dev/null; }
log_count_above() { (($(log_count "$1") > $2)); }
is_running() { [[ "$(docker inspect -f '{{.State.Running}}' "$DB" 2>/dev/null)" == true ]]; }
started_at() { docker inspect -f '{{.State.StartedAt}}' "$DB"; }
health_exec() { docker exec "$DB" pg-password-sync health; }
health_exec_ok() { health_exec >/dev/null 2>&1; }
health_is() { [[ "$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$DB")" == "$1" ]]; }
sync_logged_or_dead() { log_has 'Password synchronization complete.' || ! is_running; }
healthy_or_dead() { health_is healthy || ! is_running; }
# Every test after the first needs the container from the first one.
require_running() { is_running || fail "the database container is not running"; }

# Zombie processes in the database container (State Z in /proc/*/status).
zombies() {
    # shellcheck disable=SC2016 # expanded by the container's shell
    docker exec "$DB" sh -c 'for s in /proc/[0-9]*/status; do
        grep -q "^State:[[:space:]]*Z" "$s" 2>/dev/null && sed -n "s/^Name:[[:space:]]*//p" "$s"
    done; true'
}
no_zombies() { [[ -z "$(zombies)" ]]; }
orphans_gone() { ! docker exec "$DB" sh -c 'grep -qs "^Name:[[:space:]]*sleep" /proc/[0-9]*/status'; }

# ---------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------

build_binary() {
    if [[ -n "${PG_PASSWORD_SYNC_BIN:-}" ]]; then
        BIN="$(realpath "$PG_PASSWORD_SYNC_BIN")"
        [[ -x "$BIN" ]] || die "PG_PASSWORD_SYNC_BIN=$PG_PASSWORD_SYNC_BIN is not an executable"
        log "using binary $BIN"
        return 0
    fi
    command -v cargo >/dev/null 2>&1 || die "cargo not found; build the binary or set PG_PASSWORD_SYNC_BIN"
    log "cargo build --release --locked (the binary as shipped)"
    local build_log
    build_log="$(mktemp /tmp/pg-password-sync-e2e-cargo.XXXXXX)"
    if ! BIN="$(cd "$REPO_ROOT" && build_release --locked 2>"$build_log")"; then
        tail -n 40 "$build_log" >&2
        rm -f "$build_log"
        die "cargo build failed"
    fi
    rm -f "$build_log"
    [[ -x "$BIN" ]] || die "built binary not found at $BIN"
}

build_test_image() {
    local ctx="$WORK/image"
    mkdir -p "$ctx"
    cp -r "$REPO_ROOT/docker/test/Dockerfile" "$REPO_ROOT/docker/test/docker-entrypoint.sh" \
        "$REPO_ROOT/docker/test/initdb.d" "$ctx/"
    # The production image's init script that unsets the exported password (see below).
    cp "$REPO_ROOT/docker/initdb/zz-unset-password.sh" "$ctx/initdb.d/"
    cp "$BIN" "$ctx/pg-password-sync"
    log "building $TEST_IMAGE FROM $BASE_IMAGE (local images only; layout of PostgreSQL $PG_MAJOR)"
    local started=$SECONDS
    # The legacy builder: no buildx needed, and it never contacts a registry for a FROM
    # image that exists locally.
    if ! DOCKER_BUILDKIT=0 docker build --pull=false --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        --build-arg "PG_MAJOR=$PG_MAJOR" --build-arg "PGDATA=$PGDATA_IN_IMAGE" \
        --build-arg "DATA_VOLUME=$DATA_VOLUME" \
        -t "$TEST_IMAGE" "$ctx" >"$WORK/build.log" 2>&1; then
        tail -n 30 "$WORK/build.log" >&2
        die "docker build of the test image failed"
    fi
    log "test image built in $((SECONDS - started)) s"
}

setup() {
    mkdir -m 0700 "$WORK/client"
    # OIDC secrets are never generated; the generator reads them from this file.
    printf '%s\n' 'OIDC_GOOGLE_CLIENT_SECRET=e2e-not-a-secret' \
        'OIDC_MICROSOFT_CLIENT_SECRET=e2e-not-a-secret' \
        'OIDC_KEYCLOAK_CLIENT_SECRET=e2e-not-a-secret' >"$WORK/user-provided.env"
    if "$BIN" generate --dir "$WORK" >"$WORK/generate.log" 2>&1 && [[ -s "$WORK/keys/postgres_password.txt" ]]; then
        USE_GENERATE=1
        log "secret files made by 'pg-password-sync generate'"
    else
        log "'pg-password-sync generate' did not work ($(grep -v '^[[:space:]]*$' "$WORK/generate.log" | tail -n 1)); writing the files directly"
        rm -rf "$WORK/keys"
        generate_keys
    fi
    remember_secrets
    write_passfile current.pgpass

    docker network create --label "$LABEL" "$NET" >/dev/null
    docker volume create --label "$LABEL" "$VOLUME" >/dev/null
    # A long-lived client on the same user-defined network: `docker exec` into it is much
    # faster than `docker run`, which matters for the 2 s rotation budget.
    docker run -d --name "$CLIENT" --label "$LABEL" --network "$NET" --no-healthcheck \
        -v "$WORK/client:/client:ro" --entrypoint sleep "$TEST_IMAGE" infinity >/dev/null
}

start_db() {
    # SYS_PTRACE only so that the leak test's `docker exec` may read the environment of
    # processes of another uid and of our non-dumpable PID 1 (test-only; not in the image).
    docker run -d --name "$DB" --label "$LABEL" --network "$NET" --network-alias db \
        --cap-add SYS_PTRACE \
        -v "$VOLUME:$DATA_VOLUME" \
        -v "$WORK/keys:/app/keys:ro" \
        -e KEYS_DIR=/app/keys \
        -e POSTGRES_PASSWORD_FILE=/app/keys/postgres_password.txt \
        -e TEMPORAL_DB_USER=temporaluser \
        "$TEST_IMAGE" >/dev/null
}

# ---------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------

test_initial_sync() {
    start_db || { fail "docker run failed"; return 1; }
    wait_until 90000 sync_logged_or_dead
    is_running || { fail "container exited before the first sync"; return 1; }
    log_has 'Password synchronization complete.' || { fail "no 'Password synchronization complete.' within 90 s"; return 1; }
    local ms
    ms="$(logins_within current.pgpass 5000 "${ROLES[@]}")" ||
        { fail "a role cannot log in with its mounted secret"; return 1; }
    log "  every role logs in from a second container with its secret (${ms} ms)"
    # Operators grep the container log: our lines carry the prefix and no colour codes.
    log_has '[pg-password-sync] INFO Password synchronization complete.' ||
        { fail "no '[pg-password-sync]'-prefixed completion line in the log"; return 1; }
    if docker logs "$DB" 2>&1 | grep -F $'\e' >/dev/null; then
        fail "terminal escape codes in the container log"
        return 1
    fi
}

test_sync_unchanged_and_verify() {
    require_running || return 1
    local out role
    # stdout is the report: `role "NAME": changed|unchanged|missing`, then the completion line.
    out="$(docker exec "$DB" pg-password-sync sync 2>"$WORK/sync.err")" ||
        { cat "$WORK/sync.err" >&2; fail "sync failed"; return 1; }
    printf '%s\n' "$out" | sed 's/^/    sync> /' >&2
    for role in "${ROLES[@]}"; do
        printf '%s\n' "$out" | grep -Fx "role \"$role\": unchanged" >/dev/null ||
            { fail "sync does not report $role as unchanged"; return 1; }
    done
    if printf '%s\n' "$out" | grep -E '^role ".*": (changed|missing)$' >/dev/null; then
        fail "a second sync changed something"
        return 1
    fi
    printf '%s\n' "$out" | grep -Fx 'Password synchronization complete.' >/dev/null ||
        { fail "sync did not print 'Password synchronization complete.'"; return 1; }
    out="$(docker exec "$DB" pg-password-sync verify 2>&1)" || { fail "verify failed: $out"; return 1; }
    printf '%s\n' "$out" | sed 's/^/    verify> /' >&2
}

test_healthy_no_zombies() {
    require_running || return 1
    wait_until 30000 healthy_or_dead
    health_is healthy || { fail "health status did not become healthy within 30 s"; return 1; }
    # Orphans: each `sleep` is left behind by its exiting parent shell and reparented to
    # PID 1, which must reap it once it exits.
    docker exec "$DB" sh -c '(sleep 0.2 &) ; (sleep 0.3 &) ; exit 0' ||
        { fail "cannot start orphan processes"; return 1; }
    wait_until 5000 orphans_gone || true
    if ! wait_until 3000 no_zombies; then
        fail "zombies in the container: $(zombies | tr '\n' ' ')"
        return 1
    fi
    is_running || { fail "container not running"; return 1; }
}

test_live_rotation() {
    require_running || return 1
    local before
    before="$(started_at)"
    cp "$WORK/client/current.pgpass" "$WORK/client/old.pgpass"
    # What `scripts/rotate.sh compose` does with the directory mount: new files renamed
    # into place on the host; nothing else.
    generate_keys || { fail "generating new secrets failed"; return 1; }
    local renamed
    renamed=$(now_ms)
    remember_secrets
    write_passfile current.pgpass
    local ms total
    ms="$(logins_within current.pgpass "$ROTATE_DEADLINE_MS" "${ROLES[@]}")" ||
        { fail "new passwords not live within $ROTATE_DEADLINE_MS ms"; return 1; }
    # Measured on the host from the rename, so `docker exec` start-up counts against us.
    total=$(($(now_ms) - renamed))
    ROTATE_MS=$total
    log "  every new password logs in ${total} ms after the rename (${ms} ms of polling in the client)"
    ((total <= ROTATE_DEADLINE_MS)) || { fail "new passwords took ${total} ms (limit $ROTATE_DEADLINE_MS)"; return 1; }
    login_refused old.pgpass appuser || { fail "the old appuser password still works"; return 1; }
    # The rest of `rotate.sh compose`: health reports the new files as synced, verify passes.
    wait_until 5000 health_exec_ok || { fail "health not ok within 5 s of the rotation: $(health_exec 2>&1)"; return 1; }
    local out
    out="$(docker exec "$DB" pg-password-sync verify 2>&1)" || { fail "verify after the rotation failed: $out"; return 1; }
    [[ "$(started_at)" == "$before" ]] || { fail "the container was restarted"; return 1; }
    [[ "$(docker inspect -f '{{.RestartCount}}' "$DB")" == 0 ]] || { fail "restart count is not 0"; return 1; }
}

test_sighup_reload() {
    require_running || return 1
    local before_start before_count
    before_start="$(started_at)"
    before_count="$(log_count 'received SIGHUP, reloading configuration files')"
    docker kill -s HUP "$DB" >/dev/null || { fail "docker kill -s HUP failed"; return 1; }
    wait_until 5000 log_count_above 'received SIGHUP, reloading configuration files' "$before_count" ||
        { fail "postgres did not log a configuration reload within 5 s"; return 1; }
    is_running || { fail "container stopped after SIGHUP"; return 1; }
    [[ "$(started_at)" == "$before_start" ]] || { fail "container restarted after SIGHUP"; return 1; }
    logins_within current.pgpass 5000 appuser >/dev/null || { fail "no login after SIGHUP"; return 1; }
}

test_clean_stop_and_restart() {
    require_running || return 1
    local started stopped_ms code ready_before sync_before down_before clean_before
    ready_before="$(log_count 'database system is ready to accept connections')"
    sync_before="$(log_count 'Password synchronization complete.')"
    down_before="$(log_count 'database system is shut down')"
    clean_before="$(log_count 'database system was shut down at')"
    started=$(now_ms)
    # The default timeout (10 s): a PID 1 that ignored the stop signal would be SIGKILLed
    # only after it, and take far longer than the limit below.
    docker stop "$DB" >/dev/null || { fail "docker stop failed"; return 1; }
    stopped_ms=$(($(now_ms) - started))
    STOP_MS=$stopped_ms
    code="$(docker inspect -f '{{.State.ExitCode}}' "$DB")"
    log "  docker stop took ${stopped_ms} ms, exit code $code"
    [[ "$code" == 0 ]] || { fail "exit code $code after docker stop (expected 0)"; return 1; }
    ((stopped_ms < STOP_DEADLINE_MS)) || { fail "docker stop took ${stopped_ms} ms (limit $STOP_DEADLINE_MS)"; return 1; }
    log_count_above 'database system is shut down' "$down_before" ||
        { fail "postgres did not log a completed shutdown before the container exited"; return 1; }
    docker start "$DB" >/dev/null || { fail "docker start failed"; return 1; }
    wait_until 60000 log_count_above 'database system is ready to accept connections' "$ready_before" ||
        { fail "postgres not ready within 60 s of the restart"; return 1; }
    if log_has 'not properly shut down' || log_has 'automatic recovery in progress'; then
        fail "crash recovery after docker stop"
        return 1
    fi
    # Positive evidence: the startup found a cleanly shut down cluster.
    log_count_above 'database system was shut down at' "$clean_before" ||
        { fail "the restart did not log 'database system was shut down at'"; return 1; }
    wait_until 30000 log_count_above 'Password synchronization complete.' "$sync_before" ||
        { fail "no sync after the restart"; return 1; }
    # The state file of the previous start is still in the container's /run: health must
    # follow the new process, and be healthy again once it has synced.
    wait_until 30000 healthy_or_dead
    health_is healthy || { fail "not healthy within 30 s of the restart"; return 1; }
}

test_no_secret_leaks() {
    require_running || return 1
    # Another uid's (or a non-dumpable process's) environ needs CAP_SYS_PTRACE (added to
    # the container in start_db); without it the scan would silently read nothing. Prove
    # it can read PID 1's and the postmaster's before trusting it.
    if ! docker exec "$DB" sh -c \
        'cat /proc/1/environ "/proc/$(head -n 1 "$PGDATA/postmaster.pid")/environ" >/dev/null'; then
        fail "cannot read the environment of PID 1 and the postmaster"
        return 1
    fi
    # The patterns travel on stdin (grep -f -), never on a command line.
    if docker exec -i "$DB" sh -c 'grep -laF -f - /proc/[0-9]*/cmdline /proc/[0-9]*/environ 2>/dev/null' \
        <"$WORK/secrets.patterns" >"$WORK/leaks" 2>&1; then
        fail "a secret appears in $(tr '\n' ' ' <"$WORK/leaks")"
        return 1
    fi
    if docker logs "$DB" 2>&1 | grep -F -f "$WORK/secrets.patterns" >/dev/null; then
        fail "a secret appears in the container log"
        return 1
    fi
    log "  $(wc -l <"$WORK/secrets.patterns") secrets (initial and rotated): none in any argv, environment or the log"
}

test_data_layout() {
    require_running || return 1
    local pgdata mounted pidfile_dir
    pgdata="$(docker exec "$DB" sh -c 'printf %s "$PGDATA"')"
    [[ "$pgdata" == "$PGDATA_IN_IMAGE" ]] || { fail "PGDATA is '$pgdata', expected $PGDATA_IN_IMAGE"; return 1; }
    mounted="$(docker inspect -f "{{range .Mounts}}{{if eq .Name \"$VOLUME\"}}{{.Destination}}{{end}}{{end}}" "$DB")"
    [[ "$mounted" == "$DATA_VOLUME" ]] || { fail "the data volume is mounted at '$mounted', expected $DATA_VOLUME"; return 1; }
    docker exec "$DB" test -s "$PGDATA_IN_IMAGE/PG_VERSION" ||
        { fail "no cluster (PG_VERSION) in $PGDATA_IN_IMAGE"; return 1; }
    # The running server's data directory, as it wrote it into postmaster.pid.
    pidfile_dir="$(docker exec "$DB" sed -n 2p "$PGDATA_IN_IMAGE/postmaster.pid")"
    [[ "$pidfile_dir" == "$PGDATA_IN_IMAGE" ]] || { fail "the server runs in '$pidfile_dir'"; return 1; }
    log "  PostgreSQL $PG_MAJOR layout: the server (15) runs in $pidfile_dir on the volume at $mounted"
}

# count_lines TEXT NEEDLE : how many lines of TEXT contain NEEDLE.
count_lines() { grep -cF -- "$2" <<<"$1" || true; }

test_verify_not_fooled_by_trust() {
    require_running || return 1
    local hba out code=0 chosen
    # What the official entrypoint leaves: initdb's trust lines, then its appended line.
    hba="$(docker exec "$DB" sh -c 'grep -Ev "^[[:space:]]*(#|$)" "$PGDATA/pg_hba.conf"' | tr -s ' \t' ' ')"
    printf '%s\n' "$hba" | sed 's/^/    pg_hba> /' >&2
    grep -Fx 'host all all 127.0.0.1/32 trust' <<<"$hba" >/dev/null ||
        { fail "pg_hba.conf has no trust line for 127.0.0.1 (not the official image's)"; return 1; }
    [[ "$(tail -n 1 <<<"$hba")" == 'host all all all scram-sha-256' ]] ||
        { fail "pg_hba.conf does not end with 'host all all all scram-sha-256'"; return 1; }

    # Over trusted loopback a login proves nothing: every role is not verifiable, exit 7.
    out="$(docker exec "$DB" pg-password-sync verify --host 127.0.0.1 2>&1)" || code=$?
    printf '%s\n' "$out" | sed 's/^/    verify 127.0.0.1> /' >&2
    ((code == 7)) || { fail "verify --host 127.0.0.1 exited $code (expected 7)"; return 1; }
    (($(count_lines "$out" 'not verifiable (the server trusts this connection: pg_hba.conf') == ${#ROLES[@]})) ||
        { fail "not every role is 'not verifiable' over trusted loopback"; return 1; }

    # Without --host (what rotate.sh runs): the container's own address, a real check.
    out="$(docker exec "$DB" pg-password-sync verify 2>&1)" || { fail "verify failed: $out"; return 1; }
    (($(count_lines "$out" ': ok (logs in; a wrong password is refused)') == ${#ROLES[@]})) ||
        { fail "verify did not check every role: $out"; return 1; }
    chosen="$(sed -n 's/.*verifying at \([^:]*\):.*/\1/p' <<<"$out" | head -n 1)"
    [[ -n "$chosen" && "$chosen" != 127.* ]] || { fail "verify did not move off loopback: $out"; return 1; }
    log "  verify found the checked address $chosen on its own"

    # Wrong passwords for every role must fail there (the old verify passed them).
    docker exec "$DB" sh -c 'umask 077; mkdir -p /tmp/wrong-keys && for f in "$@"; do
        od -An -tx1 -N16 /dev/urandom | tr -d " \n" >"/tmp/wrong-keys/$f"; done' _ "${ALL_KEY_FILES[@]}" ||
        { fail "cannot write wrong keys"; return 1; }
    code=0
    out="$(docker exec -e KEYS_DIR=/tmp/wrong-keys \
        -e POSTGRES_PASSWORD_FILE=/tmp/wrong-keys/postgres_password.txt \
        "$DB" pg-password-sync verify 2>&1)" || code=$?
    docker exec "$DB" rm -rf /tmp/wrong-keys
    printf '%s\n' "$out" | sed 's/^/    verify wrong keys> /' >&2
    ((code == 7)) || { fail "verify with wrong passwords exited $code (expected 7)"; return 1; }
    (($(count_lines "$out" ': FAILED') == ${#ROLES[@]})) ||
        { fail "not every wrong password FAILED"; return 1; }
    (($(count_lines "$out" 'not verifiable') == 0)) || { fail "a role was 'not verifiable' at $chosen"; return 1; }
}

# The official 18+ image refuses to initialise beside a volume mounted the pre-18 way.
test_refuses_old_mount() {
    local vol="$PREFIX-old" out code=0 found
    docker volume create --label "$LABEL" "$vol" >/dev/null
    out="$(timeout 120 docker run --rm --label "$LABEL" --name "$PREFIX-old" \
        -v "$vol:/var/lib/postgresql/data" \
        -v "$WORK/keys:/app/keys:ro" \
        -e KEYS_DIR=/app/keys \
        -e POSTGRES_PASSWORD_FILE=/app/keys/postgres_password.txt \
        "$TEST_IMAGE" 2>&1)" || code=$?
    printf '%s\n' "$out" | grep -F 'docker-entrypoint' | sed 's/^/    | /' >&2
    ((code == 1)) || { printf '[e2e-docker]   FAIL: exit %s (expected 1)\n' "$code" >&2; return 1; }
    grep -F "/var/lib/postgresql/data (a mount that PostgreSQL $PG_MAJOR does not use)" <<<"$out" >/dev/null ||
        { printf '[e2e-docker]   FAIL: no refusal naming the /var/lib/postgresql/data mount\n' >&2; return 1; }
    found="$(docker run --rm --label "$LABEL" --entrypoint find -v "$vol:/check" "$TEST_IMAGE" \
        /check -name PG_VERSION)"
    [[ -z "$found" ]] || { printf '[e2e-docker]   FAIL: a cluster was initialised anyway: %s\n' "$found" >&2; return 1; }
    log "  refused with exit 1, nothing initialised"
}

main() {
    local base_only=0 script_started=$SECONDS
    while (($# > 0)); do
        case "$1" in
            --base-only) base_only=1 ;;
            -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
            *) die "unknown argument: $1 (try --help)" ;;
        esac
        shift
    done
    trap 'exit 130' INT
    trap 'exit 143' TERM
    if ! docker info >/dev/null 2>&1; then
        echo "SKIP: no Docker engine answers 'docker info'; container tests not run"
        exit 0
    fi
    ensure_base_image
    ((base_only == 0)) || exit 0

    trap cleanup EXIT
    build_binary
    WORK="$(mktemp -d /tmp/pg-password-sync-e2e.XXXXXX)"
    chmod 0700 "$WORK"
    build_test_image
    setup

    run_test "initial sync, every role logs in" test_initial_sync
    # After the first start (initdb) and again after a restart on the same volume: the
    # entrypoint exports the superuser password on both paths.
    run_test "no secret in argv or environment after the first start" test_no_secret_leaks
    run_test "second sync unchanged, verify passes" test_sync_unchanged_and_verify
    run_test "PostgreSQL $PG_MAJOR layout: PGDATA $PGDATA_IN_IMAGE, volume at $DATA_VOLUME" test_data_layout
    run_test "official pg_hba.conf: verify refuses trusted loopback, checks the container's address" \
        test_verify_not_fooled_by_trust
    run_test "healthy, no zombies" test_healthy_no_zombies
    run_test "live rotation without restart" test_live_rotation
    run_test "SIGHUP reloads postgres" test_sighup_reload
    run_test "docker stop is clean, restart without recovery" test_clean_stop_and_restart
    run_test "no secret in argv, environment or log after the restart" test_no_secret_leaks
    if ((PG_MAJOR >= 18)); then
        run_test "a volume at /var/lib/postgresql/data is refused (18+)" test_refuses_old_mount
    fi

    local name
    for name in "${FAILED[@]}"; do
        log "failed: $name"
    done
    echo "e2e-docker: ${#PASSED[@]} passed, ${#FAILED[@]} failed in $((SECONDS - script_started)) s (layout of PostgreSQL $PG_MAJOR, server 15; rotation live ${ROTATE_MS:-?} ms after the rename, docker stop ${STOP_MS:-?} ms)"
    ((${#FAILED[@]} == 0))
}

main "$@"
