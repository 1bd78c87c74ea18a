#!/usr/bin/env bash
# One-time, idempotent set-up of everything the node, its demo and its tests need on a fresh machine:
# Debian peers (Orthanc and its DICOMweb plugin, dcmtk, Chromium), the OHIF viewer (npm, into .viewer/),
# a virtual environment with the CPU torch wheel first, then the project with its test tools.
# `setup.sh --node` (make node): the node alone, for a production host: the virtual environment with
# the project and OpenVINO (faster CPU inference); no Debian packages, no viewer, no test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

debian_peers() {
  need_apt=()
  command -v Orthanc >/dev/null 2>&1 || need_apt+=(orthanc)
  # dcmdump: a name only dcmtk has (pynetdicom's venv scripts are called storescu, storescp, echoscu …)
  command -v dcmdump >/dev/null 2>&1 || need_apt+=(dcmtk)
  # the viewer tests: Orthanc's DICOMweb, a browser to drive (Playwright uses it, downloads none), npm
  [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_apt+=(orthanc-dicomweb)
  command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
  command -v npm >/dev/null 2>&1 || need_apt+=(npm)
  if [ "${#need_apt[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "setup: installing Debian packages: ${need_apt[*]}"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
      # The Debian package starts a system Orthanc on 4242/8042; tests run their own instances. Only an
      # Orthanc this run installed is stopped: a site's own Orthanc (pacs-admin §2 installs it first, and
      # chromium or npm may still be missing then) is left running and enabled.
      if [[ " ${need_apt[*]} " == *" orthanc "* ]]; then
        if command -v systemctl >/dev/null 2>&1; then systemctl disable --now orthanc >/dev/null 2>&1 || true; fi
        service orthanc stop >/dev/null 2>&1 || true
      fi
    else
      echo "setup: please install Debian packages: ${need_apt[*]} (tests needing them will be skipped)" >&2
    fi
  fi
}

viewer() {
  # OHIF, pinned (OHIF_VERSION in dicomnode/harness/viewer.py). The package's dist/ is the built app; its
  # npm dependencies are build-time only (one, @ohif/i18n@3.13.2, is not even published), so the
  # registry tarball (integrity-checked by npm) is unpacked rather than `npm install`ed.
  OHIF_VERSION=3.13.2
  ohif=".viewer/ohif-app-$OHIF_VERSION"
  if [ ! -f "$ohif/dist/index.html" ]; then
    if command -v npm >/dev/null 2>&1; then
      echo "setup: fetching @ohif/app@$OHIF_VERSION into $ohif"
      mkdir -p .viewer
      tmp=$(mktemp -d .viewer/tmp.XXXXXX)
      (cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null && mkdir app \
        && tar xzf ohif-app-"$OHIF_VERSION".tgz -C app --strip-components=1)
      rm -rf "$ohif" && mv "$tmp/app" "$ohif" && rm -rf "$tmp"
    else
      echo "setup: npm not found: OHIF not installed (viewer tests will be skipped)" >&2
    fi
  fi
}

virtual_environment() {  # $1: the project's extras (test, openvino)
  local extras=$1
  if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PY" -m venv "$VENV"
  fi
  stamp="$VENV/.installed-$extras-$(sha1sum pyproject.toml | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    "$VENV/bin/pip" install -q --upgrade pip
    # The CPU wheel lies on disk; installing it first keeps pip from pulling a multi-GB CUDA build.
    "$VENV/bin/pip" install -q torch==2.13.0
    "$VENV/bin/pip" install -q -e ".[$extras]"
    touch "$stamp"
  fi
}

case "${1:-}" in
  "") debian_peers; viewer; virtual_environment test ;;
  --node) virtual_environment openvino ;;
  *) echo "usage: setup.sh [--node]" >&2; exit 2 ;;
esac
echo "setup: ready ($VENV)"
