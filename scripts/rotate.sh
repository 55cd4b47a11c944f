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

Options:
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

main() {
    parse_args "$@"
    case "$MODE" in
        compose) rotate_compose ;;
        k8s) rotate_k8s ;;
    esac
}

main "$@"
