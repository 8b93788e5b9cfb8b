#!/usr/bin/env bash
# Soak: SECONDS (default 600) of mixed load on a release server with googlenet and vgg11_bn (the
# fixtures' weights): predictions on both models, bad inputs, reloads, fine-tuning jobs back to
# back. Passes when there is no 5xx, no connection error, no lost model, /health is 200 at the
# end, and the server's RSS at the end is within 10% of its value after the first minute.
#   bench/soak.sh [SECONDS]          one JSON line on stdout (soak.py); the server log in $OUT
set -euo pipefail
source "$(dirname "$0")/common.sh"
seconds="${1:-600}"
OUT="${OUT:-$(mktemp -d)}"
w="$(mktemp -d)"
trap 'kill "${server:-}" 2>/dev/null || true; rm -rf "$w"' EXIT
mkdir -p "$w/weights"
ln -s "$(realpath "$googlenet")" "$w/weights/googlenet.safetensors"
ln -s "$(realpath "$vgg")" "$w/weights/vgg11_bn.safetensors"
# A small cat/dog set: 12 training and 2 test pictures a class.
python3 - "$data/catanddog" "$w/catdog.zip" <<'PY'
import os, sys, zipfile
root, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(out, "w") as z:
    for split, n in (("train", 12), ("test", 2)):
        for cls in sorted(os.listdir(os.path.join(root, split))):
            d = os.path.join(root, split, cls)
            if os.path.isdir(d):
                for f in sorted(os.listdir(d))[:n]:
                    z.write(os.path.join(d, f), f"{split}/{cls}/{f}")
PY
"$bin" serve --offline --addr 127.0.0.1:18090 --weights-dir "$w/weights" \
  --default-model googlenet > "$OUT/soak-server.log" 2>&1 &
server=$!
until curl -sf http://127.0.0.1:18090/health >/dev/null; do sleep 0.2; done
python3 "$(dirname "$0")/soak.py" http://127.0.0.1:18090 "$server" "$seconds" "$w/catdog.zip" \
  "$fixtures"/preprocess/img*.jpg
