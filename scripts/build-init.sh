#!/usr/bin/env bash
# Build the container init (warmboot/worker/sandbox/init.c) as a static binary, idempotently.
#
# Static, because it runs as PID 1 inside arbitrary images (busybox, alpine, distroless) that may have no libc
# or another one. Rebuilt only when init.c's sha256 differs from the stamp written next to the binary, so a
# second run costs one checksum. gcc and libc6-dev (for libc.a) come from apt only when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SRC=warmboot/worker/sandbox/init.c
OUT=${WARMBOOT_INIT:-/opt/warmboot/libexec/warmboot-init}
STAMP="$OUT.sha256"

log() { echo "[setup:init] $*" >&2; }

want=$(sha256sum "$SRC" | cut -d' ' -f1)
if [ -x "$OUT" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
  log "container init is up to date ($OUT)"
  exit 0
fi

need_apt=()
command -v gcc >/dev/null || need_apt+=(gcc)
libc_a=$(gcc -print-file-name=libc.a 2>/dev/null || true)
[ -f "$libc_a" ] || need_apt+=(libc6-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]} from apt"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

log "compiling $SRC -> $OUT"
mkdir -p "$(dirname "$OUT")"
tmp="$OUT.tmp.$$"
trap 'rm -f "$tmp"' EXIT
gcc -static -O2 -s -Wall -Wextra -Werror -o "$tmp" "$SRC"
chmod 0755 "$tmp"
mv -f "$tmp" "$OUT"  # atomic: a container starting now sees the old binary or the new one, never half of one
echo "$want" >"$STAMP"
