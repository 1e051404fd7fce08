#!/usr/bin/env bash
# Installs the Python packages that the deployment tests and validation need:
#   - examples/fastapi-backend/requirements.txt  (tests/deploy_e2e.rs runs the example app)
#   - kubernetes-validate, dockerfile-parse, PyYAML  (scripts/validate-deploy.sh)
#   - prometheus-client  (tests/tracing.rs parses the OpenMetrics exposition with its parser)
#   - openai, anthropic  (tests/llm.rs runs the official SDKs against the LLM gateway)
# into the interpreter that `python3` (or $PYTHON) resolves to. Idempotent: when every
# pinned version is already installed it does nothing and needs no network.
#
# Usage (from anywhere): scripts/install-python-deps.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"

# Validation tools, pinned like the app's requirements.
VALIDATION_REQS=(
  "kubernetes-validate==1.37.0"   # bundles the Kubernetes JSON schemas: works offline
  "dockerfile-parse==2.0.1"
  "PyYAML==6.0.3"
  "prometheus-client==0.26.0"     # its OpenMetrics parser checks /metrics exemplars
  "openai==3.57.0"                # LLM gateway conformance (tests/llm_sdk_conformance.py)
  "anthropic==2.14.0"
)
APP_REQS=examples/fastapi-backend/requirements.txt

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v "$PY" >/dev/null 2>&1; then
  echo "install-python-deps: $PY not found; installing python3 with apt" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-pip
  PY=python3
fi

# Every `name==version` line from the requirement file plus the validation pins.
mapfile -t WANTED < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$APP_REQS" | grep -E '^[A-Za-z0-9_.-]+==' || true)
WANTED+=("${VALIDATION_REQS[@]}")

missing=$("$PY" - "${WANTED[@]}" <<'PY'
import sys
from importlib import metadata
for req in sys.argv[1:]:
    name, _, version = req.partition("==")
    try:
        if metadata.version(name) != version:
            print(req)
    except metadata.PackageNotFoundError:
        print(req)
PY
)

if [ -z "$missing" ]; then
  echo "install-python-deps: all pinned packages already installed for $("$PY" --version 2>&1)"
  exit 0
fi
echo "install-python-deps: installing:" $missing

if ! "$PY" -m pip --version >/dev/null 2>&1; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-pip
fi

PIP_ARGS=(install --disable-pip-version-check --no-input --progress-bar off -q)
# Debian's own python3 is "externally managed" (PEP 668); these are test-only tools,
# so install next to the system packages rather than fail.
if "$PY" -c 'import sys, sysconfig, os; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'; then
  PIP_ARGS+=(--break-system-packages)
fi
# shellcheck disable=SC2086  # word splitting of $missing is intended
"$PY" -m pip "${PIP_ARGS[@]}" $missing
echo "install-python-deps: done"
