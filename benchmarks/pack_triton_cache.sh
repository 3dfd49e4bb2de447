#!/usr/bin/env bash
# Compile the GPU check's Triton kernels on this machine (no GPU needed) for a GPU machine with another
# Python and Triton, and pack them as build/triton-cache.tar.gz, which benchmarks/gpu_check.sh unpacks
# into its Triton cache when the file comes with the tree.
#
#   bash benchmarks/pack_triton_cache.sh
#   PY312=/path/to/python3.12 TRITON_VERSION=3.6.0 TORCH_VERSION=2.11.0 ARCH=90 bash benchmarks/pack_triton_cache.sh
#
# A cache entry's key includes the Triton build (its Python sources and its library, which differs
# between Python versions), ptxas and the target, so the kernels must be compiled with the same
# Triton wheel and Python minor version as the GPU machine's (defaults: the H100 image's Python 3.12,
# Triton 3.6.0, sm_90). Makes a virtual environment under build/ with those from PyPI (about 3 GB
# the first time), then compiles (about 4 minutes on 2 cores) and checks that every launch of the same
# calls finds its kernel (--verify). Rebuild after any change to a Triton module's kernels or to a
# line above one: a kernel's key hashes its source and its callees', and the line each starts on
# (Triton's JITFunction; 17 lines added at the top of triton_common.py changed 175 of 228 keys).
# gpu_check.sh's triton-cache step says how many kernels it found and whether the cache came from the
# same build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=${PY312:-python3.12}
VENV=${VENV:-build/venv-triton-${TRITON_VERSION:-3.6.0}}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY312" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null ||
        { echo "no Python 3.12 at PY312=$PY312: set PY312 to one" >&2; exit 1; }
    "$PY312" -m venv "$VENV"
    "$VENV/bin/pip" install -q "torch==${TORCH_VERSION:-2.11.0}" "triton==${TRITON_VERSION:-3.6.0}" "numpy<2.4"
fi
rm -rf build/triton-cache build/triton-cache.tar.gz
TRITON_INTERPRET=0 TRITON_CACHE_DIR=build/triton-cache PYTHONPATH=. "$VENV/bin/python" benchmarks/triton_cache.py \
    --arch "${ARCH:-90}" --jobs "$(nproc)" --binary-only --verify
tar -C build -czf build/triton-cache.tar.gz triton-cache
ls -l build/triton-cache.tar.gz
