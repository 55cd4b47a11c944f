#!/usr/bin/env bash
# Builds the binary we ship and benchmark: release profile, glibc linked statically
# (`crt-static`, still a position-independent executable, so ASLR stays), and the functions
# PID 1 runs packed together at the start of .text (build/hot-first-link). Both are about
# PID 1's resident memory: a dynamic build maps most of libc.so and ld.so as well, and
# scattered hot code makes the whole binary resident (bench/README.md, "RSS").
#
#   scripts/build-release.sh [cargo build options…]     e.g. --locked
#
# Prints the path of the stripped binary, target/dist/pg-password-sync (or under
# $CARGO_TARGET_DIR); the same binary with symbols is target/<host triple>/release/.
# Needs cargo, a C compiler with glibc's static libraries (libc6-dev), nm and c++filt
# (binutils). `crt-static` needs an explicit --target, so that build scripts and proc-macros
# (which run on the host) stay dynamic; the host triple is used.
set -euo pipefail
# A relative CARGO_TARGET_DIR means the caller's directory, and the path printed is absolute.
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
  CARGO_TARGET_DIR=$(realpath -m -- "$CARGO_TARGET_DIR")
  export CARGO_TARGET_DIR
fi
cd "$(dirname "$0")/.."
host=$(rustc -vV | sed -n 's/^host: //p')
case $host in
  *-linux-gnu*) ;;
  *) echo "scripts/build-release.sh: expects a *-linux-gnu host, not $host" >&2; exit 1 ;;
esac
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
# Linked with symbols and stripped afterwards: scripts/hot-functions.sh profiles the
# unstripped binary, which is then byte for byte the code that ships (cargo's own strip
# setting would make it a different build, with slightly different inlining).
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static -C linker=$PWD/build/hot-first-link" \
  CARGO_PROFILE_RELEASE_STRIP=false cargo build --release --target "$host" "$@" >&2
built=$target_dir/$host/release/pg-password-sync
mkdir -p "$target_dir/dist"
# Strip into a temp file and rename, so a running copy of the previous build is never
# overwritten in place.
tmp=$(mktemp "$target_dir/dist/.pg-password-sync.XXXXXX")
trap 'rm -f "$tmp"' EXIT
strip --strip-all -o "$tmp" "$built"
chmod 755 "$tmp"
mv -f "$tmp" "$target_dir/dist/pg-password-sync"
echo "$target_dir/dist/pg-password-sync"
