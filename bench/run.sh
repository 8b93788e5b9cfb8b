#!/usr/bin/env bash
# Forward-pass latency side by side, from one run on this machine: `cnnserve bench` against PyTorch
# eager, PyTorch channels_last and ONNX Runtime (bench/inference_pytorch.py) on the same weights,
# batch sizes and input size. One engine runs at a time. Prints the JSON lines, then a table.
#
#   bash bench/run.sh                       # vgg11_bn and googlenet, batch 1 and 8, 224x224
#   BATCH=1,8,16 ITERS=30 bash bench/run.sh
#
# The peers need a Python with torch, torchvision, safetensors and onnxruntime: PYTHON=/path/to/python
# (default python3); without torch only cnnserve runs. Writes bench/inference.jsonl.
set -euo pipefail
source "$(dirname "$0")/common.sh"
batch="${BATCH:-1,8}" size="${SIZE:-224}" iters="${ITERS:-20}"
out=bench/inference.jsonl
: > "$out"
echo "# $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $(grep -o 'avx512[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' ')" >&2
for model in vgg11_bn googlenet; do
  weights=$vgg
  [ "$model" = googlenet ] && weights=$googlenet
  "$bin" bench --model "$model" --weights "$weights" --batch "$batch" --size "$size" --iters "$iters" 2>/dev/null \
    | sed 's/^{/{"engine":"cnnserve",/' | tee -a "$out"
  # bf16 where the CPU has AVX512_BF16 (the command refuses it otherwise).
  "$bin" bench --model "$model" --weights "$weights" --batch "$batch" --size "$size" --iters "$iters" \
    --dtype bf16 2>/dev/null | sed 's/^{/{"engine":"cnnserve-bf16",/' | tee -a "$out" || true
  if "$python" -c "import torch, torchvision, safetensors" 2>/dev/null; then
    "$python" bench/inference_pytorch.py --model "$model" --weights "$weights" --batch "$batch" \
      --size "$size" --iters "$iters" | tee -a "$out"
  else
    echo "$python has no torch/torchvision/safetensors: PyTorch and ONNX Runtime skipped" >&2
  fi
done

python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"ms_median"' in l]
engines = ["torch-eager", "torch-channels_last", "onnxruntime", "cnnserve", "cnnserve-bf16"]
print("| ms per batch (median) | " + " | ".join(engines) + " | ONNX Runtime / cnnserve |")
print("|---|" + "---|" * (len(engines) + 1))
for model in ("vgg11_bn", "googlenet"):
    for batch in sorted({r["batch"] for r in rows if r["model"] == model}):
        ms = {r["engine"]: r["ms_median"] for r in rows if r["model"] == model and r["batch"] == batch}
        cells = [f'{ms[e]:.1f}' if e in ms else "-" for e in engines]
        ratio = f'{ms["onnxruntime"] / ms["cnnserve"]:.2f}' if "onnxruntime" in ms and "cnnserve" in ms else "-"
        print(f"| {model}, batch {batch} | " + " | ".join(cells) + f" | {ratio} |")
PY
