#!/usr/bin/env bash
# Builds cnnserve with the `cuda` feature on a machine without a GPU (see scripts/cuda-env.sh),
# then strips and gzips it for carrying to a GPU machine (scripts/gpu-check.sh runs it there).
# The last line printed is the path of the built binary. A cold build takes ~11-15 minutes on
# our 2-core machines; the PTX kernels compile once per target dir.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/cuda-env.sh
source scripts/cuda-env.sh
cargo build --release --locked --features cuda "$@" >&2
bin="$CARGO_TARGET_DIR/release/cnnserve"
strip -o "$bin.stripped" "$bin"
gzip -9 -c "$bin.stripped" > "$bin.gz"
echo "built $(du -h "$bin" | cut -f1), stripped and gzipped $(du -h "$bin.gz" | cut -f1): $bin.gz" >&2
echo "$bin"
