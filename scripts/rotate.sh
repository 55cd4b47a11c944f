#!/usr/bin/env bash
# Rotates the PostgreSQL secrets without a redeploy: new files, live re-sync, verify.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT

usage() {
    cat <<USAGE
Usage: scripts/rotate.sh compose|k8s [OPTIONS]

Rotate the database secrets with no redeploy and no restart. pg-password-sync (PID 1 of
the postgres container, or its sidecar) sees the new files and re-syncs the role
passwords live; this script then waits until it reports healthy and runs verify.

  compose  1. pg-password-sync generate --dir DIR --force        (backs up first)
           2. nothing else with the keys *directory* mount of docker/compose.yaml;
              with per-file 'secrets:' mounts pass --recreate, which runs
              'docker compose up -d --force-recreate SERVICE' (a restart)
           3. docker compose exec SERVICE pg-password-sync health   (until healthy)
           4. docker compose exec SERVICE pg-password-sync verify [--host H]
  k8s      1. pg-password-sync generate --dir DIR --force --k8s-secret SECRET
              --namespace NS | kubectl apply -f -
           2. wait until the kubelet has swapped the mounted Secret directory (can
              take a minute or more: the kubelet's sync period plus its cache TTL)
           3. kubectl exec POD -c CONTAINER -- pg-password-sync health (until healthy)
           4. kubectl exec POD -c CONTAINER -- pg-password-sync verify [--host H]

verify counts a login only where the server refuses a wrong password first. Inside the
official image pg_hba.conf trusts 127.0.0.1 and ::1, so verify logs in over the
container's (pod's) own address instead, which the image's 'host all all all
scram-sha-256' line checks; if no checked address is found it fails (exit 7) rather
than pass on a trusted connection. --verify-host names the address to use.

Overlap mode (--overlap; the sync runs with --overlap / PG_PASSWORD_SYNC_OVERLAP=true and
the set was made by 'generate --overlap'): no login fails during the rotation. Each role's
unpublished login gets a new password; it is published in pg_service.conf only once the
server accepts it (docs/overlap.md).

  compose --overlap
           1. pg-password-sync rotate --dir DIR --pghost PG_HOST --pgport PG_PORT --wait TIMEOUT
              (on this host, through the port compose.yaml publishes: refuses while a
              login to re-key is in its grace period; stages, waits until the staged
              logins work, publishes; rolls back on timeout)
           2. docker compose exec SERVICE pg-password-sync verify --overlap
  k8s --overlap
           1. pg-password-sync rotate --dir DIR --stage-only   (grace check through
              --pg-port, else a 'kubectl port-forward' to the pod; backup; stage)
           2. generate --overlap --k8s-secret … | kubectl apply -f -; wait for the swap
           3. kubectl exec … pg-password-sync verify --overlap --staged   (until it passes;
              on timeout: rotate --abort, apply the restored set, fail)
           4. pg-password-sync rotate --dir DIR --publish-only; apply; wait for the swap
           5. kubectl exec … pg-password-sync verify --overlap

Options:
  --overlap           overlap mode (above); also PG_PASSWORD_SYNC_OVERLAP=true
  --pg-host HOST      overlap: server address for the host-side checks (default 127.0.0.1)
  --pg-port PORT      overlap: its port (compose default: \$POSTGRES_HOST_PORT, the port
                      compose.yaml publishes, else 5432; k8s default: a
                      'kubectl port-forward' to POD on local port 15432)
  --dir DIR           secrets directory for 'generate --dir'; the files are in DIR/keys
                      (default: \$SECRETS_DIR or \$PG_PASSWORD_SYNC_SECRETS_DIR, else
                      infra/secrets in the repository)
  --no-backup         do not back up the current files before overwriting them
  --timeout SECONDS   how long to wait for healthy (default: 60 compose, 300 k8s)
  --bin PATH          pg-password-sync on this host (default: \$PG_PASSWORD_SYNC_BIN,
                      else pg-password-sync from PATH)
  --verify-host H     address verify logs in at, as seen from inside the container
                      (default: found by verify: the container's own address)
 compose:
  --compose-file F    default: docker/compose.yaml in the repository
  --service NAME      compose service (default: postgres)
  --recreate          recreate the container after generating (per-file secret mounts)
 k8s:
  -n, --namespace NS  default: api-forge-prod
  --secret NAME       Secret name (default: postgres-secrets)
  --pod NAME          pod to check (default: postgres-0)
  --container NAME    container running pg-password-sync (default: postgres; use
                      pg-password-sync for the sidecar variant)
  -h, --help          this text

No secret value is printed or passed on a command line.
USAGE
}

log() { printf '[rotate] %s\n' "$*" >&2; }
die() {
    printf '[rotate] ERROR: %s\n' "$*" >&2
    exit 1
}

MODE=""
SECRETS_DIR="${SECRETS_DIR:-${PG_PASSWORD_SYNC_SECRETS_DIR:-$REPO_ROOT/infra/secrets}}"
BACKUP=1
TIMEOUT=""
BIN="${PG_PASSWORD_SYNC_BIN:-pg-password-sync}"
COMPOSE_FILE="$REPO_ROOT/docker/compose.yaml"
SERVICE=postgres
RECREATE=0
NAMESPACE=api-forge-prod
SECRET=postgres-secrets
POD=postgres-0
CONTAINER=postgres
VERIFY_HOST=""
case "${PG_PASSWORD_SYNC_OVERLAP:-}" in
    1 | true | yes | on) OVERLAP=1 ;;
    *) OVERLAP=0 ;;
