#!/usr/bin/env bash
# Offline checks of the Kubernetes manifests (issue #14): deploy/kubernetes (kustomize; rendered by
# scripts/validate_k8s.py, no kubectl needed) against the Kubernetes OpenAPI schemas bundled in
# kubernetes-validate (strict), plus the checks the API server makes beyond them and the project's
# own rules; deploy/kserve/inferenceservice.yaml against KServe's CRD schemas kept in
# deploy/kserve/schema; then broken copies of objects, each of which must be rejected. No cluster,
# no network (but PyPI the first time). Prints each object it validated; exits 1 on any error.
#
#   scripts/validate-k8s.sh
#   scripts/validate-k8s.sh render deploy/kubernetes/overlays/example    # what it renders
#
# The Python packages live in a virtual environment made on first use (~15 s, from PyPI):
# CNNSERVE_K8S_VENV, default ~/.cache/cnnserve/k8s-venv; a change of the pins below remakes it.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${CNNSERVE_K8S_VENV:-$HOME/.cache/cnnserve/k8s-venv}"
# kubernetes-validate and everything it pulls in, pinned.
packages=(
  kubernetes-validate==1.37.0 jsonschema==4.26.0 PyYAML==6.0.3 referencing==0.37.0
  jsonschema-specifications==2025.9.1 rpds-py==2026.9.1 attrs==26.1.0 packaging==26.4
  importlib_resources==7.1.0 typing_extensions==4.16.0
)
stamp="$venv/cnnserve-packages.txt"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "${packages[*]}" ]; then
  echo "validate-k8s: making $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "${packages[@]}"
  echo "${packages[*]}" > "$stamp"
fi

if [ $# -eq 0 ]; then set -- check; fi
exec "$venv/bin/python" scripts/validate_k8s.py "$@"
