#!/usr/bin/env bash
# Triton's own Python clients (tritonclient[http,grpc] from PyPI) against a cnnserve binary: starts
# it on the fixture GoogLeNet with an API key, HTTP and gRPC on free ports, runs
# scripts/test_triton.py (logits equal PyTorch's within 1e-3 over both protocols, JSON and binary;
# an `image` request equals /predict's probabilities; errors, the key, Triton-only RPCs), then
# stops the server with SIGTERM and checks it exits 0 within 10 s. Exits non-zero on any mismatch.
#
#   scripts/test-triton.sh [BINARY]        (default: $CARGO_TARGET_DIR/release/cnnserve)
#
# The clients live in a virtual environment, made on first use (~10 s, from PyPI):
# CNNSERVE_TRITON_VENV, default ~/.cache/cnnserve/triton-venv. Env: CNNSERVE_FIXTURES (default
# ../shared/fixtures).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "test-triton: $*" >&2; }
fail() { echo "test-triton: FAILED: $*" >&2; exit 1; }

bin="$(realpath -m "${1:-${CARGO_TARGET_DIR:-target}/release/cnnserve}")"
[ -x "$bin" ] || fail "binary $bin not found or not executable: build it with cargo build --release"
fixtures="$(realpath -m "${CNNSERVE_FIXTURES:-../shared/fixtures}")"
if [ ! -f "$fixtures/googlenet/weights.safetensors" ] || [ ! -f "$fixtures/googlenet/reference.safetensors" ]; then
  fail "fixtures not found at $fixtures: set CNNSERVE_FIXTURES"
fi

venv="${CNNSERVE_TRITON_VENV:-$HOME/.cache/cnnserve/triton-venv}"
packages=("tritonclient[http,grpc]==2.73.0" "numpy>=1.24,<3" "safetensors>=0.4,<1")
if ! "$venv/bin/python" -c "import tritonclient.http, tritonclient.grpc, safetensors.numpy, numpy" 2>/dev/null; then
  say "making $venv (${packages[*]})"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "${packages[@]}"
fi

work="$(mktemp -d)"
pid=""
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
mkdir "$work/weights"
ln -s "$fixtures/googlenet/weights.safetensors" "$work/weights/googlenet.safetensors"
head -c 18 /dev/urandom | base64 > "$work/key"

"$bin" serve --offline --json-logs --default-model googlenet --weights-dir "$work/weights" \
  --addr 127.0.0.1:0 --grpc-addr 127.0.0.1:0 --api-key-file "$work/key" 2> "$work/server.log" &
pid=$!
listening=""
for _ in $(seq 300); do
  listening="$(grep -m1 '"message":"listening"' "$work/server.log" || true)"
  [ -n "$listening" ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/server.log" >&2; fail "the server exited at start"; }
  sleep 0.1
done
[ -n "$listening" ] || { cat "$work/server.log" >&2; fail "the server never said it was listening"; }
read -r http grpc < <(python3 -c 'import json, sys
f = json.loads(sys.argv[1])["fields"]
print(f["addr"], f["grpc_addr"])' "$listening")
say "server $bin: HTTP $http, gRPC $grpc"

status=0
"$venv/bin/python" scripts/test_triton.py --http "$http" --grpc "$grpc" --fixtures "$fixtures" \
  --api-key-file "$work/key" || status=$?

kill -TERM "$pid"
stopped=""
for _ in $(seq 100); do
  if ! kill -0 "$pid" 2>/dev/null; then stopped=yes; break; fi
  sleep 0.1
done
code=0
wait "$pid" || code=$?
pid=""
if [ "$status" != 0 ]; then
  say "server log: $(tail -n 20 "$work/server.log")"
  fail "tritonclient checks failed (see above)"
fi
[ -n "$stopped" ] || fail "the server did not stop within 10 s of SIGTERM"
[ "$code" = 0 ] || fail "the server exited with $code after SIGTERM"
say "passed: tritonclient over HTTP and gRPC; SIGTERM stopped HTTP and gRPC, exit 0"
