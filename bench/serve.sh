#!/usr/bin/env bash
# Serving side by side, from one run on this machine: wrk (16 connections, POST of a 35 KB JPEG)
# against cnnserve and against the FastAPI + torchvision server a user would otherwise write
# (../shared/bench/peer_server.py), one server at a time, the load tool on the same cores.
#
#   bash bench/serve.sh                    # CONNECTIONS=16 SECONDS=15
#
# Needs Debian's wrk, and for the peer a Python with torch, torchvision, safetensors, fastapi and
# uvicorn (PYTHON=/path/to/python). Writes bench/serving.jsonl and prints a table.
set -euo pipefail
source "$(dirname "$0")/common.sh"
conns="${CONNECTIONS:-16}" secs="${SECONDS_PER_RUN:-15}"
image="${IMAGE:-$data/catanddog/test/Cat/8106.jpg}"
command -v wrk >/dev/null || { echo "wrk not found: apt-get install wrk" >&2; exit 1; }
weights=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$weights"' EXIT
ln -s "$(realpath "$vgg")" "$weights/vgg11_bn.safetensors"
ln -s "$(realpath "$googlenet")" "$weights/googlenet.safetensors"
out=bench/serving.jsonl
: > "$out"
port=18090

wait_healthy() {
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && return 0
    sleep 0.2
  done
  echo "server on port $port never became healthy" >&2
  return 1
}

post() { curl -sf --data-binary @"$image" -H 'content-type: image/jpeg' "$1" >/dev/null; }

load() { # server model url
  # Warm-up; the peer server may still be loading its model after it answers.
  for _ in $(seq 300); do post "$3" && break; sleep 0.2; done
  post "$3" && post "$3"
  local result
  result=$(bash "$shared_bench/loadtest.sh" "$3" "$image" "$conns" "$secs")
  echo "$result" | python3 -c "
import json, sys
kv = dict(p.split('=') for p in sys.stdin.read().split()[1:])
print(json.dumps({'server': '$1', 'model': '$2', 'connections': $conns, 'seconds': $secs,
                  **{k: float(v) for k, v in kv.items()}}))" | tee -a "$out"
}

if "$python" -c "import torch, torchvision, fastapi, uvicorn, safetensors" 2>/dev/null; then
  "$python" "$shared_bench/peer_server.py" "$weights" "$port" 2>/dev/null &
  peer=$!
  wait_healthy
  for model in vgg11_bn googlenet; do load peer "$model" "http://127.0.0.1:$port/predict?model=$model"; done
  kill "$peer"; wait "$peer" 2>/dev/null || true
else
  echo "$python lacks torch/fastapi/uvicorn: the peer server is skipped" >&2
fi

"$bin" serve --weights-dir "$weights" --offline --addr "127.0.0.1:$port" 2>/dev/null &
server=$!
wait_healthy
for model in vgg11_bn googlenet; do load cnnserve "$model" "http://127.0.0.1:$port/predict?model=$model"; done
kill -TERM "$server"; wait "$server" 2>/dev/null || true

python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| model | peer req/s | peer p99 ms | cnnserve req/s | cnnserve p99 ms | req/s ratio |")
print("|---|---|---|---|---|---|")
for model in ("vgg11_bn", "googlenet"):
    r = {x["server"]: x for x in rows if x["model"] == model}
    p, c = r.get("peer"), r.get("cnnserve")
    cell = lambda x, k: f"{x[k]:.1f}" if x else "-"
    ratio = f'{c["req_s"] / p["req_s"]:.2f}x' if p and c and p["req_s"] else "-"
    print(f"| {model} | {cell(p, 'req_s')} | {cell(p, 'p99_ms')} | {cell(c, 'req_s')} | {cell(c, 'p99_ms')} | {ratio} |")
PY
