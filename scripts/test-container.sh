#!/usr/bin/env bash
# Builds the container images from binaries built outside (the Dockerfile's `cpu-prebuilt` and
# `cuda-prebuilt` targets) with podman, without an image registry, and runs them on the fixture
# weights as a volume. For each image it checks:
#   - the image: user 10001, /weights a volume, ports 8080 and 8081 exposed, a HEALTHCHECK that
#     runs `cnnserve healthcheck` with a start period of a minute or more;
#   - the server runs as uid 10001 (the container's PID 1), /health answers 200 once the model is
#     loaded, /predict answers a photo with probabilities, `podman healthcheck run` passes;
#   - SIGTERM (`podman stop -t 10`) stops it within 10 s, exit code 0, the graceful shutdown logged.
# The CUDA image is run here without a GPU, with the stub driver of scripts/cuda-env.sh mounted
# where the NVIDIA toolkit would put the real one, serving `--device cpu` (the same answer as the
# CPU image's, byte for byte); its default (CUDA) device must fail with one sentence.
#
#   scripts/test-container.sh CPU_BINARY [CUDA_BINARY]
#
# Needs root (rootful podman; podman, runc and debootstrap are installed with apt-get when
# missing). The base image is Debian bookworm made with `debootstrap --variant=minbase` once and
# kept in ~/.cache/cnnserve/container (and in podman's storage). Env: CNNSERVE_FIXTURES (default
# ../shared/fixtures), CNNSERVE_DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [ $# -gt 2 ]; then sed -n 2,19p "$0"; exit 2; fi

say() { echo "test-container: $*" >&2; }
fail() { echo "test-container: FAILED: $*" >&2; exit 1; }

cpu_bin="$(realpath -m "$1")"
cuda_bin="${2:+$(realpath -m "$2")}"
[ -x "$cpu_bin" ] || fail "CPU binary $1 not found or not executable"
[ -z "$cuda_bin" ] || [ -x "$cuda_bin" ] || fail "CUDA binary $2 not found or not executable"
fixtures="${CNNSERVE_FIXTURES:-../shared/fixtures}"
weights_file="$fixtures/googlenet/weights.safetensors"
photo="$fixtures/preprocess/img0.jpg"
if [ ! -f "$weights_file" ] || [ ! -f "$photo" ]; then
  fail "fixtures not found at $fixtures: set CNNSERVE_FIXTURES"
fi
[ "$(id -u)" = 0 ] || fail "needs root: runs rootful podman with runc"
started=$SECONDS

# Tools: Debian's podman with runc (crun fails on our machines), debootstrap for the base image.
missing=()
for tool in podman runc debootstrap curl; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# cgroupfs and runc: the defaults (systemd, crun) fail here.
pm() { podman --cgroup-manager=cgroupfs --runtime runc "$@"; }

