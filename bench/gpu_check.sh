#!/usr/bin/env bash
# Device check of GPU memory snapshots (issue 6): sets up, then runs bench/gpu_check.py under a time limit.
#
# Expects, in the repository root, the CRIU prefix copied to .criu/ (cp -a /opt/warmboot/criu .criu) and
# warmboot's missing Python dependencies as wheels in .whl/; both are ignored through .git/info/exclude and
# travel with the device tool's `carry`. Extra arguments go to gpu_check.py (e.g. --dry-run).
set -u
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
export OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"

PY=${GPU_CHECK_PYTHON:-/opt/torch/.venv/bin/python3}
[ -x "$PY" ] || PY=$(command -v python3)
SITE=${GPU_CHECK_SITE:-/tmp/site}
echo "== python: $PY ($("$PY" --version 2>&1))"

if ls .whl/*.whl >/dev/null 2>&1; then
    echo "== installing carried wheels into $SITE: $(cd .whl && ls *.whl | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
fi
export PYTHONPATH=$REPO:$SITE
export PYTHONUNBUFFERED=1

# CRIU: /opt/warmboot/criu/bin/criu hardcodes its tree at /opt/warmboot/criu/root, so write a wrapper of our
# own that runs the carried tree's binary through the carried tree's loader and libraries.
if [ -z "${WARMBOOT_CRIU:-}" ]; then
    if [ -d "$REPO/.criu/root" ]; then
        R=$REPO/.criu/root
        chmod +x "$R/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" "$R/usr/sbin/criu" 2>/dev/null
        WRAP=${GPU_CHECK_CRIU_WRAPPER:-/tmp/warmboot-criu}
        cat >"$WRAP" <<WRAPPER
#!/bin/sh
R="$R"
exec "\$R/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "\$R/usr/lib/x86_64-linux-gnu:\$R/lib/x86_64-linux-gnu" "\$R/usr/sbin/criu" "\$@"
WRAPPER
        chmod +x "$WRAP"
        export WARMBOOT_CRIU=$WRAP
    elif [ -x /opt/warmboot/criu/bin/criu ]; then
        export WARMBOOT_CRIU=/opt/warmboot/criu/bin/criu
    else
        echo "no CRIU: carry .criu (cp -a /opt/warmboot/criu .criu)"; exit 1
    fi
fi
echo "== CRIU: $WARMBOOT_CRIU ($("$WARMBOOT_CRIU" --version 2>&1 | head -1))"
command -v nvidia-smi >/dev/null && nvidia-smi -L

# The device machine has no network, so it cannot build images: its own root filesystem (with the torch install
# at $PY) is the containers' image, as one read-only overlay layer under the runtime layer. The other layers and
# the run dirs go to /dev/shm, another filesystem: overlayfs refuses a layer nested inside another one ('/').
WORK=/dev/shm/warmboot-gpu-check
timeout -k 10 200 "$PY" bench/gpu_check.py --layer / --python "$PY" --work "$WORK/check" --images "$WORK/images" "$@"
rc=$?
echo "== CPU memory snapshot of a GPU function (phases), through the worker"
timeout -k 10 100 "$PY" bench/gpu_phases_check.py --layer / --python "$PY" --work "$WORK" --images "$WORK/images" \
    2>&1 | tee "$OUT/gpu_phases.log"
rc2=${PIPESTATUS[0]}
echo "== gpu_phases_check.py exit status $rc2"
[ "$rc" = 0 ] && rc=$rc2
echo "== gpu_check.py exit status $rc (124: the 280 s limit)"
exit $rc
