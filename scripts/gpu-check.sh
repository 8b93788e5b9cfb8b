#!/usr/bin/env bash
# The GPU check: cnnserve's CUDA build against PyTorch on the same GPU, in one command, on a machine
# with PyTorch (torch, torchvision, safetensors) and neither Rust nor network.
#
#   scripts/gpu-check.sh BINARY[.gz] DATASET.zip IMAGE      (BINARY from scripts/build-cuda.sh)
#
# One JSON line per check on stdout, also kept in $OUT/checks.jsonl (OUT defaults to
# /tmp/cnnserve-gpu-check; the server's log and each command's output are there too):
#   pytorch_throughput  PyTorch's bare model on this GPU (f32 and TF32; batch 1, 32, 64)
#   parity              cnnserve forward vs PyTorch's logits, both models, 224x224 and 240x320:
#                       f32 within 1e-3; tf32, bf16, f16 within 1%, 10%, 5% of the largest logit
#   bench               cnnserve bench per dtype (f32, tf32, bf16, f16), batch 1, 32, 64 (GPU only)
#   predict             cnnserve predict on IMAGE
#   lone_request        median x-total-time of one client, both models (goal: under 3 ms, vgg11_bn)
#   load                the server under 96 clients (4 processes x 24 threads), both models
#   finetune_http       a job over HTTP ends `succeeded` and its model answers
#   finetune_cli        cnnserve finetune
#   summary             ok when every check is; served req/s against PyTorch's f32 img/s (goal ≥ 0.8)
# DEVICE=cpu runs the same checks on the CPU build (a dry run of this script on any machine);
# EPOCHS (default 5) and LOAD_SECONDS (default 10) size the runs. Exit status 0 when all passed.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
[ $# -eq 3 ] || { sed -n 2,20p "$0"; exit 2; }
binary="$(realpath "$1")" dataset_zip="$(realpath "$2")" image="$(realpath "$3")"
DEVICE="${DEVICE:-cuda}" EPOCHS="${EPOCHS:-5}" LOAD_SECONDS="${LOAD_SECONDS:-10}"
OUT="${OUT:-/tmp/cnnserve-gpu-check}"
PORT="${PORT:-18080}"
export BATCH="${BATCH:-32}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
W="$(mktemp -d)"
trap 'kill "${server:-}" 2>/dev/null; rm -rf "$W"' EXIT
checks="$OUT/checks.jsonl"
: > "$checks"
py() { python3 "$here/gpu_check.py" "$@" | tee -a "$checks"; }
emit() { echo "$1" | tee -a "$checks"; }
# Runs a command, logging its output to $OUT/<name>.log; prints its exit status and wall time.
timed() {
  local name="$1"; shift
  local t0; t0=$(date +%s.%N)
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$rc $(python3 -c "print(round($(date +%s.%N) - $t0, 2))")"
}

if [ "$DEVICE" != cpu ]; then
  # The GPU machines keep CUDA's libraries and the driver here; otherwise, look for them.
  libs="/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/nvidia/lib64"
  for l in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13 libcuda.so.1; do
    found=$(find / -xdev \( -path /proc -o -path /sys \) -prune -o -name "$l" -print 2>/dev/null | head -1)
    [ -n "$found" ] && libs="$libs:$(dirname "$found")"
  done
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
  emit "{\"check\": \"machine\", \"device\": \"$DEVICE\", \"gpu\": \"$gpu\", \"cpus\": $(nproc)}"
fi
case "$binary" in
  *.gz) gzip -dc "$binary" > "$W/cnnserve" ;;
  *) cp "$binary" "$W/cnnserve" ;;
esac
chmod +x "$W/cnnserve"
cn="$W/cnnserve"
missing=$(ldd "$cn" | grep "not found")
[ -z "$missing" ] || { emit "{\"check\": \"libraries\", \"ok\": false, \"missing\": \"$(echo $missing)\"}"; exit 1; }
python3 -c "import zipfile, sys; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$dataset_zip" "$W/data"
data="$W/data"
# The zip may hold train/ and test/ at its root or inside one folder.
[ -d "$data/train" ] || data="$(dirname "$(find "$W/data" -maxdepth 3 -type d -name train | head -1)")"

