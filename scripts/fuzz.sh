#!/usr/bin/env bash
# A long fuzzing campaign of the parsers of untrusted bytes (tests/fuzz.rs): the JPEG/PNG/...
# decoders, the .pth reader and the data set zip reader, on mutated real files.
#   scripts/fuzz.sh [MUTANTS_PER_FILE] [SEED]      (defaults: 20000, a seed from the clock)
# A failure prints the file, iteration and seed to replay with CNNSERVE_FUZZ_SEED.
set -euo pipefail
cd "$(dirname "$0")/.."
export CNNSERVE_FUZZ_ITERS="${1:-20000}" CNNSERVE_FUZZ_SEED="${2:-$(date +%s)}"
echo "fuzz: $CNNSERVE_FUZZ_ITERS mutants per file, seed $CNNSERVE_FUZZ_SEED" >&2
exec cargo test --release --test fuzz -- --nocapture
