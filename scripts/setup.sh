#!/usr/bin/env bash
# Host set-up for warmboot: idempotent, non-interactive, run as root by `make demo` and `make test`.
#  1. a CRIU that passes `criu check` on this kernel (scripts/install-criu.sh)
#  2. the Python virtualenv with warmboot and its dependencies (skipped when pyproject.toml is unchanged)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "warmboot set-up must run as root (CRIU needs CAP_SYS_ADMIN and friends); try: sudo make setup" >&2
  exit 1
fi

need_apt=()
command -v unshare >/dev/null || need_apt+=(util-linux)
command -v mount >/dev/null || need_apt+=(mount)
# Containers: slirp4netns gives them outbound network after the snapshot point; ip brings up their loopback.
command -v slirp4netns >/dev/null || need_apt+=(slirp4netns)
command -v ip >/dev/null || need_apt+=(iproute2)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[setup] installing ${need_apt[*]} from apt" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# OCI images: skopeo copies images between registries and the local OCI layout (Image.from_registry); zstd
# unpacks zstd-compressed layers; the tests serve images from Debian's docker-registry (the CNCF distribution
# server) on loopback. Its package would also start a registry on :5000 for every interface, so a registry
# service this block installs is stopped and disabled again: warmboot only runs its own, on loopback.
need_oci=()
command -v skopeo >/dev/null || need_oci+=(skopeo)
command -v zstd >/dev/null || need_oci+=(zstd)
command -v docker-registry >/dev/null || need_oci+=(docker-registry)
if [ ${#need_oci[@]} -gt 0 ]; then
  echo "[setup] installing ${need_oci[*]} from apt (OCI images)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_oci[@]}" >/dev/null
  if [[ " ${need_oci[*]} " == *" docker-registry "* ]] && command -v systemctl >/dev/null; then
    systemctl disable --now docker-registry >/dev/null 2>&1 || true
  fi
fi

# Image builds: mmdebstrap bootstraps debian_slim bases from Debian's packages; bubblewrap is the build sandbox.
need_images=()
command -v mmdebstrap >/dev/null || need_images+=(mmdebstrap)
command -v bwrap >/dev/null || need_images+=(bubblewrap)
if [ ${#need_images[@]} -gt 0 ]; then
  echo "[setup] installing ${need_images[*]} from apt (image builds)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_images[@]}" >/dev/null
fi

bash scripts/install-criu.sh
bash scripts/build-init.sh  # the static PID 1 of function containers (warmboot/worker/sandbox/init.c)

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp_want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.setup-stamp" 2>/dev/null)" = "$stamp_want" ]; then
  echo "[setup] virtualenv $VENV is up to date" >&2
else
  echo "[setup] creating virtualenv $VENV and installing warmboot[dev]" >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]'
  echo "$stamp_want" >"$VENV/.setup-stamp"
fi
