#!/usr/bin/env bash
# Memory and load time of a server with vgg11_bn alone, default flags: how long until /health is
# 200 (the model loaded, hashing included, page cache warm), the RSS under 16 connections, and the
# RSS 5 s after the last reply, against the weights file's size.
#
#   bash bench/memory.sh                   # SECONDS_PER_RUN=15
set -euo pipefail
source "$(dirname "$0")/common.sh"
secs="${SECONDS_PER_RUN:-15}"
image="${IMAGE:-$data/catanddog/test/Cat/8106.jpg}"
weights=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$weights"' EXIT
ln -s "$(realpath "$vgg")" "$weights/vgg11_bn.safetensors"
cat "$vgg" > /dev/null # warm the page cache
port=18091
rss() { awk '/^VmRSS/ {print int($2 / 1024)}' "/proc/$1/status"; }

start=$(date +%s.%N)
"$bin" serve --weights-dir "$weights" --offline --addr "127.0.0.1:$port" 2>/dev/null &
server=$!
until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do sleep 0.02; done
ready=$(python3 -c "print(round($(date +%s.%N) - $start, 2))")
idle=$(rss "$server")
load=$(bash "$shared_bench/loadtest.sh" "http://127.0.0.1:$port/predict" "$image" 16 "$secs")
busy=$(rss "$server")
sleep 5
after=$(rss "$server")
file_mb=$(( $(stat -L -c %s "$vgg") / 1048576 ))
kill -TERM "$server"; wait "$server" 2>/dev/null || true
echo "{\"model\": \"vgg11_bn\", \"start_to_healthy_s\": $ready, \"weights_mb\": $file_mb, \"rss_idle_mb\": $idle, \"rss_end_of_load_mb\": $busy, \"rss_5s_after_mb\": $after, \"budget_mb\": $((file_mb + 200)), \"load\": \"$load\"}"
