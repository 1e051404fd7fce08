#!/usr/bin/env bash
# Dependency-policy checks:
#   cargo deny check bans licenses sources   (policy in deny.toml)
#   cargo machete                             (unused dependencies)
# Installs the pinned tool versions with `cargo install --locked` when missing
# (first install on a fresh machine: ~6 min for cargo-deny, ~3 min for cargo-machete).
# `advisories` is not checked: the RustSec advisory DB is fetched from GitHub,
# which CI cannot reach.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CARGO_DENY_VERSION=0.20.2
CARGO_MACHETE_VERSION=0.9.2

# ensure_tool CRATE VERSION VERSION_CMD...
ensure_tool() {
  local crate=$1 version=$2
  shift 2
  if "$@" 2>/dev/null | grep -qF "$version"; then
    return 0
  fi
  echo "== installing $crate $version"
  cargo install --locked "$crate" --version "$version"
}

ensure_tool cargo-deny "$CARGO_DENY_VERSION" cargo deny --version
ensure_tool cargo-machete "$CARGO_MACHETE_VERSION" cargo machete --version

status=0

echo "== cargo deny check bans licenses sources"
cargo deny --locked check bans licenses sources || status=1

echo "== cargo machete"
cargo machete --skip-target-dir || status=1

exit "$status"
