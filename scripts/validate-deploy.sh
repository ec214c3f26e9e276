#!/usr/bin/env bash
# Validates the deployment files offline: the Kubernetes manifests against the schemas
# kubernetes-validate bundles (strict: unknown fields refused), the KEDA objects against
# deploy/kubernetes/schemas/keda.schema.json, docker-compose.yml against the Compose
# specification check-jsonschema bundles, every Secret key a manifest reads against the
# `kubectl create secret` commands the files document, and the Grafana dashboard's JSON.
# The two validators come from PyPI into a virtualenv under the cargo target directory
# (made once per machine; nothing is fetched when it exists).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${CARGO_TARGET_DIR:-target}/deploy-venv"
stamp="$venv/.installed-1"
if [ ! -e "$stamp" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    'kubernetes-validate==1.37.0' 'check-jsonschema==0.39.0'
  touch "$stamp"
fi
exec "$venv/bin/python" scripts/validate-deploy.py
