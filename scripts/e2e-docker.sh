#!/usr/bin/env bash
# End-to-end container test of pg-password-sync against a real Docker engine.
#
# Needs no registry: the base image is a debootstrap'ed Debian root filesystem
# (postgresql-15 + gosu) imported with `docker import`, and the test image is built
# FROM it with the locally built binary and a stand-in for the official postgres
# image's docker-entrypoint.sh (docker/test/docker-entrypoint.sh).
#
# Usage: scripts/e2e-docker.sh [--base-only]
#   --base-only   only make sure the base image exists (build it when missing), then exit
#
# Environment:
#   PG_PASSWORD_SYNC_BIN   path of an already built binary (default: cargo build --release)
#   E2E_BASE_IMAGE         base image tag (default pg-password-sync-base:bookworm)
#   E2E_KEEP=1             keep containers, network, volume and temp dir for inspection
#
# Prints `SKIP: …` and exits 0 when no Docker engine answers. The last line is a summary
# such as `e2e-docker: 6 passed, 0 failed`.
set -euo pipefail

readonly BASE_IMAGE="${E2E_BASE_IMAGE:-pg-password-sync-base:bookworm}"
readonly SUITE="bookworm"
readonly BASE_PACKAGES="postgresql-15,gosu,procps"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT

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

# Builds $BASE_IMAGE with debootstrap unless it already exists.
ensure_base_image() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base image $BASE_IMAGE present, reusing it"
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || die "building the base image needs root (debootstrap)"
    if ! command -v debootstrap >/dev/null 2>&1; then
        log "installing debootstrap"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    fi
    local mirror
    mirror="$(debian_mirror)" || die "no Debian '$SUITE' archive found in apt's sources"
    local rootfs
    rootfs="$(mktemp -d /var/tmp/pg-password-sync-rootfs.XXXXXX)"
    log "debootstrap $SUITE ($BASE_PACKAGES) into $rootfs from apt's Debian mirror"
    local started=$SECONDS
    if ! debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$rootfs" "$mirror" \
        >"$rootfs.log" 2>&1; then
        tail -n 30 "$rootfs.log" >&2
        rm -rf "$rootfs"
        die "debootstrap failed (log above, full log in $rootfs.log)"
    fi
    # Keep the image small and free of host-specific state.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    log "debootstrap took $((SECONDS - started)) s ($(du -sh "$rootfs" | cut -f1)); importing"
    tar -C "$rootfs" -c . | docker import - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs" "$rootfs.log"
    log "base image $BASE_IMAGE built in $((SECONDS - started)) s"
}

main() {
    local base_only=0
    while (($# > 0)); do
        case "$1" in
            --base-only) base_only=1 ;;
            -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
            *) die "unknown argument: $1 (try --help)" ;;
        esac
        shift
    done
    if ! docker info >/dev/null 2>&1; then
        echo "SKIP: no Docker engine answers 'docker info'; container tests not run"
        exit 0
    fi
    ensure_base_image
    ((base_only == 0)) || exit 0
}

main "$@"
