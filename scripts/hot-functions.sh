#!/usr/bin/env bash
# Regenerates build/hot-functions.txt: the functions PID 1 runs, which build/hot-first-link
# packs together at the start of .text so that only they become resident (bench/README.md,
# "RSS"). Run it (as root) after a change to what `run` executes or a dependency update,
# then `scripts/bench.sh` to see the effect; commit the list.
#
#   scripts/hot-functions.sh
#
# What it does, on a throwaway cluster: builds the release binary (scripts/build-release.sh),
# and runs its unstripped twin as PID 1 of a new PID namespace through start → first sync →
# a Kubernetes `..data` rotation → SIGHUP resync → SIGINT stop:
#  1. once under valgrind's cachegrind, which names every function executed; the binary is
#     relinked with just those packed first;
#  2. five times natively, from a filesystem with read-ahead off (a loop device), so that
#     the pages of the binary resident afterwards are exactly the pages touched: this
#     catches what the emulated CPU of (1) does not run (SHA-NI and AVX2 variants chosen at
#     run time) and paths taken only sometimes (lock contention). Every function on a
#     touched page outside the packed block is added;
#  3. the binary is relinked with the final list.
# The list keeps demangled names without per-build hashes, so it survives toolchain and
# dependency updates (names that disappear are simply skipped at link time).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/hot-functions.sh runs as root (PID namespaces, a loop device, postgres as the postgres user)" >&2
  exit 1
fi
ensure_postgres
ensure_commands valgrind:valgrind nm:binutils losetup:mount mkfs.ext4:e2fsprogs

REPO=$PWD
step "building the release binary (scripts/build-release.sh)"
scripts/build-release.sh --quiet >/dev/null
# The same build before stripping: the code that ships, with its symbols.
BIN=${CARGO_TARGET_DIR:-$REPO/target}/$(rustc -vV | sed -n 's/^host: //p')/release/pg-password-sync

