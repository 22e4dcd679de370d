#!/usr/bin/env bash
# Host set-up for warmboot: idempotent, non-interactive, run as root by `make demo` and `make test`.
#  1. the Debian packages containers and image builds use (below)
#  2. a CRIU that passes `criu check` on this kernel (scripts/install-criu.sh)
#  3. the static container init (scripts/build-init.sh)
#  4. the Python virtualenv with warmboot and its dependencies (skipped when pyproject.toml is unchanged)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "warmboot set-up must run as root (CRIU needs CAP_SYS_ADMIN and friends); try: sudo make setup" >&2
  exit 1
fi

# Debian packages, installed (one apt run) only when a command is missing:
# - containers: slirp4netns gives them outbound network after the snapshot point; ip brings up their loopback;
# - image builds: mmdebstrap bootstraps debian_slim bases from Debian's packages; bubblewrap is the build sandbox;
# - OCI images: skopeo copies images between registries and the local OCI layout (Image.from_registry); zstd
#   unpacks zstd-compressed layers; the tests serve images from Debian's docker-registry (the CNCF distribution
#   server) on loopback. Its package would also start a registry on :5000 for every interface, so a registry
#   service installed here is stopped and disabled again: warmboot only runs its own, on loopback.
# - the W4 benchmark: wrk loads the HTTP gateway (a Python client would be the bottleneck, not the server);
# - the dashboard's tests drive Debian's Chromium, headless, through its chromedriver (Selenium).
need_apt=()
for pair in unshare:util-linux mount:mount slirp4netns:slirp4netns ip:iproute2 mmdebstrap:mmdebstrap \
  bwrap:bubblewrap skopeo:skopeo zstd:zstd docker-registry:docker-registry wrk:wrk chromium:chromium \
  chromedriver:chromium-driver; do
  command -v "${pair%%:*}" >/dev/null || need_apt+=("${pair#*:}")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[setup] installing ${need_apt[*]} from apt" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  if [[ " ${need_apt[*]} " == *" docker-registry "* ]] && command -v systemctl >/dev/null; then
    systemctl disable --now docker-registry >/dev/null 2>&1 || true
  fi
fi

# PostgreSQL's server, for the state tests that run on it (each starts a private cluster on a Unix socket:
# warmboot/devservices/postgres.py). Debian's package would also create and start a cluster of its own on
# localhost:5432; the createcluster setting stops that before it is installed (and only then).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "[setup] installing postgresql from apt (no cluster is created or started)" >&2
  mkdir -p /etc/postgresql-common
  [ -e /etc/postgresql-common/createcluster.conf ] || echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
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
