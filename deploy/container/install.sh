#!/usr/bin/env bash
# The container image's steps (deploy/container/Containerfile), in one script that the build runs
# inside the image and deploy/container/build.sh runs around it. docs/container.md explains them.
#
#   install.sh rootfs OUT.tar      a Debian root filesystem to build FROM when no registry is at
#                                  hand (CI): mmdebstrap, minbase, Python, the PACKAGES below and
#                                  the same dpkg excludes as `system`; and OUT.tar.versions, what
#                                  `versions` says in it. Runs on the host, as root.
#   install.sh versions            prints DEBIAN_VERSION, PYTHON_VERSION, FFMPEG_VERSION (the
#                                  installed ffmpeg, or the one apt would install) and ARCH of the
#                                  machine it runs on: build.sh runs it in the base image, and
#                                  passes them to the build (the image's labels).
#   install.sh system DEBIAN PYTHON FFMPEG
#                                  in the build: the dpkg excludes, then ffmpeg (that version,
#                                  exactly) and the clock's font where missing, without
#                                  Recommends; fails when the base is not the one named (so the
#                                  labels say what is in the image). Not for a host: the excludes
#                                  drop files (GL drivers, documentation) from every later install.
#   install.sh app PREFIX WHEELS VERSION
#                                  in the build: a virtual environment at PREFIX with the package
#                                  from the wheels in WHEELS only (no index, no cache), byte-compiled
#                                  (the root filesystem is read-only at run time), pip removed, and
#                                  `orchestrator --version` checked against VERSION.
set -euo pipefail

# What the orchestrator needs from Debian: ffmpeg (libx264, the native AAC encoder, lavfi sources,
# drawtext) and the font of the burnt-in clock. Python and ca-certificates come with the base.
PACKAGES=(ffmpeg fonts-dejavu-core)

# dpkg path excludes, written to /etc/dpkg/dpkg.cfg.d/ before any package is installed, so that dpkg
# never unpacks these files and its database stays consistent (the way Debian's slim images drop
# documentation). Documentation, manuals and translations as in those images. And Mesa's GL
# drivers with LLVM and Z3 (about 160 MB, the largest part of ffmpeg's dependencies): ffmpeg's
# libavdevice links libGL and libSDL2, whose packages depend on libgl1-mesa-dri, but the drivers
# and LLVM are only dlopen()ed to draw on a GPU, never loaded by an ffmpeg that encodes
# (tests/deploy/test_container.py runs ldd on ffmpeg in the image: nothing missing).
DPKG_EXCLUDES=(
    'path-exclude=/usr/share/doc/*'
    'path-include=/usr/share/doc/*/copyright'
    'path-exclude=/usr/share/man/*'
    'path-exclude=/usr/share/info/*'
    'path-exclude=/usr/share/locale/*'
    'path-exclude=/usr/share/lintian/*'
    'path-exclude=/usr/lib/*/dri/*'
    'path-exclude=/usr/lib/*/libLLVM-*'
    'path-exclude=/usr/lib/*/libz3.so*'
)
DPKG_EXCLUDES_FILE=/etc/dpkg/dpkg.cfg.d/orchestrator-excludes

fail() {
    echo "install.sh: $*" >&2
    exit 1
}

write_excludes() {  # FILE
    mkdir -p "$(dirname "$1")"
    printf '%s\n' "# deploy/container/install.sh: files dpkg does not unpack in this image" "${DPKG_EXCLUDES[@]}" >"$1"
}

