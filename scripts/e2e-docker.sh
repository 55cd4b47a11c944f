#!/usr/bin/env bash
# End-to-end container test of pg-password-sync against a real Docker engine: what a user
# runs, with what the README says. It builds the product image from docker/Dockerfile
# itself (through docker/compose.yaml's build section), brings the stack up with
# docker/compose.yaml, rotates with `scripts/rotate.sh compose`, and takes the stack down
# with `compose down -v`.
#
# Needs no registry. docker/Dockerfile's two base images are build arguments; the test
# points them at local stand-ins (docker/test/Dockerfile), built from two base images that
# are made once and kept: pg-password-sync-base:bookworm, a debootstrap'ed Debian root
# filesystem (postgresql-15 + gosu), and pg-password-sync-base:busybox, Debian's static
# busybox; both from apt's mirror, imported with `docker import`.
#   BASE_IMAGE   for postgres:18-bookworm: the server is PostgreSQL 15 (Debian bookworm's)
#                behind a stand-in for the official docker-entrypoint.sh
#                (docker/test/docker-entrypoint.sh), with the official images' pg_hba.conf
#                (initdb's trust lines for loopback, then `host all all all scram-sha-256`)
#                and the PostgreSQL 18 layout (the volume at /var/lib/postgresql, PGDATA
#                /var/lib/postgresql/18/docker);
#   BUILD_IMAGE  for rust:1-bookworm: its `cargo build --release --locked` checks that the
#                crate the build stage copied is the one the host built the binary from
#                (`cargo build --release`, or PG_PASSWORD_SYNC_BIN) and hands that binary over.
# Every line of docker/Dockerfile runs. The Compose file is used as shipped, with an
# override file (written to the temp dir) for what a local test must change: the image
# name and those two build arguments, a container name, labels for the cleanup, the test's
# init SQL (docker/test/initdb.d) mounted beside the image's own init script,
# CAP_SYS_PTRACE for the leak scan, and a health check interval of 1 s instead of 10 s
# (the first probe comes one interval after the start). The published port is a free one
# on 127.0.0.1 (POSTGRES_HOST_PORT=0), the secrets directory (SECRETS_DIR) a temp dir;
# everything else runs on the project's Docker network.
#
# Checks, in order (each failure shows the container's state and log):
#   1. compose up: the first sync, every role logs in from a second container;
#   2. the image carries docker/Dockerfile's ENTRYPOINT, CMD, ENV, STOPSIGNAL, HEALTHCHECK,
#      no USER, the host's binary and the init script; the container compose's settings;
#   3. no secret in any argv or environment after the first start;
#   4. a second sync changes nothing, verify passes;
#   5. the PostgreSQL 18 layout (PGDATA, where the volume is mounted);
#   6. verify reports trusted loopback as not verifiable, checks the container's address
#      on its own, and fails wrong passwords there;
#   7. the port is published on 127.0.0.1 only; verify from the host passes through it;
#   8. healthy (compose.yaml's health check), no zombies;
#   9. `scripts/rotate.sh compose`: the new passwords log in within 2 s of the rename, the
#      old one is refused, rotate.sh sees health and verify pass, no restart;
#  10. SIGHUP reloads postgres without a restart;
#  11. docker stop sends the container's stop signal, SIGINT; postgres shuts down cleanly
#      within 2 s of it; the restart needs no crash recovery, syncs and is healthy again;
#  12. no secret in any argv, environment or log after the restart;
#  13. the image run by itself refuses a volume at /var/lib/postgresql/data (18+);
#  14. compose down -v stops postgres with SIGINT, exit code 0, and leaves no container,
#      network or volume.
#
# Usage: scripts/e2e-docker.sh [--base-only]
#   --base-only   only make sure the two base images exist (build them when missing), then exit
#
# Environment:
#   PG_PASSWORD_SYNC_BIN   path of an already built binary (default: cargo build --release)
#   E2E_PG_MAJOR           the layout's major version (default 18; 17 and older: a copy of
#                          compose.yaml edited as docker/README.md says, the volume at
#                          /var/lib/postgresql/data)
#   E2E_BASE_IMAGE         base image tag (default pg-password-sync-base:bookworm)
#   E2E_TOOLBOX_IMAGE      busybox base image tag (default pg-password-sync-base:busybox)
#   E2E_ROTATE_DEADLINE_MS, E2E_STOP_DEADLINE_MS   the two time limits (default 2000 each)
#   E2E_KEEP=1             keep the temp dir, and whatever a failed run left up, for inspection
#
# Installs docker-compose (Debian's) when no compose client is there. Prints `SKIP: …` and
# exits 0 when no Docker engine answers. The last line is a summary such as `e2e-docker:
# 14 passed, 0 failed in 27 s (docker/Dockerfile + docker/compose.yaml, layout of
# PostgreSQL 18, server 15; rotation live 246 ms after the rename, stop 29 ms from SIGINT
# to exit)`.
set -euo pipefail