esac
PG_HOST=127.0.0.1
PG_PORT=""
PORT_FORWARD_PID=""

# Value of an option that takes one: "$1" is the option, "$2" its value.
need_value() {
    [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (try --help)"
}

parse_args() {
    while (($# > 0)); do
        case "$1" in
            compose | k8s)
                [[ -z "$MODE" ]] || die "only one of compose|k8s"
                MODE="$1"
                ;;
            --dir) need_value "$@"; SECRETS_DIR="$2"; shift ;;
            --overlap) OVERLAP=1 ;;
            --pg-host) need_value "$@"; PG_HOST="$2"; shift ;;
            --pg-port) need_value "$@"; PG_PORT="$2"; shift ;;
            --no-backup) BACKUP=0 ;;
            --backup) BACKUP=1 ;;
            --timeout) need_value "$@"; TIMEOUT="$2"; shift ;;
            --bin) need_value "$@"; BIN="$2"; shift ;;
            --verify-host) need_value "$@"; VERIFY_HOST="$2"; shift ;;
            --compose-file) need_value "$@"; COMPOSE_FILE="$2"; shift ;;
            --service) need_value "$@"; SERVICE="$2"; shift ;;
            --recreate) RECREATE=1 ;;
            -n | --namespace) need_value "$@"; NAMESPACE="$2"; shift ;;
            --secret) need_value "$@"; SECRET="$2"; shift ;;
            --pod) need_value "$@"; POD="$2"; shift ;;
            --container) need_value "$@"; CONTAINER="$2"; shift ;;
            -h | --help) usage; exit 0 ;;
            *) die "unknown argument: $1 (try --help)" ;;
        esac
        shift
    done
    [[ -n "$MODE" ]] || { usage >&2; exit 2; }
    if [[ -z "$TIMEOUT" ]]; then
        if [[ "$MODE" == compose ]]; then TIMEOUT=60; else TIMEOUT=300; fi
    fi
    [[ "$TIMEOUT" =~ ^[0-9]+$ ]] || die "--timeout needs a number of seconds"
    [[ -z "$PG_PORT" || "$PG_PORT" =~ ^[0-9]+$ ]] || die "--pg-port needs a port number"
    command -v "$BIN" >/dev/null 2>&1 || die "pg-password-sync not found ('$BIN'); use --bin or PG_PASSWORD_SYNC_BIN"
    mkdir -p "$SECRETS_DIR"
    SECRETS_DIR="$(cd "$SECRETS_DIR" && pwd)"
}

# verify's arguments: an explicit address, or none (verify finds a checked one).
verify_args() {
    VERIFY=(pg-password-sync verify)
    [[ -z "$VERIFY_HOST" ]] || VERIFY+=(--host "$VERIFY_HOST")
}

generate_args() {
    GEN=("$BIN" generate --dir "$SECRETS_DIR" --force)
    ((BACKUP)) || GEN+=(--no-backup)
}

