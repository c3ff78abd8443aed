#!/usr/bin/env bash
# Build the sysmail-relay container image without network access inside the build.
#
#   deploy/container/build-image.sh [--engine podman|docker] [--base IMAGE]
#                                   [--tag TAG] [--python X.Y] [--platform MACHINE]
#                                   [--wheels-only]
#
# 1. Wheels are made on this host, into build/image/wheels/: the project's own
#    wheel (`pip wheel --no-deps .`) and every dependency as a binary wheel for the
#    base image's Python and machine (`pip download --only-binary=:all:
#    --python-version X.Y --platform manylinux...`), so the host's Python version
#    does not matter. The base image is asked which Python it has, unless --python.
#    pip evaluates environment markers with the host's Python, so what a dependency
#    needs only below a patch release is named here too (redis-py: async-timeout
#    before 3.11.3, e.g. Debian bookworm's 3.11.2).
# 2. The image is built from the repository root; .dockerignore sends only the
#    wheels and the health check script, and the Dockerfile installs them with
#    `pip install --no-index`: no registry is contacted inside the build.
#
# Defaults: the engine found first (podman, docker), BASE=python:3.12-slim (the
# Dockerfile's), TAG=localhost/sysmail-relay:latest. --python and --platform
# (x86_64, aarch64) skip asking the base image; --wheels-only stops after step 1.
set -euo pipefail
cd "$(dirname "$0")/../.."

engine="" base="python:3.12-slim" tag="localhost/sysmail-relay:latest" pyver="" platform=""
wheels_only=0
while (($#)); do
    case $1 in
        --engine) engine=$2; shift 2 ;;
        --base) base=$2; shift 2 ;;
        --tag) tag=$2; shift 2 ;;
        --python) pyver=$2; shift 2 ;;
        --platform) platform=$2; shift 2 ;;
        --wheels-only) wheels_only=1; shift ;;
        -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-image.sh: unknown argument $1 (see --help)" >&2; exit 64 ;;
    esac
done
need_engine=1
if ((wheels_only)) && [[ -n $pyver && -n $platform ]]; then
    need_engine=0
fi
if [[ -z $engine ]] && ((need_engine)); then
    for candidate in podman docker; do
        if command -v "$candidate" >/dev/null && "$candidate" info >/dev/null 2>&1; then
            engine=$candidate
            break
        fi
    done
    [[ -n $engine ]] || { echo "build-image.sh: no working podman or docker" >&2; exit 69; }
fi

if [[ -z $pyver || -z $platform ]]; then
    # What the base image runs: its python3's version and the machine's name.
    read -r found_py found_machine < <("$engine" run --rm --network none --entrypoint python3 \
        "$base" -c 'import platform, sys; print("%d.%d" % sys.version_info[:2], platform.machine())')
    pyver=${pyver:-$found_py}
    platform=${platform:-$found_machine}
fi
abi="cp${pyver/./}"

out=build/image
mkdir -p "$out"
exec 9>"$out/.lock"
flock 9  # one build at a time in this tree: the wheels directory is shared
rm -rf "$out/wheels"
mkdir -p "$out/wheels"
if [[ ! -x $out/tools/bin/pip ]]; then
    python3 -m venv "$out/tools"
fi
pip=("$out/tools/bin/pip" --disable-pip-version-check --quiet)
"${pip[@]}" wheel --no-deps --wheel-dir "$out/wheels" .
"${pip[@]}" download --only-binary=:all: --dest "$out/wheels" \
    --implementation cp --python-version "$pyver" --abi "$abi" \
    --platform "manylinux_2_28_$platform" --platform "manylinux_2_17_$platform" \
    --platform "manylinux2014_$platform" --platform "manylinux1_$platform" \
    "$out"/wheels/sysmail_relay-*.whl "async-timeout>=4.0.3"
echo "build-image.sh: $(find "$out/wheels" -name '*.whl' | wc -l) wheels for Python $pyver" \
     "on $platform in $out/wheels"
if ((wheels_only)); then
    exit 0
fi

format=()
if [[ $(basename "$engine") == podman ]]; then
    format=(--format docker)  # the OCI format has no HEALTHCHECK
fi
"$engine" build "${format[@]}" --build-arg "BASE=$base" --tag "$tag" --file Dockerfile .
# The install stage's image is of no further use (the next wheels differ anyway).
"$engine" image prune --force --filter label=org.sysmail-relay.stage=install >/dev/null
echo "build-image.sh: built $tag from $base"
