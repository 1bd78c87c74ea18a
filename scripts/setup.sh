#!/usr/bin/env bash
# One-time, idempotent set-up of everything the node, its demo and its tests need on a fresh machine:
# Debian peers (Orthanc, dcmtk), a virtual environment with the CPU torch wheel first, then the project.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

need_apt=()
command -v Orthanc >/dev/null 2>&1 || need_apt+=(orthanc)
# dcmdump: a name only dcmtk has (pynetdicom's venv scripts are called storescu, storescp, echoscu …)
command -v dcmdump >/dev/null 2>&1 || need_apt+=(dcmtk)
if [ "${#need_apt[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    # The Debian package starts a system Orthanc on 4242/8042; tests run their own instances.
    if command -v systemctl >/dev/null 2>&1; then systemctl disable --now orthanc >/dev/null 2>&1 || true; fi
    service orthanc stop >/dev/null 2>&1 || true
  else
    echo "setup: please install Debian packages: ${need_apt[*]} (tests needing them will be skipped)" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/pip" install -q --upgrade pip
  # The CPU wheel lies on disk; installing it first keeps pip from pulling a multi-GB CUDA build.
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q -e ".[test]"
  touch "$stamp"
fi
echo "setup: ready ($VENV)"