py gen "$W/ref" "$DEVICE"
for m in vgg11_bn googlenet; do
  read -r rc wall < <(timed "forward-$m" "$cn" forward --device "$DEVICE" --model "$m" \
    --weights "$W/ref/$m.safetensors" --input "$W/ref/in.safetensors" --output "$W/$m.out.safetensors")
  if [ "$rc" = 0 ]; then
    py compare "$m" "$W/$m.out.safetensors" "$W/ref/$m.ref.safetensors" 1e-3
  else
    emit "{\"check\": \"parity\", \"model\": \"$m\", \"ok\": false, \"error\": \"forward exited $rc, see $OUT/forward-$m.log\"}"
  fi
done

# The reduced precisions (not on the CPU): documented tolerances, relative to the largest logit.
if [ "$DEVICE" != cpu ]; then
  for m in vgg11_bn googlenet; do
    for spec in tf32:0.01 bf16:0.1 f16:0.05; do
      dt=${spec%%:*} tol=${spec##*:}
      read -r rc wall < <(timed "forward-$m-$dt" "$cn" forward --device "$DEVICE" --dtype "$dt" \
        --model "$m" --weights "$W/ref/$m.safetensors" --input "$W/ref/in.safetensors" \
        --output "$W/$m.$dt.safetensors")
      if [ "$rc" = 0 ]; then
        py compare "$m" "$W/$m.$dt.safetensors" "$W/ref/$m.ref.safetensors" "$tol" "$dt"
      else
        emit "{\"check\": \"parity\", \"model\": \"$m\", \"dtype\": \"$dt\", \"ok\": false, \"error\": \"forward exited $rc, see $OUT/forward-$m-$dt.log\"}"
      fi
    done
  done
  # The bare forward pass in each dtype, beside pytorch_throughput (reported, not gated).
  for m in vgg11_bn googlenet; do
    for dt in f32 tf32 bf16 f16; do
      "$cn" bench --device "$DEVICE" --dtype "$dt" --model "$m" --weights "$W/ref/$m.safetensors" \
        --batch "1,$BATCH,64" --iters 20 2>> "$OUT/bench.log" |
        sed 's/^{/{"check": "bench", /' | tee -a "$checks"
    done
  done
fi

read -r rc wall < <(timed predict "$cn" predict --device "$DEVICE" --model googlenet \
  --weights "$W/ref/googlenet.safetensors" --top-k 2 --json "$image")
emit "{\"check\": \"predict\", \"ok\": $([ "$rc" = 0 ] && grep -q predictions "$OUT/predict.log" && echo true || echo false), \"wall_s\": $wall}"

mkdir -p "$W/srv"
cp "$W/ref/vgg11_bn.safetensors" "$W/ref/googlenet.safetensors" "$W/srv/"
"$cn" serve --device "$DEVICE" --weights-dir "$W/srv" --offline --addr "127.0.0.1:$PORT" \
  --max-batch-size "$BATCH" --max-concurrent-requests 512 > "$OUT/server.log" 2>&1 &
server=$!
base="http://127.0.0.1:$PORT"
# /health is 200 once every model has loaded (and warmed up on the GPU).
if python3 "$here/gpu_check.py" wait "$base/health" 180; then
  emit "{\"check\": \"serve\", \"ok\": true}"
  for m in vgg11_bn googlenet; do
    py lone "$base/predict?model=$m&top_k=1" "$image" 60
  done
  for m in vgg11_bn googlenet; do
    py load "$base/predict?model=$m&top_k=1" "$image" "$LOAD_SECONDS" 24 4
  done
  py job "$base" "$dataset_zip" vgg11_bn catdog 600 "$EPOCHS"
else
  emit "{\"check\": \"serve\", \"ok\": false, \"error\": \"not healthy within 180 s, see $OUT/server.log\"}"
fi
kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; server=

read -r rc wall < <(timed finetune-cli "$cn" finetune --device "$DEVICE" --dataset "$data" \
  --base-model vgg11_bn --weights "$W/ref/vgg11_bn.safetensors" --name ft2 \
  --weights-dir "$W/srv" --augment false --epochs "$EPOCHS")
emit "{\"check\": \"finetune_cli\", \"ok\": $([ "$rc" = 0 ] && [ -f "$W/srv/ft2.safetensors" ] && echo true || echo false), \"wall_s\": $wall, \"epochs\": $EPOCHS}"

py summary "$checks"
tail -1 "$checks" | grep -q '"ok": true'
