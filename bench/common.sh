# Sourced by the bench scripts: paths, the fixtures' vgg11_bn weights unpacked once into the target
# dir (as the tests do), and a release build of cnnserve.
#   fixtures, data, shared_bench, python, vgg (vgg11_bn safetensors), googlenet, bin
cd "$(dirname "$0")/.."
fixtures="${CNNSERVE_FIXTURES:-../shared/fixtures}"
data="${CNNSERVE_DATA:-../shared/data}"
shared_bench="$(dirname "$fixtures")/bench"
python="${PYTHON:-python3}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cnnserve/target}"
vgg="$CARGO_TARGET_DIR/tmp/fixtures/vgg11_bn.safetensors"
googlenet="$fixtures/googlenet/weights.safetensors"
if [ ! -f "$vgg" ]; then
  mkdir -p "$(dirname "$vgg")"
  gunzip -c "$fixtures/vgg11_bn/weights.safetensors.gz" > "$vgg.part" && mv "$vgg.part" "$vgg"
fi
# CNNSERVE_BIN: measure that binary instead of building this checkout.
if [ -n "${CNNSERVE_BIN:-}" ]; then
  bin="$CNNSERVE_BIN"
else
  cargo build --release --quiet
  bin="$CARGO_TARGET_DIR/release/cnnserve"
fi