readonly BASE_IMAGE="${E2E_BASE_IMAGE:-pg-password-sync-base:bookworm}"
readonly SUITE="bookworm"
readonly BASE_PACKAGES="postgresql-15,gosu,procps"
# The stand-in toolchain's root file system: Debian's static busybox, nothing else.
readonly TOOLBOX_IMAGE="${E2E_TOOLBOX_IMAGE:-pg-password-sync-base:busybox}"
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

# Builds $TOOLBOX_IMAGE unless it already exists: busybox-static's binary (the .deb from
# apt's mirror, unpacked, not installed) and a link for each of its applets in /bin, then
# `docker import`. A few MB, so each build step on it is quick.
ensure_toolbox_image() {
    if docker image inspect "$TOOLBOX_IMAGE" >/dev/null 2>&1; then
        log "toolbox image $TOOLBOX_IMAGE present, reusing it"
        return 0
    fi
    local dir applet
    dir="$(mktemp -d /tmp/pg-password-sync-busybox.XXXXXX)"
    # shellcheck disable=SC2064 # expand now: dir is local
    trap "rm -rf '$dir'" EXIT
    chmod 0755 "$dir" # apt's download sandbox user writes here
    apt_download "$dir" busybox-static || die "cannot download busybox-static from apt's mirror"
    dpkg-deb -x "$dir"/busybox-static_*.deb "$dir/deb"
    mkdir -p "$dir/rootfs/bin" "$dir/rootfs/tmp" "$dir/rootfs/usr/local/bin"
    chmod 1777 "$dir/rootfs/tmp"
    install -m 0755 "$dir/deb/bin/busybox" "$dir/rootfs/bin/busybox"
    for applet in $("$dir/rootfs/bin/busybox" --list); do
        [[ -e "$dir/rootfs/bin/$applet" ]] || ln -s busybox "$dir/rootfs/bin/$applet"
    done
    tar -C "$dir/rootfs" -c . | docker import - "$TOOLBOX_IMAGE" >/dev/null
    rm -rf "$dir"
    trap - EXIT
    log "toolbox image $TOOLBOX_IMAGE built ($(docker image inspect -f '{{.Size}}' "$TOOLBOX_IMAGE") bytes)"
}

# ---------------------------------------------------------------------------------------
# Test machinery
# ---------------------------------------------------------------------------------------

readonly PG_MAJOR="${E2E_PG_MAJOR:-18}"
[[ "$PG_MAJOR" =~ ^[0-9]+$ ]] || { echo "E2E_PG_MAJOR must be a number" >&2; exit 2; }
# The official images' layout for that major: where the volume goes and PGDATA inside it.
if ((PG_MAJOR >= 18)); then
    readonly DATA_VOLUME=/var/lib/postgresql PGDATA_IN_IMAGE="/var/lib/postgresql/$PG_MAJOR/docker"
else
    readonly DATA_VOLUME=/var/lib/postgresql/data PGDATA_IN_IMAGE=/var/lib/postgresql/data
fi
# Local images: the two stand-ins docker/Dockerfile is built FROM, and the product image
# (never the user's pg-password-sync:pgNN tag).
readonly STANDIN_POSTGRES="pg-password-sync-e2e:postgres$PG_MAJOR-stand-in"
readonly STANDIN_RUST="pg-password-sync-e2e:rust-stand-in"
readonly PRODUCT_IMAGE="pg-password-sync-e2e:pg$PG_MAJOR"
readonly ROTATE_DEADLINE_MS="${E2E_ROTATE_DEADLINE_MS:-2000}"
readonly STOP_DEADLINE_MS="${E2E_STOP_DEADLINE_MS:-2000}"
PREFIX="ppse2e-$$-${RANDOM}"
readonly PREFIX
readonly LABEL="pg-password-sync-e2e=$PREFIX"
# The Compose project and what it names after it.
readonly SERVICE=postgres
readonly DB="$PREFIX-db"
readonly VOLUME="${PREFIX}_postgres_data"
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
readonly VERIFY_OK=': ok (logs in; a wrong password is refused)'

WORK=""
BIN=""
COMPOSE=()
CLIENT_STARTER=""
POSTGRES_BUILD=""
STANDIN_ARGS=()
REFUSAL_PROBE=""
# 1 once `compose down` has run (the cleanup need not run it again).
STACK_DOWN=0
# docker/compose.yaml, or for E2E_PG_MAJOR <= 17 the copy edited for that layout.
COMPOSE_FILE="$REPO_ROOT/docker/compose.yaml"
PASSED=()
FAILED=()
# Measurements for the summary line (empty when the test did not get that far).
ROTATE_MS=""
STOP_MS=""