# Everything made here is removed on exit, except the cached base image.
work="$(mktemp -d)"
containers=() images=()
cleanup() {
  local c i
  for c in "${containers[@]}"; do pm rm -f -v -t 0 "$c" >/dev/null 2>&1 || true; done
  for i in "${images[@]}"; do pm rmi -f "$i" >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# The base image: debootstrap's minbase, trimmed like debian:bookworm-slim (no apt lists, docs,
# man pages or locales). Bump the key when this recipe changes.
key="bookworm-minbase-1"
base="localhost/cnnserve-base:$key"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/cnnserve/container"
tarball="$cache/debian-$key.tar"
if ! pm image exists "$base"; then
  if [ ! -f "$tarball" ]; then
    t=$SECONDS
    say "making the base image with debootstrap (once; cached in $tarball)"
    mkdir -p "$cache"
    root="$work/rootfs"
    debootstrap --variant=minbase bookworm "$root" "${CNNSERVE_DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
      >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; fail "debootstrap failed"; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
      "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
      "$root"/usr/share/locale/* "$root"/etc/hostname "$root"/etc/resolv.conf
    tar -C "$root" --numeric-owner -cf "$tarball.part" .
    mv "$tarball.part" "$tarball"
    rm -rf "$root"
    say "base image made in $((SECONDS - t)) s"
  fi
  pm import -q "$tarball" "$base" >/dev/null
fi

# Builds TARGET of the Dockerfile as image NAME from the build context CONTEXT (a dir of its own,
# holding only what that target copies).
build() {
  local target="$1" name="$2" context="$3" t=$SECONDS
  shift 3
  images+=("$name")
  pm build -q --format docker --isolation=chroot --pull=never --layers=false -f Dockerfile \
    --target "$target" --build-arg RUNTIME_IMAGE="$base" "$@" -t "$name" "$context" \
    >"$work/build.log" 2>&1 || { tail -30 "$work/build.log" >&2; fail "podman build --target $target failed"; }
  say "$name: built in $((SECONDS - t)) s"
}

# Checks the image's configuration: user, volume, ports, healthcheck and its start period.
check_config() {
  local image="$1" min_start_s="$2"
  pm image inspect "$image" >"$work/inspect.json"
  python3 - "$image" "$min_start_s" "$work/inspect.json" <<'EOF' || fail "$image: configuration (above)"
import json, sys
image, min_start = sys.argv[1], int(sys.argv[2])
inspect = json.load(open(sys.argv[3]))[0]
config = inspect["Config"]
problems = []
if config.get("User") not in ("10001", "10001:10001"):
    problems.append(f"user is {config.get('User')!r}, not 10001")
if "/weights" not in (config.get("Volumes") or {}):
    problems.append(f"/weights is not a volume: {config.get('Volumes')}")
for port in ("8080/tcp", "8081/tcp"):
    if port not in (config.get("ExposedPorts") or {}):
        problems.append(f"{port} not exposed: {config.get('ExposedPorts')}")
# Podman shows the HEALTHCHECK beside the config, Docker inside it.
hc = inspect.get("Healthcheck") or config.get("Healthcheck") or {}
test = hc.get("Test") or []
if test[:1] != ["CMD"] or test[1:3] != ["/usr/local/bin/cnnserve", "healthcheck"]:
    problems.append(f"HEALTHCHECK is {test}, not `cnnserve healthcheck`")
start = (hc.get("StartPeriod") or 0) / 1e9
if start < min_start:
    problems.append(f"HEALTHCHECK start period {start:.0f} s, under {min_start} s")
for p in problems:
    print(f"test-container: {image}: {p}", file=sys.stderr)
if problems:
    sys.exit(1)
print(f"test-container: {image}: user {config['User']}, volume /weights, ports 8080 8081, "
      f"HEALTHCHECK {' '.join(test[1:])} (start period {start:.0f} s)", file=sys.stderr)
EOF
}

# A free port on this machine (the containers share the host's network).
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Runs IMAGE as container NAME on a weights volume holding googlenet, with RUN_ARGS (podman run
# options, up to `--`) and SERVE_ARGS (after it), and checks it serves and stops as it should.
check_serving() {
  local image="$1" name="$2"
  shift 2
  local run_args=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do run_args+=("$1"); shift; done
  shift
  local weights="$work/weights-$name" port url t
  mkdir -p "$weights"
  cp "$weights_file" "$weights/googlenet.safetensors"
  chown -R 10001:10001 "$weights"
  port="$(free_port)"
  url="http://127.0.0.1:$port"
  containers+=("$name")
  t=$SECONDS
  # The healthcheck's URL follows the port: the image's default is 8080.
  pm run -d --name "$name" --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --network=host \
    -v "$weights:/weights" -e CNNSERVE_ADDR="127.0.0.1:$port" \
    -e CNNSERVE_GRPC_ADDR="127.0.0.1:$(free_port)" -e CNNSERVE_HEALTHCHECK_URL="$url/health" "${run_args[@]}" \
    "$image" serve --default-model googlenet --offline "$@" >/dev/null 2>"$work/run.log" ||
    { cat "$work/run.log" >&2; fail "$name: podman run failed"; }
  # (Podman says in run.log that it has no systemd to time the healthchecks with: only shown on
  # failures, with the server's log.)
  logs() {
    echo "--- podman run said:" >&2
    cat "$work/run.log" >&2
    echo "--- $name's log:" >&2
    pm logs "$name" 2>&1 | tail -30 >&2
  }

  # /health: 200 once googlenet is loaded.
  local code=""
  for _ in $(seq 120); do
    code="$(curl -s -o "$work/health.json" -w '%{http_code}' "$url/health" || true)"
    [ "$code" = 200 ] && break
    [ "$(pm inspect --format '{{.State.Running}}' "$name")" = true ] || { logs; fail "$name: exited before serving"; }
    sleep 0.5
  done
  [ "$code" = 200 ] || { logs; fail "$name: /health answered ${code:-nothing} after 60 s: $(cat "$work/health.json" 2>/dev/null)"; }
  say "$name: /health 200 after $((SECONDS - t)) s: $(cat "$work/health.json")"

  # Not root: the server (PID 1) and what runs inside (the healthcheck) are uid 10001.
  local ids uid
  ids="$(pm exec "$name" cat /proc/1/status | awk '/^(Uid|Gid):/ {print $1, $2, $3, $4, $5}')"
  if [ "$ids" != "$(printf 'Uid: 10001 10001 10001 10001\nGid: 10001 10001 10001 10001')" ]; then
    logs
    fail "$name: the server does not run as 10001:10001: $ids"
  fi
  uid="$(pm exec "$name" id -u)"
  [ "$uid" = 10001 ] || fail "$name: podman exec runs as uid $uid, not 10001"
  say "$name: the server runs as uid 10001, gid 10001"

  # /predict: a photo, multipart, answered with probabilities.
  code="$(curl -s -o "$work/predict.json" -w '%{http_code}' -F "image=@$photo" "$url/predict?top_k=3" || true)"
  [ "$code" = 200 ] || { logs; fail "$name: /predict answered ${code:-nothing}: $(cat "$work/predict.json" 2>/dev/null)"; }
  python3 - "$work/predict.json" "$name" <<'EOF' || fail "$name: /predict's answer (above)"
import json, sys
body = json.load(open(sys.argv[1]))
p = body.get("predictions") or []
assert body.get("model") == "googlenet", f"model {body.get('model')!r}, not googlenet: {body}"
assert len(p) == 3 and all(0 <= x["probability"] <= 1 for x in p), f"not 3 probabilities: {body}"
assert p[0]["probability"] >= p[1]["probability"] >= p[2]["probability"], f"not in order: {body}"
print(f"test-container: {sys.argv[2]}: /predict: {p[0]['label']} {p[0]['probability']:.3f}, "
      f"{p[1]['label']} {p[1]['probability']:.3f}, …", file=sys.stderr)
EOF
  cp "$work/predict.json" "$work/predict-$name.json"

  # The image's HEALTHCHECK, run by podman.
  pm healthcheck run "$name" >"$work/hc.log" 2>&1 ||
    { cat "$work/hc.log" >&2; logs; fail "$name: podman healthcheck run failed"; }
  [ "$(pm inspect --format '{{.State.Health.Status}}' "$name")" = healthy ] ||
    fail "$name: not healthy after podman healthcheck run"
  say "$name: podman healthcheck run: healthy"

  # SIGTERM: stops within 10 s (podman stop sends SIGKILL after 10 s: exit code 137), cleanly.
  local t0 t1 ms exit_code
  t0="$(date +%s%N)"
  # (Podman also says here that it has no systemd timer to remove.)
  pm stop -t 10 "$name" >/dev/null 2>"$work/stop.log" || { cat "$work/stop.log" >&2; fail "$name: podman stop failed"; }
  t1="$(date +%s%N)"
  ms=$(((t1 - t0) / 1000000))
  exit_code="$(pm inspect --format '{{.State.ExitCode}}' "$name")"
  if [ "$exit_code" != 0 ] || [ "$ms" -ge 10000 ]; then
    logs
    fail "$name: SIGTERM: exit code $exit_code after $ms ms (10 s at most, exit code 0)"
  fi
  pm logs "$name" 2>&1 | grep -q "shutting down" || { logs; fail "$name: no graceful shutdown in the log"; }
  say "$name: SIGTERM: stopped in $ms ms, exit code 0, graceful shutdown logged"
}

tag="$$"

# The CPU image.
ctx="$work/context-cpu"
mkdir -p "$ctx"
# Stripped: the image gets what the Dockerfile's `dist` profile builds, without debug info.
strip -o "$ctx/cnnserve" "$cpu_bin"
build cpu-prebuilt "localhost/cnnserve-test:cpu-$tag" "$ctx" --build-arg BINARY=cnnserve
check_config "localhost/cnnserve-test:cpu-$tag" 60
check_serving "localhost/cnnserve-test:cpu-$tag" "cnnserve-test-cpu-$tag" --
rm -rf "$ctx"

# The CUDA image: CUDA 13.0's libraries from scripts/cuda-env.sh's venv, as the Dockerfile's
# `cuda` target copies them from its build stage.
if [ -n "$cuda_bin" ]; then
  stub_libs="$(
    # shellcheck source=scripts/cuda-env.sh
    source scripts/cuda-env.sh >/dev/null && echo "$CNNSERVE_CUDA_STUB_LIBS"
  )"
  cuda_lib="${stub_libs#*:}" stub="${stub_libs%%:*}/libcuda.so"
  if [ ! -d "$cuda_lib" ] || [ ! -f "$stub" ]; then
    fail "CUDA libraries or the stub driver not found ($stub_libs)"
  fi
  ctx="$work/context-cuda"
  mkdir -p "$ctx"
  strip -o "$ctx/cnnserve" "$cuda_bin"
  # (~1 GB: hard links where the venv is on the same file system.)
  cp -al "$cuda_lib" "$ctx/cuda-lib" 2>/dev/null || { rm -rf "$ctx/cuda-lib"; cp -a "$cuda_lib" "$ctx/cuda-lib"; }
  image="localhost/cnnserve-test:cuda-$tag"
  build cuda-prebuilt "$image" "$ctx" --build-arg BINARY=cnnserve --build-arg CUDA_LIB=cuda-lib
  rm -rf "$ctx"
  check_config "$image" 120
  # Where the NVIDIA container toolkit mounts the driver.
  driver=(-v "$stub:/usr/lib/x86_64-linux-gnu/libcuda.so.1:ro")
  # Its default device is the GPU: without one, a sentence and exit code 1.
  containers+=("cnnserve-test-cuda-gpu-$tag")
  if out="$(pm run --name "cnnserve-test-cuda-gpu-$tag" --no-healthcheck --ulimit nofile=1024:1024 \
    --ulimit nproc=1024:1024 --network=host -e CNNSERVE_ADDR="127.0.0.1:$(free_port)" \
    -e CNNSERVE_GRPC_ADDR= -e RUST_LOG=off "${driver[@]}" "$image" serve --default-model googlenet --offline 2>&1)"; then
    fail "$image: started on CUDA without a GPU: $out"
  fi
  printf '%s\n' "$out" | grep -q '^error: cannot open CUDA device 0' ||
    fail "$image: without a GPU, expected 'error: cannot open CUDA device 0', got: $out"
  say "$image: CUDA device without a GPU: $out"
  check_serving "$image" "cnnserve-test-cuda-$tag" "${driver[@]}" -- --device cpu
  cmp -s "$work/predict-cnnserve-test-cpu-$tag.json" "$work/predict-cnnserve-test-cuda-$tag.json" ||
    fail "$image: /predict answered otherwise than the CPU image: $(cat "$work/predict-cnnserve-test-cuda-$tag.json")"
  say "$image: /predict's answer is the CPU image's, byte for byte"
fi

say "ok in $((SECONDS - started)) s"