WORK=$(mktemp -d /tmp/pps-hot-XXXXXX)
chmod 755 "$WORK"
chown postgres:postgres "$WORK"
LOOPDEV=
cleanup() {
  local rc=$? f pid
  trap - EXIT INT TERM
  for f in /proc/[0-9]*/cmdline; do
    pid=${f#/proc/} pid=${pid%/cmdline}
    if [ "$pid" != $$ ] && grep -qsF -- "$WORK" "$f"; then kill -KILL "$pid" 2>/dev/null || true; fi
  done
  if [ -n "$LOOPDEV" ]; then
    umount "$WORK/ra0" 2>/dev/null || true
    losetup -d "$LOOPDEV" 2>/dev/null || true
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "preparing a cluster and Kubernetes-style secrets in $WORK"
as_pg "$PG_BINDIR/initdb" -U postgres -A trust --no-sync -D "$WORK/template" >/dev/null
printf 'local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n' >"$WORK/template/pg_hba.conf"
mkdir "$WORK/sock" && chown postgres:postgres "$WORK/sock"
PORT=$(free_port)
as_pg "$PG_BINDIR/pg_ctl" -D "$WORK/template" -l "$WORK/template.log" -t 60 -w \
  -o "-p $PORT -k $WORK/sock -c listen_addresses=''" start >/dev/null
psql -X -q -v ON_ERROR_STOP=1 -h "$WORK/sock" -p "$PORT" -U postgres -d postgres \
  -c 'CREATE ROLE appuser LOGIN' -c 'CREATE ROLE backupuser LOGIN' -c 'CREATE ROLE temporaluser LOGIN'
as_pg "$PG_BINDIR/pg_ctl" -D "$WORK/template" -m fast -t 60 -w stop >/dev/null
NAMES="postgres_password.txt postgres_app_user_pw.txt postgres_app_ro_pw.txt postgres_temporal_pw.txt"
# new_secrets KEYS: a fresh ..<ts> directory of random (throwaway) passwords, swapped in.
new_secrets() {
  local keys=$1 ts name
  ts=..$(date +%s%N)
  mkdir -p "$keys/$ts"
  for name in $NAMES; do
    python3 -c 'import secrets; print("hot-" + secrets.token_urlsafe(24))' >"$keys/$ts/$name"
    [ -L "$keys/$name" ] || ln -s "..data/$name" "$keys/$name"
  done
  chmod -R a+rX "$keys/$ts"
  ln -s "$ts" "$keys/..data.tmp" && mv -T "$keys/..data.tmp" "$keys/..data"
}
# wait_log FILE TEXT COUNT: until TEXT appears COUNT times in FILE (60 s at most).
wait_log() {
  local i
  for i in $(seq 1 6000); do
    [ "$(grep -cF -- "$2" "$1" 2>/dev/null)" -ge "$3" ] && return 0
    sleep 0.01
  done
  echo "timed out waiting for '$2' in $1:" >&2
  tail -n 20 "$1" >&2
  return 1
}
# scenario NAME PROBE PREFIX…: PID 1 = PREFIX… BIN run; start, sync, rotate, SIGHUP, then
# PROBE (a command given PID 1's pid) and SIGINT.
scenario() {
  local name=$1 probe=$2 dir=$WORK/$1 unshare_pid pid1
  shift 2
  mkdir -p "$dir/state" "$dir/keys"
  cp -a "$WORK/template" "$dir/data"
  new_secrets "$dir/keys"
  KEYS_DIR=$dir/keys SECRETS_SOURCE_DIR=$dir/none PGHOST=$WORK/sock PGPORT=$PORT PGDATA=$dir/data \
    TEMPORAL_DB_USER=temporaluser PG_PASSWORD_SYNC_STATE_DIR=$dir/state \
    unshare --pid --fork --mount-proc --kill-child "$@" run -- \
    setpriv --reuid=postgres --regid=postgres --init-groups -- "$PG_BINDIR/postgres" \
    -D "$dir/data" -p "$PORT" -k "$WORK/sock" -c listen_addresses=127.0.0.1 >"$dir/pid1.log" 2>&1 &
  unshare_pid=$!
  wait_log "$dir/pid1.log" "Password synchronization complete." 1
  new_secrets "$dir/keys"
  wait_log "$dir/pid1.log" "passwords rotated" 1
  pid1=$(pgrep -P "$unshare_pid" | head -n 1)
  # A SIGHUP resync that finds every password in force logs nothing at info level; its
  # outcome is written to the state file, so wait for that to change.
  local state before
  state=$(find "$dir/state" -type f | head -n 1)
  before=$(md5sum <"$state")
  kill -HUP "$pid1"
  wait_log "$dir/pid1.log" "SIGHUP: forwarding and re-syncing" 1
  for _ in $(seq 1 6000); do
    [ "$(md5sum <"$state")" != "$before" ] && break
    sleep 0.01
  done
  if [ "$(md5sum <"$state")" = "$before" ]; then
    echo "$name: the SIGHUP resync never recorded its outcome in $state" >&2
    return 1
  fi
  "$probe" "$pid1"
  kill -INT "$pid1"
  wait "$unshare_pid" || { echo "$name: PID 1 exited with status $?" >&2; tail -n 20 "$dir/pid1.log" >&2; return 1; }
}
noop() { :; }

OUT=build/hot-functions.txt
HOST=$(rustc -vV | sed -n 's/^host: //p')
# write_list NAMES…: the list from mangled names (demangled, without per-build hashes).
write_list() {
  {
    echo "# Functions PID 1 executes, packed first in .text by build/hot-first-link."
    echo "# Generated by scripts/hot-functions.sh ($(rustc --version | cut -d' ' -f1-2)); do not edit."
    # Local labels (constant pools, exception tables) are not functions.
    sort -u "$@" | grep -v -e '^\.L' -e '^GCC_except_table' | c++filt |
      sed -E 's/::h[0-9a-f]{16}$//; s/\[[0-9a-f]+\]//g' | sort -u
  } >"$OUT.tmp"
  mv "$OUT.tmp" "$OUT"
}
# relink: the release build again with the list just written (build.rs tells cargo).
relink() {
  scripts/build-release.sh --quiet >/dev/null
}

step "1/3: cachegrind names the functions executed"
scenario cachegrind noop valgrind --tool=cachegrind --cache-sim=no --demangle=no \
  --cachegrind-out-file="$WORK/cachegrind.out" "$BIN"
sed -n 's/^fn=//p' "$WORK/cachegrind.out" | grep -v -e '^???$' -e '^(below main)$' | sort -u >"$WORK/executed"
# Starting over from what is executed keeps the list from growing with each regeneration.
write_list "$WORK/executed"
relink

step "2/3: native runs from a loop device without read-ahead: the pages actually touched"
truncate -s 64M "$WORK/ra0.img"
mkfs.ext4 -q "$WORK/ra0.img"
LOOPDEV=$(losetup --find --show "$WORK/ra0.img")
blockdev --setra 0 "$LOOPDEV"
mkdir "$WORK/ra0"
mount "$LOOPDEV" "$WORK/ra0"
cp "$BIN" "$WORK/ra0/pg-password-sync"
touched_pages() {
  python3 - "$1" "$WORK/ra0/pg-password-sync" >>"$WORK/touched" <<'PY'
import struct, sys
pid, path = int(sys.argv[1]), sys.argv[2]
with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb") as pagemap:
    for line in maps:
        fields = line.split()
        if len(fields) < 6 or fields[5] != path or "x" not in fields[1]:
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        offset = int(fields[2], 16)
        for va in range(start, end, 4096):
            pagemap.seek(va // 4096 * 8)
            if struct.unpack("<Q", pagemap.read(8))[0] >> 63:
                print(offset + va - start)  # file offset of a resident page
PY
}
# Several runs: lock contention and timer races take different paths from run to run
# (glibc's futex wait functions, say), and each of those alone would cost a 64 KiB window.
: >"$WORK/touched"
for i in 1 2 3 4 5; do
  # A fresh mount: none of the binary is in the page cache, so nothing can be mapped in
  # "around" a fault; what is resident at the end was touched.
  umount "$WORK/ra0"
  mount "$LOOPDEV" "$WORK/ra0"
  scenario "native-$i" touched_pages "$WORK/ra0/pg-password-sync"
done
sort -un "$WORK/touched" -o "$WORK/touched"

# Every function on a touched page outside the packed block: what the native runs execute
# that cachegrind did not see (with its page neighbours: which one ran is not known).
# The ordering file the wrapper wrote for that link (the newest one).
ORDER=$(find "${CARGO_TARGET_DIR:-$REPO/target}/$HOST/release/deps" -name 'pg_password_sync-*.symbol-order' \
  -printf '%T@ %p\n' | sort -n | tail -n 1 | cut -d' ' -f2-)
python3 - "$BIN" "$ORDER" "$WORK/touched" >"$WORK/on-touched-pages" <<'PY'
import bisect, subprocess, sys
binary, order_file, touched_file = sys.argv[1:4]
packed = set(open(order_file).read().split())
# Text symbols with addresses and sizes; file offset = address - (segment vaddr - offset).
syms = []
for line in subprocess.run(["nm", "--defined-only", "-S", binary], capture_output=True,
                           text=True, check=True).stdout.splitlines():
    f = line.split()
    if len(f) == 4 and f[2] in "tTwWiI":
        syms.append((int(f[0], 16), int(f[1], 16), f[3]))
syms.sort()
starts = [s[0] for s in syms]
block = [s for s in syms if s[2] in packed]
lo, hi = min(s[0] for s in block), max(s[0] + s[1] for s in block)
delta = None
for line in subprocess.run(["readelf", "-lW", binary], capture_output=True, text=True,
                           check=True).stdout.splitlines():
    f = line.split()
    if f and f[0] == "LOAD" and "E" in f[6:-1]:
        delta = int(f[2], 16) - int(f[1], 16)
longest = max(s[1] for s in syms)
for offset in map(int, open(touched_file).read().split()):
    page = offset + delta
    if lo <= page < hi:
        continue
    # Symbols starting before the page's end that may reach into it.
    i = bisect.bisect_left(starts, page - longest)
    while i < len(syms) and syms[i][0] < page + 4096:
        start, size, name = syms[i]
        if page < start + size:
            print(name)
        i += 1
PY

step "3/3: the list (executed, plus what ran natively outside the block), linked in"
write_list "$WORK/executed" "$WORK/on-touched-pages"
relink
step "wrote $OUT: $(grep -vc '^#' "$OUT") names ($(wc -l <"$WORK/executed") functions executed under cachegrind, $(sort -u "$WORK/on-touched-pages" | wc -l) more found natively); scripts/build-release.sh now links with it"
