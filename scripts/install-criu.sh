#!/usr/bin/env bash
# Install a CRIU that works on this kernel, idempotently.
#
# Prefer the system's CRIU when `criu check` passes. Otherwise (Debian 12's CRIU 3.17 fails on 6.x kernels
# with "Unexpected rt vDSO area bounds"), unpack Debian 13's CRIU and its dependency closure into a private
# prefix and run it through the unpacked dynamic loader, because its glibc is newer than the host's.
# Prints nothing but progress; writes the wrapper to $WARMBOOT_CRIU_PREFIX/bin/criu.
set -euo pipefail

PREFIX=${WARMBOOT_CRIU_PREFIX:-/opt/warmboot/criu}
WRAPPER="$PREFIX/bin/criu"
SUITE=${WARMBOOT_CRIU_SUITE:-trixie}

log() { echo "[setup:criu] $*" >&2; }

if [ -x "$WRAPPER" ] && "$WRAPPER" check >/dev/null 2>&1; then
  log "private CRIU already installed: $("$WRAPPER" --version | head -n1)"
  exit 0
fi
if command -v criu >/dev/null 2>&1 && criu check >/dev/null 2>&1; then
  log "system CRIU passes 'criu check': $(criu --version | head -n1)"
  mkdir -p "$PREFIX/bin"
  ln -sf "$(command -v criu)" "$WRAPPER"
  exit 0
fi

log "fetching CRIU from Debian '$SUITE' into $PREFIX (the system's CRIU is missing or fails 'criu check')"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mirror=$(grep -rhoE 'https?://[^ ]*/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
  | head -n1 | tr -d ' ' || true)
mirror=${mirror:-http://deb.debian.org/debian}
mkdir -p "$work/lists/partial" "$work/archives/partial" "$work/etc"
echo "deb $mirror $SUITE main" >"$work/etc/sources.list"
: >"$work/status"
apt_opts=(
  -o "Dir::Etc::SourceList=$work/etc/sources.list"
  -o "Dir::Etc::SourceParts=$work/etc/none"
  -o "Dir::State::Lists=$work/lists"
  -o "Dir::State::status=$work/status"
  -o "Dir::Cache::archives=$work/archives"
  -o "APT::Get::AllowUnauthenticated=false"
  -o "Debug::NoLocking=1"
  -o "APT::Sandbox::User=root"
)
apt-get "${apt_opts[@]}" -qq update
apt-get "${apt_opts[@]}" -qq -y install --download-only --no-install-recommends criu >/dev/null

stage="$PREFIX.new"
rm -rf "$stage"
mkdir -p "$stage/bin"
for deb in "$work"/archives/*.deb; do
  dpkg -x "$deb" "$stage/root"
done
cat >"$stage/bin/criu" <<WRAP
#!/bin/sh
# Debian $SUITE's CRIU, started through its own loader and libraries (installed by warmboot's setup).
R="$PREFIX/root"
exec "\$R/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "\$R/usr/lib/x86_64-linux-gnu:\$R/lib/x86_64-linux-gnu" "\$R/usr/sbin/criu" "\$@"
WRAP
chmod 755 "$stage/bin/criu"
rm -rf "$PREFIX"
mv "$stage" "$PREFIX"
"$WRAPPER" check
log "installed $("$WRAPPER" --version | head -n1)"
