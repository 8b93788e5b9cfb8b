# Sourced, not run: puts a CUDA 13.0 toolchain from PyPI's NVIDIA wheels on this shell's paths,
# so that the `cuda` feature builds on a machine without a GPU or a CUDA install.
#
#   source scripts/cuda-env.sh   # then: cargo build --release --features cuda
#
# What it does (once; later calls reuse it):
# - a venv at $CNNSERVE_CUDA_VENV (default ~/.cache/cnnserve/cuda-venv) with nvcc, NVVM, the CUDA
#   headers and the libraries the binary links against (13.0 matches the GPU machines' driver);
# - a folder of unversioned links to those libraries, and a stub libcuda.so (soname libcuda.so.1)
#   that defines the driver functions: the link needs the names, the real driver provides them at
#   run time. Each stub answers CUDA_ERROR_NO_DEVICE (100), so that the built binary can also be
#   run here against it (scripts/cuda-smoke.sh) and fails as on a machine without a GPU;
# - PATH, CUDA_ROOT, CUDA_COMPUTE_CAP (default 90, H100/H200), LIBRARY_PATH, and a target dir of
#   its own (CARGO_TARGET_DIR, default ~/.cache/cnnserve/target-cuda) so that the CPU build's
#   artifacts are not rebuilt back and forth.

cnnserve_cuda_env() {
  local venv="${CNNSERVE_CUDA_VENV:-$HOME/.cache/cnnserve/cuda-venv}"
  local python="${PYTHON:-python3}"
  if [ ! -f "$venv/.complete" ]; then
    echo "cuda-env: installing the CUDA 13.0 toolchain from PyPI into $venv" >&2
    "$python" -m venv "$venv" || return 1
    "$venv/bin/pip" install -q --no-deps \
      nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14 \
      nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88 || return 1
    touch "$venv/.complete"
  fi
  local root
  root="$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13)"
  [ -x "$root/bin/nvcc" ] || { echo "cuda-env: no nvcc in $root/bin" >&2; return 1; }

  local link="$venv/link"
  if [ ! -e "$link/libcuda.so.1" ]; then
    mkdir -p "$link"
    local lib base
    for lib in libcublas.so libcublasLt.so libcurand.so libnvrtc.so libcudart.so; do
      base="$(find "$root/lib" -maxdepth 1 -name "$lib.[0-9]*" | sort | head -1)"
      [ -n "$base" ] || { echo "cuda-env: $lib.* not found under $root/lib" >&2; return 1; }
      ln -sf "$base" "$link/$lib"
    done
    # Every driver function cudarc declares, each answering "no CUDA device".
    local registry sys
    registry="$(cargo metadata --format-version 1 --features cuda 2>/dev/null |
      "$python" -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"))')"
    sys="$(dirname "$registry")/src/driver/sys"
    [ -d "$sys" ] || { echo "cuda-env: cudarc's driver bindings not found (run cargo fetch)" >&2; return 1; }
    grep -rhoE '\bfn cu[A-Za-z0-9_]+\(' "$sys" | sed 's/^fn //; s/($//' | sort -u |
      sed 's/.*/int &(void) { return 100; }/' > "$link/cuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$link/libcuda.so" "$link/cuda_stub.c" || return 1
    ln -sf libcuda.so "$link/libcuda.so.1"
  fi

  export PATH="$root/bin:$PATH"
  export CUDA_ROOT="$root" CUDA_PATH="$root"
  export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
  export LIBRARY_PATH="$link:$root/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
  export CARGO_TARGET_DIR="${CNNSERVE_CUDA_TARGET_DIR:-$HOME/.cache/cnnserve/target-cuda}"
  # For running a CUDA build here against the stub driver (never put this on a GPU machine's path).
  export CNNSERVE_CUDA_STUB_LIBS="$link:$root/lib"
}
cnnserve_cuda_env
