#!/usr/bin/env bash
# Installs what a fresh Debian machine with Rust lacks to build and test outrider:
# cmake (pingora-core builds zlib-ng with it), redis-server/redis-cli (tests start their own),
# promtool (Debian's prometheus package; tests check the generated SLO rules with it), and
# Node.js with npm (the Apollo Client conformance test installs its pinned packages with npm ci).
# Idempotent: does nothing when everything is present.
set -euo pipefail
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
if [ "${#need[@]}" -gt 0 ]; then
  echo "setup: installing ${need[*]} with apt"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
