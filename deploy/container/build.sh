#!/usr/bin/env bash
# Builds the orchestrator's image from deploy/container/Containerfile (docs/container.md).
#
#   deploy/container/build.sh [--engine podman|docker|buildah] [--base IMAGE | --rootfs TAR]
#                             [--tag NAME] [--file CONTAINERFILE] [--wheels DIR]
#
# 1. The base: --base IMAGE (default: the slim Python image of Docker Hub), or --rootfs TAR: that
#    root filesystem imported as an image of one layer, which `install.sh rootfs TAR` makes first
#    when TAR does not exist (Debian's mirror only, no container registry: what CI does).
# 2. `install.sh versions` in a throwaway container of the base (or, for --rootfs, as it ran in the
#    root filesystem: TAR.versions): Debian, Python, the ffmpeg that will be installed, the
#    architecture. They become build arguments, so the image's labels; the build checks them.
# 3. The wheels, on this host: the package (from a copy of the sources: nothing is written into
#    the checkout) and its dependencies for the base's Python and architecture, binary only. With
#    --wheels DIR they are built into DIR and kept; when DIR already holds wheels, those are used
#    as they are (empty DIR after changing the code).
# 4. The build, with a context of install.sh and wheels/ alone. --tag defaults to
#    orchestrator:VERSION.
#
# The engine's own settings come from its environment: for buildah as root without a daemon or
# user namespaces, BUILDAH_ISOLATION=chroot and STORAGE_DRIVER=vfs (what CI uses).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-python3}

engine="" base="docker.io/library/python:3.11-slim-bookworm" rootfs="" tag="" file="$HERE/Containerfile" wheels=""
importing=""  # the pid of the root filesystem's import, running in the background

fail() {
    echo "build.sh: $*" >&2
    exit 1
}

while [ $# -gt 0 ]; do
    [ $# -ge 2 ] || fail "$1 needs a value (usage: see the top of $0)"
    case "$1" in
        --engine) engine="$2" ;;
        --base) base="$2" ;;
        --rootfs) rootfs="$2" ;;
        --tag) tag="$2" ;;
        --file) file="$2" ;;
        --wheels) wheels="$2" ;;
        *) fail "unknown option $1 (usage: see the top of $0)" ;;
    esac
    shift 2
done

if [ -z "$engine" ]; then
    for candidate in podman docker buildah; do
        if command -v "$candidate" >/dev/null; then engine=$candidate; break; fi
    done
    [ -n "$engine" ] || fail "no container engine: install podman, docker or buildah (docs/container.md)"
fi
command -v "$engine" >/dev/null || fail "$engine is not installed"

context=$(mktemp -d)
trap 'if [ -n "$importing" ]; then kill "$importing" 2>/dev/null || true; fi; rm -rf "$context"' EXIT
cp "$HERE/install.sh" "$context/install.sh"

# A command in a throwaway container of an image, as root, with this script's standard input.
run_in() {
    local image="$1"
    shift
    if [ "$engine" = buildah ]; then
        local container status=0
        container=$(buildah from --quiet "$image")
        buildah run --user 0:0 "$container" -- "$@" || status=$?
        buildah rm "$container" >/dev/null
        return "$status"
    fi
    "$engine" run --rm -i --user 0:0 --entrypoint "$1" "$image" "${@:2}"
}

step() {  # what comes next, after how many seconds
    echo "build.sh: [${SECONDS} s] $*" >&2
}

# 1. The base.
if [ -n "$rootfs" ]; then
    if [ ! -f "$rootfs" ]; then
        step "making the root filesystem $rootfs (mmdebstrap)"
        bash "$HERE/install.sh" rootfs "$rootfs"
    fi
    base=localhost/orchestrator-rootfs:bookworm
    step "importing $rootfs as $base (while the wheels are built)"
    if [ "$engine" = buildah ]; then
        # The tarball transport: the tar as the image's one layer, stored once (no FROM scratch +
        # ADD, which unpacks it and then packs it again to commit).
        buildah tag "$(buildah pull --quiet "tarball:$rootfs")" "$base" &
    else
        "$engine" import "$rootfs" "$base" >/dev/null &
    fi
    importing=$!
fi

# 2. What the base holds (for a root filesystem, install.sh rootfs wrote it down already).
declare -A found=()
if [ -n "$rootfs" ] && [ -f "$rootfs.versions" ]; then
    versions=$(cat "$rootfs.versions")
else
    if [ -n "$importing" ]; then wait "$importing"; importing=""; fi
    step "reading the versions in $base"
    versions=$(run_in "$base" bash -s versions <"$HERE/install.sh")
fi
while IFS='=' read -r key value; do
    found[$key]=$value
done <<<"$versions"
for key in DEBIAN_VERSION PYTHON_VERSION FFMPEG_VERSION ARCH; do
    [ -n "${found[$key]:-}" ] || fail "install.sh versions in $base did not say $key"
done
python_tag=$(echo "${found[PYTHON_VERSION]}" | cut -d. -f1,2 | tr -d .)

# 3. The wheels.
wheels=${wheels:-$context/wheels}
mkdir -p "$wheels"
if compgen -G "$wheels/*.whl" >/dev/null; then
    step "using the wheels in $wheels"
else
    step "building the wheels for CPython ${found[PYTHON_VERSION]} on ${found[ARCH]}"
    mkdir "$context/src"
    cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/orchestrator" "$context/src/"
    "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$wheels" "$context/src"
    rm -rf "$context/src"
    "$PYTHON" -m pip download --quiet --only-binary=:all: --dest "$wheels" \
        --python-version "$python_tag" --implementation cp --abi "cp$python_tag" \
        --platform "manylinux2014_${found[ARCH]}" --platform "manylinux_2_28_${found[ARCH]}" \
        "$wheels"/orchestrator-*.whl
fi
[ "$wheels" = "$context/wheels" ] || cp -r "$wheels" "$context/wheels"
package=$(cd "$context/wheels" && ls orchestrator-*.whl)
[ "$(echo "$package" | wc -l)" = 1 ] || fail "not one orchestrator wheel in the wheels: $package"
version=$(echo "$package" | cut -d- -f2)
tag=${tag:-orchestrator:$version}

# 4. The image.
if [ -n "$importing" ]; then wait "$importing"; importing=""; fi  # its failure fails the build here
step "building $tag FROM $base"
"$engine" build --file "$file" --tag "$tag" \
    --build-arg "BASE=$base" \
    --build-arg "DEBIAN_VERSION=${found[DEBIAN_VERSION]}" \
    --build-arg "PYTHON_VERSION=${found[PYTHON_VERSION]}" \
    --build-arg "FFMPEG_VERSION=${found[FFMPEG_VERSION]}" \
    --build-arg "VERSION=$version" \
    "$context"
step "built $tag"
