#!/usr/bin/env bash
# The test command: installs and starts what the tests need, then runs `cargo test`.
#
#   scripts/test.sh [cargo test arguments…]
#
# - Chromium (Debian's `chromium`) and the browser test's node packages (tests/browser) for the
#   demo page's tests;
# - a throwaway PostgreSQL cluster (Debian's `postgresql`) on a local port, for the job store's
#   tests and the replica test (CNNSERVE_TEST_POSTGRES);
# - an S3-protocol server (moto, from PyPI, in ~/.cache/cnnserve/moto-venv) with a bucket
#   `cnnserve-test`, for the model store's tests (CNNSERVE_TEST_S3).
# Everything it starts is stopped when it ends. The job tests (tests/api_jobs.rs) run a second
# time against PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cnnserve/target}"
cache="$HOME/.cache/cnnserve"
mkdir -p "$cache" "$CARGO_TARGET_DIR"

need_apt=()
command -v "${CNNSERVE_CHROMIUM:-chromium}" >/dev/null || need_apt+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
command -v python3 >/dev/null && python3 -c 'import venv' 2>/dev/null || need_apt+=(python3-venv)
command -v npm >/dev/null || need_apt+=(nodejs npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]} (apt)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# The browser test's packages (puppeteer-core, axe-core), pinned by tests/browser/package-lock.json.
if [ -f tests/browser/package-lock.json ]; then
  if [ ! -d tests/browser/node_modules ] || [ tests/browser/package-lock.json -nt tests/browser/node_modules ]; then
    npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error
  fi
fi

# moto's S3 server, in a venv of its own.
moto_venv="$cache/moto-venv"
if [ ! -x "$moto_venv/bin/moto_server" ]; then
  python3 -m venv "$moto_venv"
  "$moto_venv/bin/pip" install -q 'moto[server]==5.1.18'
fi

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

work="$(mktemp -d)"
pids=()
pg_bin="$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")"
pg_data="$work/pg"
as_postgres() {
  if [ "$(id -u)" = 0 ]; then
    su postgres -s /bin/sh -c "$*"
  else
    sh -c "$*"
  fi
}
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  if [ -f "$pg_data/postmaster.pid" ]; then
    as_postgres "'$pg_bin/pg_ctl' -D '$pg_data' -m immediate stop" >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# PostgreSQL refuses to run as root: the cluster belongs to the postgres user.
pg_port="$(free_port)"
mkdir -p "$pg_data"
if [ "$(id -u)" = 0 ]; then chown postgres "$work" "$pg_data"; chmod 755 "$work"; fi
as_postgres "'$pg_bin/initdb' -D '$pg_data' -U postgres -A trust --no-sync >'$pg_data.initdb.log' 2>&1" \
  || { cat "$pg_data.initdb.log"; exit 1; }
as_postgres "'$pg_bin/pg_ctl' -D '$pg_data' -l '$pg_data/server.log' -w -o \"-p $pg_port -k '$pg_data' -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300\" start" >/dev/null
export CNNSERVE_TEST_POSTGRES="postgres://postgres@127.0.0.1:$pg_port/postgres"
echo "PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$pg_port"

s3_port="$(free_port)"
"$moto_venv/bin/moto_server" -H 127.0.0.1 -p "$s3_port" >"$work/moto.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$s3_port/" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fs -X PUT "http://127.0.0.1:$s3_port/cnnserve-test" >/dev/null \
  || { cat "$work/moto.log"; echo "the S3 server did not start" >&2; exit 1; }
export CNNSERVE_TEST_S3="http://127.0.0.1:$s3_port"
echo "S3 (moto) on $CNNSERVE_TEST_S3, bucket cnnserve-test"

cargo test --release "$@"
if [ $# -eq 0 ]; then
  echo "the job tests again, on PostgreSQL"
  CNNSERVE_TEST_JOB_DATABASE=postgres cargo test --release --test api_jobs
fi
