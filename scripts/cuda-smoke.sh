#!/usr/bin/env bash
# Runs the CUDA build on this machine, without a GPU, against the stub driver of scripts/cuda-env.sh
# (every driver call answers "no CUDA device"). Checks that the binary loads with the libraries it
# was linked against, that its CPU path gives the CPU build's logits bit for bit, and that asking
# for the GPU fails with one sentence and no backtrace, also with RUST_BACKTRACE=1.
#
#   scripts/cuda-smoke.sh CUDA_BINARY CPU_BINARY
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { sed -n 2,7p "$0"; exit 2; }
cuda_bin="$1" cpu_bin="$2"
# shellcheck source=scripts/cuda-env.sh
source scripts/cuda-env.sh
fixtures="${CNNSERVE_FIXTURES:-../shared/fixtures}"
weights="$fixtures/googlenet/weights.safetensors"
inputs="$fixtures/googlenet/reference.safetensors"
w="$(mktemp -d)"
trap 'rm -rf "$w"' EXIT

"$cpu_bin" forward --model googlenet --weights "$weights" --input "$inputs" --output "$w/cpu.safetensors" 2>/dev/null
LD_LIBRARY_PATH="$CNNSERVE_CUDA_STUB_LIBS" "$cuda_bin" forward --model googlenet --weights "$weights" \
  --input "$inputs" --output "$w/cuda.safetensors" 2>/dev/null
cmp "$w/cpu.safetensors" "$w/cuda.safetensors" ||
  { echo "cuda smoke: the CUDA build's CPU logits differ from the CPU build's" >&2; exit 1; }

if err="$(LD_LIBRARY_PATH="$CNNSERVE_CUDA_STUB_LIBS" RUST_BACKTRACE=1 RUST_LOG=off "$cuda_bin" forward \
  --device cuda --model googlenet --weights "$weights" --input "$inputs" --output "$w/gpu.safetensors" 2>&1)"; then
  echo "cuda smoke: --device cuda succeeded against the stub driver" >&2; exit 1
fi
lines="$(printf '%s\n' "$err" | grep -c .)"
if [ "$lines" != 1 ] || ! printf '%s' "$err" | grep -q '^error: cannot open CUDA device 0' ||
  printf '%s' "$err" | grep -qi backtrace; then
  printf 'cuda smoke: --device cuda without a GPU should fail with one sentence, got:\n%s\n' "$err" >&2
  exit 1
fi
echo "cuda smoke: ok (CPU path bit-identical to the CPU build; without a GPU: $err)"
