#!/usr/bin/env bash
# The install steps of the container image (deploy/container/Containerfile), in one script so
# that CI runs them too: there is no container engine on the CI machine to build the image.
#
#   install.sh system              Debian packages the image needs (ffmpeg, the burnt-in clock's
#                                  font); installs only what is missing. .ci/run runs it on every
#                                  CI machine (as root, like the image build).
#   install.sh app PREFIX SRC      a virtual environment at PREFIX with the package from SRC (the
#                                  repository root), byte-compiled (the root filesystem is read-only
#                                  at run time), and a smoke check. tests/deploy/test_container.py
#                                  runs it into a scratch directory.
set -euo pipefail

PACKAGES=(ffmpeg fonts-dejavu-core)

system() {
    local missing=()
    for package in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        echo "install.sh: system packages present: ${PACKAGES[*]}"
        return
    fi
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    echo "install.sh: installed ${missing[*]}"
}

app() {
    local prefix="$1" src="$2"
    python3 -m venv "$prefix"
    "$prefix/bin/pip" install --quiet --no-cache-dir "$src"
    "$prefix/bin/python" -m compileall -q "$prefix/lib"
    "$prefix/bin/orchestrator" --version
}

case "${1:-}" in
    system) system ;;
    app) [ $# -eq 3 ] || { echo "usage: install.sh app PREFIX SRC" >&2; exit 2; }; app "$2" "$3" ;;
    *) echo "usage: install.sh system | install.sh app PREFIX SRC" >&2; exit 2 ;;
esac
