#!/usr/bin/env bash
# Builds vigil with the `cuda` feature without a system CUDA toolkit: nvcc and the CUDA headers
# and libraries come from NVIDIA's PyPI wheels (pinned: PTX newer than the target driver's CUDA
# will not load). With a system toolkit, `CUDA_COMPUTE_CAP=.. cargo build --release --features
# cuda` is all you need.
#
#   CUDA_COMPUTE_CAP=90 ./scripts/build-cuda.sh      # 90 = H100/H200; 89 = L4/RTX 40xx; 87 = Orin
#
# Output: target/release/vigil, and .gpu/ (scripts/pack-gpu.sh: the stripped binary, its
# libraries, the GPU check and its fixtures) to carry to a GPU machine. candle links libcuda at build time: when the machine has no
# driver (a build host), a stub with the driver API's symbols is generated; the real libcuda is
# found at run time on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${CUDA_VENV:-$PWD/target/cuda-venv}
if [ ! -x "$venv/bin/nvcc" ] && [ ! -d "$venv/lib" ]; then
  python3 -m venv "$venv"
fi
py=$(ls "$venv"/bin/python3)
"$py" -m pip install -q 'cuda-toolkit[nvcc,nvvm,crt,cudart,cccl,cublas,curand,nvrtc]==13.0.2'
cu=$("$py" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')

# The linker wants unversioned names.
(cd "$cu/lib" && for l in cublas cublasLt nvrtc cudart; do ln -sf "lib$l.so.13" "lib$l.so"; done && ln -sf libcurand.so.10 libcurand.so)

export LIBRARY_PATH="$cu/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
if ! ldconfig -p | grep -q 'libcuda.so '; then
  cargo fetch --locked
  src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | head -n1)
  mkdir -p "$cu/lib/stubs"
  grep -ohE '^pub unsafe fn cu[A-Za-z0-9_]+\(' "$src/src/driver/sys/mod.rs" \
    | sed -E 's/pub unsafe fn (cu[A-Za-z0-9_]+)\(/void \1(void){}/' | sort -u > "$cu/lib/stubs/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cu/lib/stubs/libcuda.so" "$cu/lib/stubs/cuda_stub.c"
  export LIBRARY_PATH="$cu/lib/stubs:$LIBRARY_PATH"
fi

export CUDA_HOME="$cu" PATH="$cu/bin:$PATH" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
cargo build --release --locked --features cuda
echo "built target/release/vigil with CUDA (compute capability $CUDA_COMPUTE_CAP)"
# What a GPU run needs, in one folder to carry (see scripts/gpu-check.sh).
./scripts/pack-gpu.sh target/release/vigil .gpu
