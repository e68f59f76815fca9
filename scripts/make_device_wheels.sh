#!/usr/bin/env bash
# Build the wheels/ folder that scripts/device_check.sh installs on a GPU machine that lacks DeepSpeed.
#
#   bash scripts/make_device_wheels.sh [OUT_DIR] [EXTRA_SPEC ...]     # from any folder; OUT_DIR defaults to wheels
#
# The lent GPU machines (an H200 image with torch + CUDA, python 3.12; docs/BENCHMARKS.md) have no DeepSpeed and
# no network. This builds, on this machine:
#   * deepspeed 0.19.8 as a pure-Python wheel from its sdist (DS_BUILD_OPS=0: nothing compiled; ops JIT-build on
#     first use there), --no-deps, so it never pulls a torch;
#   * the dependencies the image lacks, at the versions of this venv (pydantic-core must match pydantic's pin
#     exactly): hjson, pydantic, pydantic-core (cp312 manylinux x86_64), annotated-types, typing-inspection, and
#     typing-extensions (pydantic needs a newer one than some images ship); each --no-deps, binaries only;
#   * any EXTRA_SPEC given (e.g. `pytest==8.3.5`), also --no-deps, binaries for cp312 manylinux.
# It refuses to finish if a torch, triton or nvidia-* wheel ended up in the folder, and writes the folder under
# a temporary name, renamed into place when complete (an interrupted run leaves the old folder as it was).
# Carry the folder with the working tree to the GPU machine; device_check.sh installs it into /tmp/site.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT=${1:-$ROOT/wheels}
[ $# -gt 0 ] && shift
PY=${PY:-$ROOT/.venv/bin/python}
PYVER=${PYVER:-3.12}  # the GPU image's python
DS_VERSION=0.19.8
ABI="cp${PYVER/./}"

ver() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
binaries() {  # download wheels for the GPU image's python and platform, no dependencies
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        --abi "$ABI" --abi abi3 --abi none --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$TMP" "$@"
}

TMP=$(mktemp -d "${OUT%/}.tmp.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

echo "deepspeed==$DS_VERSION: building a pure-Python wheel from the sdist (no ops, no deps)"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-binary deepspeed -w "$TMP" \
    "deepspeed==$DS_VERSION"
SPECS=("hjson==$(ver hjson)" "pydantic==$(ver pydantic)" "pydantic-core==$(ver pydantic-core)"
       "annotated-types==$(ver annotated-types)" "typing-inspection==$(ver typing-inspection)"
       "typing-extensions==$(ver typing-extensions)")
echo "dependencies: ${SPECS[*]} $*"
binaries "${SPECS[@]}" "$@"

if ls "$TMP" | grep -iE '^(torch|triton|nvidia)[-_]' ; then
    echo "make_device_wheels: a torch/triton/nvidia wheel got into $TMP (above): refusing" >&2
    exit 1
fi
ls "$TMP"/deepspeed-"$DS_VERSION"-py3-none-any.whl "$TMP"/pydantic_core-*-"$ABI"-*manylinux*.whl > /dev/null
rm -rf "$OUT.old"
[ -e "$OUT" ] && mv "$OUT" "$OUT.old"
mv "$TMP" "$OUT"
rm -rf "$OUT.old"
trap - EXIT
echo "wrote $OUT:"
ls -l "$OUT"
