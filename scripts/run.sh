#!/usr/bin/env bash
# Builds outrider (release) and runs it. With no arguments it runs on the embedded default
# config (config/outrider.yaml): traffic on 0.0.0.0:8080 to http://127.0.0.1:8000, admin on
# 127.0.0.1:9901, in-memory cache only. Extra arguments go to `outrider run`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup-debian.sh
exec cargo run --release --bin outrider -- run "$@"
