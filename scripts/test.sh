#!/usr/bin/env bash
# Runs the whole test suite: unit tests, integration tests (real sockets, a real redis-server
# each test starts itself, the built binary) and the FastAPI end-to-end test. Installs what a
# fresh Debian machine lacks first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup-debian.sh
scripts/install-python-deps.sh
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --all-targets --no-fail-fast "$@"
  # nextest does not run doctests.
  cargo test --doc --quiet
else
  cargo test --workspace --all-targets --no-fail-fast "$@"
fi