# Runs "$@" until it succeeds or TIMEOUT seconds pass (polled once a second).
poll() {
    local what=$1
    shift
    local deadline=$((SECONDS + TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 1
    done
    log "$what after $((TIMEOUT - (deadline - SECONDS))) s"
}

# --- compose -------------------------------------------------------------------------

compose() {
    if docker compose version >/dev/null 2>&1; then
        docker compose -f "$COMPOSE_FILE" "$@"
    elif command -v docker-compose >/dev/null 2>&1; then
        docker-compose -f "$COMPOSE_FILE" "$@"
    else
        die "neither 'docker compose' nor 'docker-compose' is available"
    fi
}

rotate_compose() {
    [[ -f "$COMPOSE_FILE" ]] || die "compose file not found: $COMPOSE_FILE"
    export SECRETS_DIR # interpolated by compose.yaml (only matters with --recreate)
    generate_args
    log "generating new secrets in $SECRETS_DIR/keys$( ((BACKUP)) && echo ' (after a backup)')"
    "${GEN[@]}"
    if ((RECREATE)); then
        log "recreating $SERVICE (per-file secret mounts only see new files in a new container)"
        compose up -d --force-recreate "$SERVICE"
    fi
    log "waiting up to ${TIMEOUT} s for $SERVICE to report healthy with the new secrets"
    poll "healthy" compose exec -T "$SERVICE" pg-password-sync health ||
        die "$SERVICE not healthy after ${TIMEOUT} s; see: $(compose_logs_hint)"
    log "verifying every login role (over an address where the password is checked)"
    verify_args
    compose exec -T "$SERVICE" "${VERIFY[@]}" || die "verify failed (exit 7 with 'not verifiable': pass --verify-host)"
    log "rotation complete"
}

compose_logs_hint() { echo "docker compose -f $COMPOSE_FILE logs --tail 50 $SERVICE"; }

# --- k8s -----------------------------------------------------------------------------

kexec() { kubectl exec -n "$NAMESPACE" "$POD" -c "$CONTAINER" -- "$@"; }

# The target of the mounted Secret's `..data` symlink: the kubelet points it at a new
# timestamped directory on every update, so a change means the pod sees the new files.
secret_generation() { kexec readlink /app/keys/..data; }
secret_generation_changed() { [[ "$(secret_generation 2>/dev/null)" != "$1" ]]; }

rotate_k8s() {
    command -v kubectl >/dev/null 2>&1 || die "kubectl not found"
    local before
    before="$(secret_generation)" ||
        die "cannot exec into $NAMESPACE/$POD (container $CONTAINER) to read /app/keys/..data"
    generate_args
    GEN+=(--k8s-secret "$SECRET" --namespace "$NAMESPACE")
    log "generating new secrets in $SECRETS_DIR/keys$( ((BACKUP)) && echo ' (after a backup)') and applying Secret $NAMESPACE/$SECRET"
    # The manifest goes straight from the generator to kubectl: never a file, never argv.
    "${GEN[@]}" | kubectl apply -f -
    log "waiting up to ${TIMEOUT} s for the kubelet to update the mounted Secret in $POD"
    poll "Secret volume updated" secret_generation_changed "$before" ||
        die "the Secret volume in $POD did not change within ${TIMEOUT} s (is it mounted with subPath?)"
    log "waiting up to ${TIMEOUT} s for $POD to report healthy with the new secrets"
    poll "healthy" kexec pg-password-sync health ||
        die "$POD not healthy after ${TIMEOUT} s; see: kubectl logs -n $NAMESPACE $POD -c $CONTAINER --tail 50"
    log "verifying every login role (over an address where the password is checked)"
    verify_args
    kexec "${VERIFY[@]}" || die "verify failed (exit 7 with 'not verifiable': pass --verify-host)"
    log "rotation complete (or run the Job: docker/k8s/verify-job.yaml)"
}

# --- overlap mode --------------------------------------------------------------------

rotate_args() {
    ROT=("$BIN" rotate --dir "$SECRETS_DIR" --pghost "$PG_HOST" --pgport "$PG_PORT")
}

rotate_compose_overlap() {
    [[ -f "$COMPOSE_FILE" ]] || die "compose file not found: $COMPOSE_FILE"
    # compose.yaml publishes 127.0.0.1:${POSTGRES_HOST_PORT:-5432}.
    [[ -n "$PG_PORT" ]] || PG_PORT="${POSTGRES_HOST_PORT:-5432}"
    [[ "$PG_PORT" != 0 ]] || die "POSTGRES_HOST_PORT=0 publishes a port Docker picks: give it with --pg-port (docker compose port $SERVICE 5432)"
    rotate_args
    # The keys directory mount shows the new files at once; rotate itself waits until the
    # server accepts every staged login (over the published port, where pg_hba.conf asks
    # for passwords) before it publishes, and rolls back on timeout.
    log "staged rotation of $SECRETS_DIR/keys through $PG_HOST:$PG_PORT (waits up to ${TIMEOUT} s)"
    "${ROT[@]}" --wait "${TIMEOUT}s" || die "rotate failed (nothing published; see above)"
    log "verifying the published logins inside $SERVICE"
    verify_args
    poll "verified" compose exec -T "$SERVICE" "${VERIFY[@]}" --overlap ||
        die "verify --overlap failed in $SERVICE"
    log "rotation complete; the previous logins expire after the sync's grace period"
}

stop_port_forward() {
    if [[ -n "$PORT_FORWARD_PID" ]]; then
        kill "$PORT_FORWARD_PID" 2>/dev/null || true
        wait "$PORT_FORWARD_PID" 2>/dev/null || true
        PORT_FORWARD_PID=""
    fi
}

# Reaches the server for rotate's grace check: --pg-port as given, else a port-forward to
# the pod. (A forwarded connection arrives from 127.0.0.1 in the pod, which the official
# image trusts: fine for reading pg_roles, and rotate never counts a login made there.)
start_port_forward() {
    [[ -z "$PG_PORT" ]] || return 0
    PG_PORT=15432
    PG_HOST=127.0.0.1
    kubectl port-forward -n "$NAMESPACE" "pod/$POD" "$PG_PORT:5432" >/dev/null 2>&1 &
    PORT_FORWARD_PID=$!
    trap stop_port_forward EXIT
    local deadline=$((SECONDS + 30))
    until (exec 3<>"/dev/tcp/127.0.0.1/$PG_PORT") 2>/dev/null; do
        ((SECONDS < deadline)) || die "kubectl port-forward to $POD did not come up"
        sleep 1
    done
}

# Applies the current DIR/keys as the Secret (values go from the generator to kubectl,
# never through a file or argv) and waits until the pod's volume has swapped.
apply_and_wait_swap() {
    local what=$1 before
    before="$(secret_generation)" || die "cannot read /app/keys/..data in $POD"
    # (generate's per-file report goes to stderr beside the manifest: keep only the news.)
    "$BIN" generate --dir "$SECRETS_DIR" --overlap --k8s-secret "$SECRET" --namespace "$NAMESPACE" \
        2> >(grep -v '^kept ' >&2) | kubectl apply -f -
    poll "$what reached $POD" secret_generation_changed "$before" ||
        return 1
}

rotate_k8s_overlap() {
    command -v kubectl >/dev/null 2>&1 || die "kubectl not found"
    start_port_forward
    rotate_args
    verify_args
    log "stage: checking grace periods, backing up and staging in $SECRETS_DIR/keys"
    "${ROT[@]}" --stage-only || die "rotate --stage-only failed (nothing staged)"
    if ! apply_and_wait_swap "the staged set" ||
        ! poll "staged logins verified" kexec "${VERIFY[@]}" --overlap --staged; then
        log "the staged logins did not verify within ${TIMEOUT} s: rolling back"
        "${ROT[@]}" --abort || die "rotate --abort failed: restore with 'generate --restore'"
        apply_and_wait_swap "the restored set" || log "the restored Secret has not reached $POD yet"
        die "rotation rolled back; the published credentials never changed"
    fi
    log "publish: rewriting pg_service.conf"
    "${ROT[@]}" --publish-only || die "rotate --publish-only failed"
    apply_and_wait_swap "the published set" || die "the published Secret did not reach $POD within ${TIMEOUT} s"
    poll "published logins verified" kexec "${VERIFY[@]}" --overlap ||
        die "verify --overlap failed in $POD after publishing"
    stop_port_forward
    log "rotation complete; the previous logins expire after the sync's grace period"
}

main() {
    parse_args "$@"
    case "$MODE:$OVERLAP" in
        compose:0) rotate_compose ;;
        k8s:0) rotate_k8s ;;
        compose:1) rotate_compose_overlap ;;
        k8s:1) rotate_k8s_overlap ;;
    esac
}

main "$@"
