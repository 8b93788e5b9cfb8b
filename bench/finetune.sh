#!/usr/bin/env bash
# The fine-tuning benchmark of the README (bash bench/finetune.sh): the 5-epoch recipe on catanddog with vgg11_bn,
# augmentation off and on, in cnnserve and (when torch is installed) in PyTorch, one run at a
# time. Run it on an otherwise idle machine from the repo root; it takes about half an hour.
# Writes bench/results.jsonl (one line per run) and prints a table.
set -euo pipefail
source "$(dirname "$0")/common.sh"
weights=$vgg
out=bench/results.jsonl
: > "$out"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

for augment in false true; do
  start=$(date +%s.%N)
  "$bin" finetune --dataset "$data/catanddog" --base-model vgg11_bn --weights "$weights" --augment "$augment" \
    --epochs 5 --batch-size 32 --learning-rate 1e-3 --seed 0 --name bench --weights-dir "$scratch" \
    > "$scratch/log" 2>&1
  end=$(date +%s.%N)
  wall=$(python3 -c "print(round($end - $start, 1))")
  echo "{\"framework\": \"cnnserve\", \"arch\": \"vgg11_bn\", \"augment\": $augment, \"wall_s\": $wall}" | tee -a "$out"
done

if "$python" -c "import torch, torchvision" 2>/dev/null; then
  for augment in false true; do
    "$python" bench/finetune_pytorch.py --data "$data/catanddog" --arch vgg11_bn --augment "$augment" \
      --weights "$weights" --epochs 5 --batch-size 32 --lr 1e-3 --seed 0 | tail -n 1 | tee -a "$out"
  done
else
  echo "torch is not installed: PyTorch runs skipped (pip install torch torchvision safetensors)" >&2
fi

python3 - "$out" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
def wall(fw, aug):
    return next((r["wall_s"] for r in runs if r["framework"] == fw and r["augment"] == aug), None)
print("| augment | cnnserve | PyTorch | speed-up |")
print("|---|---|---|---|")
for aug in (False, True):
    c, p = wall("cnnserve", aug), wall("pytorch", aug)
    speed = f"{p / c:.1f}x" if c and p else "-"
    print(f"| {str(aug).lower()} | {c:.0f} s | {p:.0f} s | {speed} |" if p else f"| {str(aug).lower()} | {c:.0f} s | - | - |")
PY