# What compose.yaml interpolates, and the project every compose call (rotate.sh's too)
# works on. The classic builder: no buildx needed, and it never asks a registry for a
# FROM image that exists locally.
export COMPOSE_PROJECT_NAME="$PREFIX" POSTGRES_HOST_PORT=0 DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
export SECRETS_DIR=""

now_ms() { date +%s%3N; }

# compose ARG… : the compose client on docker/compose.yaml plus the test's override file.
compose() { "${COMPOSE[@]}" -f "$COMPOSE_FILE" -f "$WORK/compose.override.yaml" "$@"; }

cleanup() {
    local rc=$?
    if [[ "${E2E_KEEP:-0}" == 1 ]]; then
        log "E2E_KEEP=1: leaving the Compose project $PREFIX, containers, volumes and networks labelled $LABEL, and $WORK"
        return "$rc"
    fi
    # Background starts first, so that nothing they make comes after the removal.
    local pid
    for pid in "$POSTGRES_BUILD" "$CLIENT_STARTER" "$REFUSAL_PROBE"; do
        [[ -z "$pid" ]] || wait "$pid" 2>/dev/null || true
    done
    docker rm -f -v "$CLIENT" >/dev/null 2>&1 || true
    if ((STACK_DOWN == 0)) && [[ -n "$WORK" && -f "$WORK/compose.override.yaml" && ${#COMPOSE[@]} -gt 0 ]]; then
        compose down -v --remove-orphans -t 10 >/dev/null 2>&1 || true
    fi
    # Whatever is left (an interrupted `up`, the refusal test's volume).
    local kind ids
    ids="$(docker ps -aq --filter "label=$LABEL" 2>/dev/null || true)"
    if [[ -n "$ids" ]]; then
        # shellcheck disable=SC2086 # one id per word
        docker rm -f -v $ids >/dev/null 2>&1 || true
    fi
    for kind in network volume; do
        ids="$(docker "$kind" ls -q --filter "label=$LABEL" 2>/dev/null || true)"
        if [[ -n "$ids" ]]; then
            # shellcheck disable=SC2086 # one name per word
            docker "$kind" rm $ids >/dev/null 2>&1 || true
        fi
    done
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
            until [[ "$(PGPASSFILE=$pf PGCONNECT_TIMEOUT=2 psql -h postgres -U "$role" -d postgres \
                        -w -X -Atqc "select current_user" 2>/dev/null)" == "$role" ]]; do
                if (($(date +%s%3N) >= end)); then
                    echo "login as $role with $pf still failing after $budget ms" >&2
                    PGPASSFILE=$pf PGCONNECT_TIMEOUT=2 psql -h postgres -U "$role" -d postgres -w -X \
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
        'PGPASSFILE=$1 PGCONNECT_TIMEOUT=2 psql -h postgres -U "$2" -d postgres -w -X -Atqc "select 1" >/dev/null 2>&1' \
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

# A compose client: `docker compose` (v2) or docker-compose, else Debian's docker-compose.
ensure_compose() {
    if docker compose version >/dev/null 2>&1; then
        COMPOSE=(docker compose)
    else
        if ! command -v docker-compose >/dev/null 2>&1; then
            log "installing docker-compose"
            apt_install docker-compose || die "no compose client, and docker-compose could not be installed"
        fi
        COMPOSE=(docker-compose)
    fi
    log "compose client: ${COMPOSE[*]}"
}

# docker_build LOG ARG… : the classic builder, its output in $WORK/LOG (the end shown on failure).
docker_build() {
    local logfile="$WORK/$1"
    shift
    DOCKER_BUILDKIT=0 docker build --pull=false "$@" >"$logfile" 2>&1 || {
        tail -n 30 "$logfile" >&2
        return 1
    }
}

# The build arguments of docker/test/Dockerfile (both targets).
standin_args() {
    STANDIN_ARGS=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TOOLBOX_IMAGE=$TOOLBOX_IMAGE"
        --build-arg "PG_MAJOR=$PG_MAJOR" --build-arg "PGDATA=$PGDATA_IN_IMAGE"
        --build-arg "DATA_VOLUME=$DATA_VOLUME")
}

# The stand-in for postgres:<major>-bookworm: needs no binary, so it is built (in the
# background) while cargo builds one.
build_standin_postgres() {
    local ctx="$WORK/image-postgres" started=$SECONDS
    mkdir -p "$ctx"
    cp "$REPO_ROOT/docker/test/Dockerfile" "$REPO_ROOT/docker/test/docker-entrypoint.sh" "$ctx/"
    standin_args
    docker_build standin-postgres.log "${STANDIN_ARGS[@]}" --target postgres -t "$STANDIN_POSTGRES" "$ctx" ||
        die "docker build of $STANDIN_POSTGRES failed"
    log "$STANDIN_POSTGRES built FROM $BASE_IMAGE in $((SECONDS - started)) s"
}

# The stand-in for rust:1-bookworm with the binary, then docker/Dockerfile itself, built
# the way a user builds it: `compose build` with compose.yaml's build section.
build_images() {
    local ctx="$WORK/image-rust" started=$SECONDS src_files=()
    mkdir -p "$ctx/prebuilt"
    # (The postgres stage comes first in the file: the classic builder walks it again,
    # from its cache, so its COPY source must be here too.)
    cp -r "$REPO_ROOT/docker/test/Dockerfile" "$REPO_ROOT/docker/test/docker-entrypoint.sh" \
        "$REPO_ROOT/docker/test/toolchain" "$ctx/"
    cp "$BIN" "$ctx/prebuilt/pg-password-sync"
    # The crate as docker/Dockerfile's build stage copies it (see .dockerignore), for the
    # stand-in cargo's check.
    mapfile -t src_files < <(cd "$REPO_ROOT" && find src -type f | LC_ALL=C sort)
    (cd "$REPO_ROOT" && sha256sum Cargo.toml Cargo.lock rust-toolchain.toml .cargo/config.toml \
        "${src_files[@]}") >"$ctx/prebuilt/crate.sha256"
    standin_args
    docker_build standin-rust.log "${STANDIN_ARGS[@]}" --target rust -t "$STANDIN_RUST" "$ctx" ||
        die "docker build of $STANDIN_RUST failed"
    log "$STANDIN_RUST built FROM $TOOLBOX_IMAGE in $((SECONDS - started)) s; building $PRODUCT_IMAGE from docker/Dockerfile (compose build)"
    started=$SECONDS
    compose build "$SERVICE" >"$WORK/build.log" 2>&1 || {
        tail -n 30 "$WORK/build.log" >&2
        die "compose build of docker/Dockerfile failed"
    }
    # The stand-in cargo's report, proof that the build stage ran its checks (compose
    # colours a build's stderr: the escape codes go).
    grep -F '[stand-in cargo]' "$WORK/build.log" | sed -e $'s/\e\\[[0-9;]*m//g' -e 's/^/    /' >&2 || true
    log "$PRODUCT_IMAGE built in $((SECONDS - started)) s"
}

# For 17 and older: compose.yaml edited as docker/README.md tells a user to (PG_MAJOR and
# the image tag of that major, the volume at /var/lib/postgresql/data), in the temp dir.
# Its relative paths then start there: the override gives the build context.
edited_compose_file() {
    mkdir -p "$WORK/compose/docker"
    sed -e "s|PG_MAJOR: \"18\"|PG_MAJOR: \"$PG_MAJOR\"|" \
        -e "s|pg-password-sync:pg18|pg-password-sync:pg$PG_MAJOR|" \
        -e 's|- postgres_data:/var/lib/postgresql$|- postgres_data:/var/lib/postgresql/data|' \
        "$REPO_ROOT/docker/compose.yaml" >"$WORK/compose/docker/compose.yaml"
    grep -F -- '- postgres_data:/var/lib/postgresql/data' "$WORK/compose/docker/compose.yaml" >/dev/null ||
        die "cannot edit compose.yaml for the layout of PostgreSQL $PG_MAJOR"
    COMPOSE_FILE="$WORK/compose/docker/compose.yaml"
}

# What a local test changes in compose.yaml, as a user's override file would. Values are
# paths and names only; YAML double-quoted (none of them holds a quote or backslash).
write_override() {
    local context=""
    ((PG_MAJOR >= 18)) || context="      context: \"$REPO_ROOT\""
    cat >"$WORK/compose.override.yaml" <<YAML
# Written by scripts/e2e-docker.sh for project $PREFIX.
services:
  $SERVICE:
    image: "$PRODUCT_IMAGE"
    build:
$context
      args:
        BUILD_IMAGE: "$STANDIN_RUST"
        BASE_IMAGE: "$STANDIN_POSTGRES"
    container_name: "$DB"
    labels:
      pg-password-sync-e2e: "$PREFIX"
    # Test only: the leak scan reads the environment of processes of other uids and of
    # the non-dumpable PID 1.
    cap_add:
      - SYS_PTRACE
    # Test only: the health check as shipped but probed every second (Docker probes first
    # one interval after the start, and Engine 20.10 knows no start_interval).
    healthcheck:
      interval: 1s
    volumes:
      # The test's roles, beside the image's own zz-unset-password.sh.
      - "$REPO_ROOT/docker/test/initdb.d/10-roles.sql:/docker-entrypoint-initdb.d/10-roles.sql:ro"
volumes:
  postgres_data:
    labels:
      pg-password-sync-e2e: "$PREFIX"
networks:
  default:
    labels:
      pg-password-sync-e2e: "$PREFIX"
YAML
}

setup() {
    mkdir -m 0700 "$WORK/client"
    # compose.yaml mounts ${SECRETS_DIR}/keys; rotate.sh generates into SECRETS_DIR.
    SECRETS_DIR="$WORK"
    # OIDC secrets are never generated; the generator reads them from this file.
    printf '%s\n' 'OIDC_GOOGLE_CLIENT_SECRET=e2e-not-a-secret' \
        'OIDC_MICROSOFT_CLIENT_SECRET=e2e-not-a-secret' \
        'OIDC_KEYCLOAK_CLIENT_SECRET=e2e-not-a-secret' >"$WORK/user-provided.env"
    # The README's first step: `pg-password-sync generate --dir infra/secrets`.
    if ! "$BIN" generate --dir "$WORK" >"$WORK/generate.log" 2>&1 || [[ ! -s "$WORK/keys/postgres_password.txt" ]]; then
        tail -n 5 "$WORK/generate.log" >&2
        die "'pg-password-sync generate --dir' failed"
    fi
    remember_secrets
    write_passfile current.pgpass
    ((PG_MAJOR >= 18)) || edited_compose_file
    write_override
}

# `compose up -d`, then (in the background: PID of it in CLIENT_STARTER) a long-lived client
# container on the project's network: `docker exec` into it is much faster than `docker
# run`, which matters for the 2 s rotation budget.
start_stack() {
    compose up -d --no-build "$SERVICE" >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; return 1; }
    local net
    net="$(docker inspect -f '{{range $name, $_ := .NetworkSettings.Networks}}{{$name}}{{end}}' "$DB")" || return 1
    docker run -d --name "$CLIENT" --label "$LABEL" --network "$net" --no-healthcheck \
        -v "$WORK/client:/client:ro" --entrypoint sleep "$STANDIN_POSTGRES" infinity >"$WORK/client.log" 2>&1 &
    CLIENT_STARTER=$!
}

# ---------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------

# expect WHAT ACTUAL EXPECTED : fails (with both) unless they are equal.
expect() {
    [[ "$2" == "$3" ]] || { fail "$1 is $2, expected $3"; return 1; }
}

# The image compose built is docker/Dockerfile's, every line of it: the binary the host
# built (through the build stage's COPY and install lines), the init script, the ENV,
# STOPSIGNAL, HEALTHCHECK, ENTRYPOINT and CMD lines (no USER: root, as the official
# image), and the running container is that image with compose.yaml's settings.
test_image_is_the_products() {
    require_running || return 1
    local img=$PRODUCT_IMAGE var config
    # One inspect each (image, container), one exec: this check runs on every CI run.
    config="$(docker image inspect -f '{{json .Config.Entrypoint}} {{json .Config.Cmd}} {{json .Config.StopSignal}} {{json .Config.User}}
{{json .Config.Healthcheck}}
{{json .Config.Env}}' "$img")" || { fail "cannot inspect $img"; return 1; }
    expect "the image's ENTRYPOINT, CMD, STOPSIGNAL and USER" "$(sed -n 1p <<<"$config")" \
        '["pg-password-sync","run","--"] ["docker-entrypoint.sh","postgres"] "SIGINT" ""' || return 1
    expect "the image's HEALTHCHECK" "$(sed -n 2p <<<"$config")" \
        '{"Test":["CMD","pg-password-sync","health"],"Interval":10000000000,"Timeout":5000000000,"StartPeriod":60000000000,"Retries":3}' || return 1
    for var in KEYS_DIR=/app/keys APP_DB_USER=appuser APP_DB_RO_USER=backupuser POSTGRES_USER=postgres \
        PGHOST=/var/run/postgresql PGPORT=5432; do
        sed -n 3p <<<"$config" | grep -F "\"$var\"" >/dev/null || { fail "no ENV $var in the image"; return 1; }
    done
    # The container: this image, compose.yaml's stop signal and health check (probed every
    # second by the override).
    expect "the container's image, stop signal and health check" \
        "$(docker inspect -f '{{.Config.Image}} {{.Config.StopSignal}} {{json .Config.Healthcheck}}' "$DB")" \
        "$img SIGINT "'{"Test":["CMD","pg-password-sync","health"],"Interval":1000000000,"Timeout":5000000000,"StartPeriod":60000000000,"Retries":3}' || return 1
    # PID 1 is ENTRYPOINT + CMD, as root; the binary is the host's, byte for byte; the init
    # script is docker/initdb/zz-unset-password.sh (on stdin), without the exec bit.
    # shellcheck disable=SC2016 # expanded by the container's shell
    expect "PID 1, the binary and the init script" "$(docker exec -i "$DB" sh -c '
        tr "\0" " " </proc/1/cmdline; stat -c "uid %u" /proc/1
        sha256sum /usr/local/bin/pg-password-sync | cut -d" " -f1
        f=/docker-entrypoint-initdb.d/zz-unset-password.sh
        if cmp -s - "$f"; then echo "init script as in the repository, mode $(stat -c %a "$f")"; fi' \
        <"$REPO_ROOT/docker/initdb/zz-unset-password.sh")" \
        "pg-password-sync run -- docker-entrypoint.sh postgres uid 0
$(sha256sum "$BIN" | cut -d' ' -f1)
init script as in the repository, mode 644" || return 1
    log "  ENTRYPOINT, CMD, ENV, STOPSIGNAL, HEALTHCHECK, no USER, the host's binary, the init script"
}

test_initial_sync() {
    start_stack || { fail "compose up failed"; return 1; }
    start_refusal_probe
    wait_until 90000 sync_logged_or_dead
    wait "$CLIENT_STARTER" || { cat "$WORK/client.log" >&2; fail "the client container did not start"; return 1; }
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


# Newest modification time (ms) of the key files: each was written just before its rename.
keys_written_ms() {
    local f newest=0 t
    for f in "${ALL_KEY_FILES[@]}"; do
        t="$(stat -c %.3Y "$WORK/keys/$f")"
        t="${t/./}"
        ((t > newest)) && newest=$t
    done
    echo "$newest"
}
# rotate.sh has generated the files (it logs its wait for health next) or has exited.
rotate_generated() { grep -F 'waiting up to' "$WORK/rotate.log" >/dev/null || ! kill -0 "$1" 2>/dev/null; }

test_live_rotation() {
    require_running || return 1
    local before pid rc=0
    before="$(started_at)"
    cp "$WORK/client/current.pgpass" "$WORK/client/old.pgpass"
    # As the README says: `scripts/rotate.sh compose` (generate --force after a backup into
    # SECRETS_DIR, nothing else with the keys directory mount, then health and verify through
    # `compose exec`). It runs on; meanwhile the client measures when the new passwords work.
    PG_PASSWORD_SYNC_BIN="$BIN" "$REPO_ROOT/scripts/rotate.sh" compose --compose-file "$COMPOSE_FILE" \
        >"$WORK/rotate.log" 2>&1 &
    pid=$!
    wait_until 30000 rotate_generated "$pid" || { fail "rotate.sh generated nothing within 30 s"; return 1; }
    local renamed
    renamed="$(keys_written_ms)"
    remember_secrets
    write_passfile current.pgpass
    local ms total
    ms="$(logins_within current.pgpass "$ROTATE_DEADLINE_MS" "${ROLES[@]}")" ||
        { fail "new passwords not live within $ROTATE_DEADLINE_MS ms"; wait "$pid" || true; return 1; }
    # Measured on the host from the newest file's write, so `docker exec` start-up counts against us.
    total=$(($(now_ms) - renamed))
    ROTATE_MS=$total
    log "  every new password logs in ${total} ms after the rename (${ms} ms of polling in the client)"
    wait "$pid" || rc=$?
    # rotate.sh prints no secret: checked before its output is shown.
    if grep -F -f "$WORK/secrets.patterns" "$WORK/rotate.log" >/dev/null; then
        fail "a secret appears in the output of rotate.sh"
        return 1
    fi
    sed 's/^/    rotate.sh> /' "$WORK/rotate.log" >&2
    ((rc == 0)) || { fail "scripts/rotate.sh compose exited $rc"; return 1; }
    ((total <= ROTATE_DEADLINE_MS)) || { fail "new passwords took ${total} ms (limit $ROTATE_DEADLINE_MS)"; return 1; }
    login_refused old.pgpass appuser || { fail "the old appuser password still works"; return 1; }
    # The rest of `rotate.sh compose`: health reports the new files as synced, verify passes.
    grep -F '[rotate] healthy after' "$WORK/rotate.log" >/dev/null || { fail "rotate.sh did not see health ok"; return 1; }
    (($(grep -cF -- "$VERIFY_OK" "$WORK/rotate.log") == ${#ROLES[@]})) ||
        { fail "rotate.sh's verify did not pass for every role"; return 1; }
    wait_until 5000 health_exec_ok || { fail "health not ok within 5 s of the rotation: $(health_exec 2>&1)"; return 1; }
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


# stop_record SINCE : the engine's own record of the container's last stop after SINCE (a
# `date +%s.%N`): "MS SIGNAL EXIT", the milliseconds from the stop signal to PID 1's exit,
# the signal's number, the exit code.
stop_record() {
    local events action ns attr kill_ns="" signal="" die_ns="" code=""
    events="$(docker events --since "$1" --until "$(date +%s.%N)" --filter "container=$DB" \
        --filter event=kill --filter event=die \
        --format '{{.Action}} {{.TimeNano}} {{index .Actor.Attributes "signal"}}{{index .Actor.Attributes "exitCode"}}')"
    while read -r action ns attr; do
        case "$action" in
            kill) [[ -n "$kill_ns" ]] || { kill_ns=$ns signal=$attr; } ;;
            die) die_ns=$ns code=$attr ;;
        esac
    done <<<"$events"
    [[ -n "$kill_ns" && -n "$die_ns" ]] || return 1
    echo "$(((die_ns - kill_ns) / 1000000)) $signal $code"
}

test_clean_stop_and_restart() {
    require_running || return 1
    local since record stopped_ms signal code ready_before sync_before down_before clean_before
    ready_before="$(log_count 'database system is ready to accept connections')"
    sync_before="$(log_count 'Password synchronization complete.')"
    down_before="$(log_count 'database system is shut down')"
    clean_before="$(log_count 'database system was shut down at')"
    since="$(date +%s.%N)"
    # The stop signal is the container's (compose.yaml's stop_signal, the image's
    # STOPSIGNAL). docker stop's default timeout (10 s): a PID 1 that ignored the signal
    # would be SIGKILLed only after it (compose stop would wait stop_grace_period, 2 min).
    docker stop "$DB" >/dev/null || { fail "docker stop failed"; return 1; }
    record="$(stop_record "$since")" || { fail "no kill and die events for the stop"; return 1; }
    read -r stopped_ms signal code <<<"$record"
    STOP_MS=$stopped_ms
    log "  signal $signal, exit code $code ${stopped_ms} ms later"
    [[ "$signal" == 2 ]] || { fail "docker stop sent signal $signal, expected 2 (SIGINT)"; return 1; }
    [[ "$code" == 0 ]] || { fail "exit code $code after docker stop (expected 0)"; return 1; }
    ((stopped_ms < STOP_DEADLINE_MS)) || { fail "the stop took ${stopped_ms} ms (limit $STOP_DEADLINE_MS)"; return 1; }
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
    # Another uid's (or a non-dumpable process's) environ needs CAP_SYS_PTRACE (added to the
    # container by the override file); without it the scan would silently read nothing.
    # Prove it can read PID 1's and the postmaster's before trusting it.
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
    # Nor in what the test's own tools printed: generate, compose, rotate.sh.
    local leaked
    leaked="$(grep -lF -f "$WORK/secrets.patterns" "$WORK"/*.log 2>/dev/null || true)"
    [[ -z "$leaked" ]] || { fail "a secret appears in $(tr '\n' ' ' <<<"$leaked")"; return 1; }
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

# The official 18+ image refuses to initialise beside a volume mounted the pre-18 way
# (the product image run by itself, without compose: its ENTRYPOINT, CMD and ENV). Started
# in the background beside the stack's first start (start_refusal_probe); the check reads
# what it left in $WORK/refusal.*.
run_refusal_probe() {
    local vol="$PREFIX-old" code=0
    docker volume create --label "$LABEL" "$vol" >/dev/null
    timeout 120 docker run --rm --label "$LABEL" --name "$PREFIX-old" \
        -v "$vol:/var/lib/postgresql/data" \
        -v "$WORK/keys:/app/keys:ro" \
        -e POSTGRES_PASSWORD_FILE=/app/keys/postgres_password.txt \
        "$PRODUCT_IMAGE" >"$WORK/refusal.out" 2>&1 || code=$?
    echo "$code" >"$WORK/refusal.code"
    docker run --rm --label "$LABEL" --entrypoint find -v "$vol:/check" "$PRODUCT_IMAGE" \
        /check -name PG_VERSION >"$WORK/refusal.found" 2>&1
}
start_refusal_probe() {
    ((PG_MAJOR >= 18)) || return 0
    run_refusal_probe &
    REFUSAL_PROBE=$!
}

test_refuses_old_mount() {
    local code found
    if [[ -z "$REFUSAL_PROBE" ]] || ! wait "$REFUSAL_PROBE"; then
        printf '[e2e-docker]   FAIL: the probe did not run to its end\n' >&2
        return 1
    fi
    code="$(<"$WORK/refusal.code")"
    grep -F 'docker-entrypoint' "$WORK/refusal.out" | sed 's/^/    | /' >&2
    ((code == 1)) || { printf '[e2e-docker]   FAIL: exit %s (expected 1)\n' "$code" >&2; return 1; }
    grep -F "/var/lib/postgresql/data (a mount that PostgreSQL $PG_MAJOR does not use)" "$WORK/refusal.out" >/dev/null ||
        { printf '[e2e-docker]   FAIL: no refusal naming the /var/lib/postgresql/data mount\n' >&2; return 1; }
    found="$(<"$WORK/refusal.found")"
    [[ -z "$found" ]] || { printf '[e2e-docker]   FAIL: a cluster was initialised anyway: %s\n' "$found" >&2; return 1; }
    log "  refused with exit 1, nothing initialised"
}

# compose.yaml publishes the server on the host's loopback only. From the host, through
# that port, verify logs every role in with a wrong password refused first: connections
# there arrive from outside the container, where the image's pg_hba.conf asks for passwords.
test_published_port() {
    require_running || return 1
    local published out
    published="$(docker port "$DB" 5432/tcp | head -n 1)"
    [[ "$published" =~ ^127\.0\.0\.1:([0-9]+)$ ]] || { fail "5432 is published at '$published', expected 127.0.0.1:PORT"; return 1; }
    out="$(env -u PGHOST -u PGPORT -u PGDATABASE "$BIN" verify --host 127.0.0.1 --pgport "${BASH_REMATCH[1]}" \
        --keys-dir "$WORK/keys" --secrets-source-dir "$WORK/keys" \
        --postgres-password-file "$WORK/keys/postgres_password.txt" --temporal-db-user temporaluser 2>&1)" ||
        { fail "verify from the host through $published failed: $out"; return 1; }
    printf '%s\n' "$out" | sed 's/^/    verify host> /' >&2
    (($(count_lines "$out" "$VERIFY_OK") == ${#ROLES[@]})) ||
        { fail "verify from the host did not check every role"; return 1; }
    log "  published at $published only; every role verified from the host"
}

# `compose down -v` takes the stack down: postgres stops cleanly (SIGINT, exit code 0), and
# no container, network or volume of the project is left.
test_compose_down() {
    require_running || return 1
    local since left record stopped_ms signal code
    # The client joined the project's network from outside compose: it goes first.
    docker rm -f -v "$CLIENT" >/dev/null 2>&1 || true
    since="$(date +%s.%N)"
    compose down -v >"$WORK/down.log" 2>&1 || { cat "$WORK/down.log" >&2; fail "compose down failed"; return 1; }
    STACK_DOWN=1
    record="$(stop_record "$since")" || { fail "no kill and die events for compose down"; return 1; }
    read -r stopped_ms signal code <<<"$record"
    [[ "$signal" == 2 && "$code" == 0 ]] ||
        { printf '[e2e-docker]   FAIL: compose down: signal %s, exit code %s (expected 2, 0)\n' "$signal" "$code" >&2; return 1; }
    left="$(docker ps -aq --filter "label=com.docker.compose.project=$PREFIX")$(
        docker network ls -q --filter "label=com.docker.compose.project=$PREFIX")$(
        docker volume ls -q --filter "label=com.docker.compose.project=$PREFIX")"
    [[ -z "$left" ]] || { printf '[e2e-docker]   FAIL: compose down left %s\n' "$left" >&2; return 1; }
    log "  signal $signal, exit code $code ${stopped_ms} ms later; container, network and volume removed"
}

main() {
    local base_only=0 script_started=$SECONDS
    while (($# > 0)); do
        case "$1" in
            --base-only) base_only=1 ;;
            -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
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
    ensure_toolbox_image
    ((base_only == 0)) || exit 0

    ensure_compose
    trap cleanup EXIT
    WORK="$(mktemp -d /tmp/pg-password-sync-e2e.XXXXXX)"
    chmod 0700 "$WORK"
    build_standin_postgres &
    POSTGRES_BUILD=$!
    build_binary
    wait "$POSTGRES_BUILD" || die "the stand-in $STANDIN_POSTGRES was not built"
    setup
    build_images

    run_test "initial sync with compose up, every role logs in" test_initial_sync
    run_test "the image and container are docker/Dockerfile's and compose.yaml's" test_image_is_the_products
    # After the first start (initdb) and again after a restart on the same volume: the
    # entrypoint exports the superuser password on both paths.
    run_test "no secret in argv or environment after the first start" test_no_secret_leaks
    run_test "second sync unchanged, verify passes" test_sync_unchanged_and_verify
    run_test "PostgreSQL $PG_MAJOR layout: PGDATA $PGDATA_IN_IMAGE, volume at $DATA_VOLUME" test_data_layout
    run_test "official pg_hba.conf: verify refuses trusted loopback, checks the container's address" \
        test_verify_not_fooled_by_trust
    run_test "published on 127.0.0.1 only, passwords checked through it" test_published_port
    run_test "healthy, no zombies" test_healthy_no_zombies
    run_test "live rotation with scripts/rotate.sh compose, without restart" test_live_rotation
    run_test "SIGHUP reloads postgres" test_sighup_reload
    run_test "docker stop is clean (SIGINT), restart without recovery" test_clean_stop_and_restart
    run_test "no secret in argv, environment or log after the restart" test_no_secret_leaks
    if ((PG_MAJOR >= 18)); then
        run_test "a volume at /var/lib/postgresql/data is refused (18+)" test_refuses_old_mount
    fi
    run_test "compose down -v stops cleanly and removes the stack" test_compose_down

    local name
    for name in "${FAILED[@]}"; do
        log "failed: $name"
    done
    echo "e2e-docker: ${#PASSED[@]} passed, ${#FAILED[@]} failed in $((SECONDS - script_started)) s (docker/Dockerfile + docker/compose.yaml, layout of PostgreSQL $PG_MAJOR, server 15; rotation live ${ROTATE_MS:-?} ms after the rename, stop ${STOP_MS:-?} ms from SIGINT to exit)"
    ((${#FAILED[@]} == 0))
}

main "$@"