rootfs() {
    local out include staging
    out=$(realpath -m "$1")
    command -v mmdebstrap >/dev/null || fail "rootfs needs mmdebstrap: apt-get install mmdebstrap"
    include="python3,python3-venv,ca-certificates,$(IFS=,; echo "${PACKAGES[*]}")"
    staging=$(mktemp -d)
    trap 'rm -rf "$staging"' RETURN
    write_excludes "$staging/$(basename "$DPKG_EXCLUDES_FILE")"
    # minbase: apt, dpkg and the Essential set. The merged-usr hook makes /bin -> usr/bin as
    # debootstrap does (otherwise apt pulls in usrmerge, and with it Perl). The excludes go in
    # before the first package is unpacked. force-unsafe-io (no fsync per file) only while
    # building: the customize hook removes mmdebstrap's own dpkg settings, so that the image's
    # dpkg configuration is the excludes alone, as after `system`.
    mmdebstrap --quiet --variant=minbase --include="$include" \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --setup-hook='mkdir -p "$1/etc/dpkg/dpkg.cfg.d"' \
        --setup-hook="copy-in $staging/$(basename "$DPKG_EXCLUDES_FILE") $(dirname "$DPKG_EXCLUDES_FILE")" \
        --dpkgopt=force-unsafe-io \
        --customize-hook='rm -f "$1/etc/dpkg/dpkg.cfg.d/99mmdebstrap"' \
        --customize-hook="chroot \"\$1\" bash -s versions <'$(realpath "$0")' >'$out.versions'" \
        --format=tar bookworm "$out.partial"
    mv "$out.partial" "$out"  # never a half-written tar where the next build looks
}

ffmpeg_installed() {
    dpkg-query -W -f='${db:Status-Status}' ffmpeg 2>/dev/null | grep -qx installed
}

versions() {
    local ffmpeg
    if ffmpeg_installed; then
        ffmpeg=$(dpkg-query -W -f='${Version}' ffmpeg)
    else
        apt-get update -qq
        ffmpeg=$(apt-cache policy ffmpeg | awk '$1 == "Candidate:" { print $2 }')
        [ -n "$ffmpeg" ] && [ "$ffmpeg" != "(none)" ] || fail "apt has no ffmpeg to install"
    fi
    echo "DEBIAN_VERSION=$(cat /etc/debian_version)"
    echo "PYTHON_VERSION=$(python3 -c 'import platform; print(platform.python_version())')"
    echo "FFMPEG_VERSION=$ffmpeg"
    echo "ARCH=$(uname -m)"
}

system() {
    local debian="$1" python="$2" ffmpeg="$3" missing=() package i
    [ "$(cat /etc/debian_version)" = "$debian" ] ||
        fail "the base is Debian $(cat /etc/debian_version), not $debian (DEBIAN_VERSION)"
    [ "$(python3 -c 'import platform; print(platform.python_version())')" = "$python" ] ||
        fail "the base's python3 is $(python3 -V), not $python (PYTHON_VERSION)"
    write_excludes "$DPKG_EXCLUDES_FILE"
    for package in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null | grep -qx installed || missing+=("$package")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        # ffmpeg pinned to the version the labels name (its libraries come from the same source
        # package, at the same version).
        for i in "${!missing[@]}"; do
            [ "${missing[$i]}" != ffmpeg ] || missing[i]="ffmpeg=$ffmpeg"
        done
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        echo "install.sh: installed ${missing[*]}"
    fi
    apt-get clean
    rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log
    [ "$(dpkg-query -W -f='${Version}' ffmpeg)" = "$ffmpeg" ] ||
        fail "ffmpeg $(dpkg-query -W -f='${Version}' ffmpeg) is installed, not $ffmpeg (FFMPEG_VERSION)"
}

app() {
    local prefix="$1" wheels="$2" version="$3" reported
    python3 -m venv "$prefix"
    "$prefix/bin/pip" install --quiet --no-cache-dir --no-index --find-links "$wheels" "orchestrator==$version"
    # pip and setuptools only served the install: nothing installs into a read-only root at run time.
    "$prefix/bin/pip" uninstall --quiet --yes pip setuptools
    "$prefix/bin/python" -m compileall -q "$prefix/lib"
    reported=$("$prefix/bin/orchestrator" --version)
    echo "$reported"
    [ "$reported" = "orchestrator, version $version" ] || fail "the installed orchestrator is not version $version"
}

usage() {
    echo "usage: install.sh rootfs OUT.tar | versions | system DEBIAN PYTHON FFMPEG | app PREFIX WHEELS VERSION" >&2
    exit 2
}

case "${1:-}" in
    rootfs) [ $# -eq 2 ] || usage; rootfs "$2" ;;
    versions) [ $# -eq 1 ] || usage; versions ;;
    system) [ $# -eq 4 ] || usage; system "$2" "$3" "$4" ;;
    app) [ $# -eq 4 ] || usage; app "$2" "$3" "$4" ;;
    *) usage ;;
esac
